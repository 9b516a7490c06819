"""Rerun/default forms: specs from papermill's inspection of a real template, strict parsing of hostile input."""

from __future__ import annotations

import papermill
import pytest
from papermill.translators import PythonTranslator
from test_portal_support import write_template

from runner.templates.params import (
    MAX_TEXT,
    ParamError,
    ParamSpec,
    check_values,
    spec_from_inspection,
    specs,
    validate_form,
)


@pytest.fixture
def fields(tmp_path) -> dict[str, ParamSpec]:
    path = write_template(tmp_path, "MARI")
    return {spec.name: spec for spec in specs(papermill.inspect_notebook(str(path)))}


def test_specs_from_template(fields: dict[str, ParamSpec]) -> None:
    ei, mode, bins, normalise, masks = (fields[n] for n in ("ei", "mode", "bins", "normalise", "masks"))
    assert (ei.kind, ei.default, ei.minimum, ei.maximum) == ("float", 25.0, 0.5, 2000)
    assert (mode.kind, mode.choices) == ("str", ["powder", "single-crystal"])
    assert (bins.kind, bins.minimum, bins.maximum) == ("int", 1, 100000)
    assert (normalise.kind, normalise.default) == ("bool", True)
    assert (masks.kind, masks.item_kind, masks.default) == ("list", "int", [])
    assert fields["data_file"].fixed and fields["run_number"].fixed and not fields["data_file"].editable


@pytest.mark.parametrize(("info", "kind", "item", "optional"), [
    ({"inferred_type_name": "None", "default": "[1.5, 2]"}, "list", "float", False),
    ({"inferred_type_name": "None", "default": "['a', 'b']"}, "list", "str", False),
    ({"inferred_type_name": "List[str]", "default": "[]"}, "list", "str", False),
    ({"inferred_type_name": "Optional[int]", "default": "None"}, "int", None, True),
    ({"inferred_type_name": "None", "default": "None"}, "str", None, True),
    ({"inferred_type_name": "None", "default": "False"}, "bool", None, False),
])
def test_kinds_inferred_from_annotation_or_default(info, kind, item, optional) -> None:
    spec = spec_from_inspection("x", {"help": "", **info})
    assert (spec.kind, spec.item_kind, spec.optional, spec.unsupported) == (kind, item, optional, False)


def test_unsupported_types_are_not_editable() -> None:
    for default in ('{"a": 1}', "[1, 'x']", "[[1]]", "object()"):
        assert not spec_from_inspection("x", {"inferred_type_name": "None", "default": default}).editable, default


@pytest.mark.parametrize(("name", "raw", "value"), [
    ("ei", " 30 ", 30.0), ("ei", "1e2", 100.0), ("ei", "-0.0", None), ("bins", "+42", 42),
    ("normalise", "False", False), ("normalise", "true", True), ("mode", "single-crystal", "single-crystal"),
    ("masks", "[1, 2, 3]", [1, 2, 3]), ("masks", "1, 2, 3", [1, 2, 3]), ("masks", "[]", []), ("masks", "", []),
    ("masks", "4,", [4]), ("label", "it's \"quoted\"\nand\\escaped", "it's \"quoted\"\nand\\escaped"),
])
def test_valid_values(fields, name, raw, value) -> None:
    if value is None:  # -0.0 is below the range minimum 0.5
        with pytest.raises(ParamError):
            fields[name].parse(raw)
        return
    parsed = fields[name].parse(raw)
    assert parsed == value and type(parsed) is type(value)


HOSTILE = [
    ("ei", "__import__('os').system('touch /tmp/pwned')"), ("ei", "nan"), ("ei", "inf"), ("ei", "1e999"),
    ("ei", "0x10"), ("ei", "1_000"), ("ei", "30; import os"), ("ei", "5000"), ("ei", "[30]"),
    ("bins", "1.5"), ("bins", "1e3"), ("bins", "9" * 400), ("bins", "True"), ("bins", "0"),
    ("normalise", "1"), ("normalise", "yes"), ("normalise", "__import__('os')"),
    ("mode", "powder'; import os; '"), ("mode", "POWDER"),
    ("masks", "[1, 'x']"), ("masks", "[1, [2]]"), ("masks", '{"a": 1}'), ("masks", "[1, 2"), ("masks", "1; 2"),
    ("masks", "[" + ",".join(["1"] * 2000) + "]"), ("masks", "[true]"),
    ("label", "x" * (MAX_TEXT + 1)), ("label", "nul\x00byte"),
]


@pytest.mark.parametrize(("name", "raw"), HOSTILE)
def test_hostile_values_are_rejected(fields, name, raw) -> None:
    with pytest.raises(ParamError):
        fields[name].parse(raw)


def test_validate_form_collects_errors_and_skips_fixed(fields) -> None:
    spec_list = list(fields.values())
    values, errors = validate_form(spec_list, {"ei": "abc", "bins": "10", "data_file": "/etc/passwd", "evil": "1"})
    assert values == {"bins": 10} and set(errors) == {"ei"}
    values, errors = validate_form(spec_list, {"ei": "", "bins": " "}, keep_blank=True)
    assert values == {} and errors == {}


def test_check_values_of_json_bodies(fields) -> None:
    spec_list = list(fields.values())
    checked, errors = check_values(spec_list, {"ei": 3, "bins": True, "masks": [1, 2.5], "run_number": 5, "x": 1})
    assert checked == {"ei": 3.0} and set(errors) == {"bins", "masks", "run_number", "x"}


def test_format_round_trips(fields) -> None:
    for name, value in (("ei", 12.5), ("bins", 7), ("normalise", False), ("masks", [3, 4]), ("label", 'a "b"')):
        assert fields[name].parse(fields[name].format(value)) == value


@pytest.mark.parametrize("text", [
    'x"; import os; os.system("id"); "', "'''\nimport os\n'''", "\\\"; print(1) #", "\n__import__('os')\n",
    "{{ injection }}", "\u2028line separator", "${HOME}",
])
def test_accepted_strings_stay_data_in_the_generated_cell(fields, text) -> None:
    """papermill writes values as Python literals: executing its cell yields the same string, nothing else."""
    value = fields["label"].parse(text)
    cell = PythonTranslator.codify({"label": value, "masks": fields["masks"].parse("[1, 2]")})
    namespace: dict = {}
    exec(compile(cell, "<parameters>", "exec"), {"__builtins__": {}}, namespace)  # no builtins: nothing to call
    assert namespace == {"label": text, "masks": [1, 2]}
