"""Typed template parameters: specs from papermill's inspection, strict checks, form parsing.

papermill's inspection gives each parameter's name, annotation (``inferred_type_name``), default
(source text) and help comment. From them :func:`specs` builds a :class:`ParamSpec` per parameter:
kind from the annotation, else from the default's literal; enums and ranges from the help comment
(``# one of: a, b`` / ``# range: 0..10``). Form input is parsed strictly into JSON values — never
evaluated — so whatever a user types reaches papermill as data, which writes it as a Python literal.
"""

from __future__ import annotations

import ast
import json
import math
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel

#: Names nbreduce sets from the run itself when the template declares them (never user-editable).
RUN_PARAMETERS = ("data_file", "data_files", "run_number", "run_numbers", "rb_number", "instrument", "run_title",
                  "output_dir")

Kind = Literal["bool", "int", "float", "str", "list"]
ItemKind = Literal["bool", "int", "float", "str"]

MAX_TEXT = 10_000  # characters of one submitted value
MAX_ITEMS = 1_000  # items of one list
MAX_INT = 2**63 - 1
_INT_RE = re.compile(r"^[+-]?[0-9]{1,19}$")
_FLOAT_RE = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$")
_CHOICES_RE = re.compile(r"one of:\s*(?P<values>[^;#]+)", re.IGNORECASE)
_RANGE_RE = re.compile(
    r"range:\s*(?P<lo>[+-]?[0-9.eE+-]+)?\s*\.\.\s*(?P<hi>[+-]?[0-9.eE+-]*[0-9.])?", re.IGNORECASE)
_BOOL_TEXT = {"true": True, "false": False}
_SCALAR_TYPES = {"bool": bool, "int": int, "float": float, "str": str}


class ParamError(ValueError):
    """A submitted value does not fit its parameter; the message is shown next to the field."""


class ParamSpec(BaseModel):
    """One form field."""

    name: str
    kind: Kind = "str"
    item_kind: ItemKind | None = None
    optional: bool = False
    default: Any = None
    help: str = ""
    choices: list[Any] | None = None
    minimum: float | None = None
    maximum: float | None = None
    #: Set by nbreduce from the run (data file, run number...): shown, never editable.
    fixed: bool = False
    #: The template's type is not one a form can edit (dicts, objects): shown, never editable.
    unsupported: bool = False

    @property
    def editable(self) -> bool:
        return not (self.fixed or self.unsupported)

    @property
    def type_label(self) -> str:
        label = f"list[{self.item_kind}]" if self.kind == "list" else self.kind
        return f"{label} | None" if self.optional else label

    # -- parsing form text ----------------------------------------------------------------------
    def parse(self, raw: str) -> Any:
        """Form text -> JSON value of this parameter's type (or :class:`ParamError`)."""
        if not isinstance(raw, str):
            raise ParamError("expected text")
        if len(raw) > MAX_TEXT:
            raise ParamError(f"value too long ({len(raw)} characters, at most {MAX_TEXT})")
        if "\x00" in raw:
            raise ParamError("value contains a NUL character")
        text = raw.strip()
        if text == "" and self.optional:
            return None
        if text.lower() == "none" and self.optional and self.kind != "str":
            return None
        if self.kind == "list":
            return self.check(self._parse_list(text))
        return self.check(_parse_scalar(self.kind, text if self.kind != "str" else raw))

    def _parse_list(self, text: str) -> list[Any]:
        item_kind = self.item_kind or "str"
        if text.startswith("["):
            try:
                value = json.loads(text)
            except ValueError:
                if not text.endswith("]"):
                    raise ParamError("a list starting with [ must end with ]") from None
                text = text[1:-1]  # not JSON (e.g. unquoted words): read as comma-separated
            else:
                if not isinstance(value, list):
                    raise ParamError("expected a list")
                return value
        items = [item.strip() for item in text.split(",")] if text else []
        if items and items[-1] == "":
            items.pop()  # tolerate a trailing comma
        return [_parse_scalar(item_kind, _unquote(item) if item_kind == "str" else item) for item in items]

    # -- checking JSON values -------------------------------------------------------------------
    def check(self, value: Any) -> Any:
        """Strict type, enum and range check of a JSON value (form-parsed or from an API body)."""
        if value is None:
            if self.optional:
                return None
            raise ParamError("a value is required")
        if self.kind == "list":
            if not isinstance(value, list):
                raise ParamError("expected a list")
            if len(value) > MAX_ITEMS:
                raise ParamError(f"too many items ({len(value)}, at most {MAX_ITEMS})")
            return [self._check_scalar(self.item_kind or "str", item, f"item {i + 1}: ")
                    for i, item in enumerate(value)]
        return self._check_scalar(self.kind, value, "")

    def _check_scalar(self, kind: str, value: Any, where: str) -> Any:
        if kind == "float" and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        expected = _SCALAR_TYPES[kind]
        if type(value) is not expected:  # bool is not an int here, and no subclasses sneak through
            raise ParamError(f"{where}expected {kind}, got {type(value).__name__}")
        if kind == "str":
            if len(value) > MAX_TEXT or "\x00" in value:
                raise ParamError(f"{where}text too long or contains NUL")
        elif kind == "int" and abs(value) > MAX_INT:
            raise ParamError(f"{where}integer out of range")
        elif kind == "float" and not math.isfinite(value):
            raise ParamError(f"{where}must be a finite number")
        if self.choices is not None and value not in self.choices:
            raise ParamError(f"{where}must be one of: {', '.join(map(str, self.choices))}")
        if kind in ("int", "float"):
            if self.minimum is not None and value < self.minimum:
                raise ParamError(f"{where}must be >= {_num(self.minimum)}")
            if self.maximum is not None and value > self.maximum:
                raise ParamError(f"{where}must be <= {_num(self.maximum)}")
        return value

    # -- showing values -------------------------------------------------------------------------
    def format(self, value: Any) -> str:
        """A value as form text that :meth:`parse` reads back to the same value."""
        if value is None:
            return ""
        if self.kind == "bool" and isinstance(value, bool):
            return "true" if value else "false"
        if self.kind == "list" or not isinstance(value, str):
            return json.dumps(value)
        return value


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _unquote(item: str) -> str:
    if len(item) >= 2 and item[0] == item[-1] and item[0] in "\"'":
        return item[1:-1]
    return item


def _parse_scalar(kind: str, text: str) -> Any:
    if kind == "str":
        return text
    if kind == "bool":
        if text.lower() not in _BOOL_TEXT:
            raise ParamError("expected true or false")
        return _BOOL_TEXT[text.lower()]
    if kind == "int":
        if not _INT_RE.match(text):
            raise ParamError(f"expected a whole number, got {text[:40]!r}")
        return int(text)
    if not _FLOAT_RE.match(text):
        raise ParamError(f"expected a number, got {text[:40]!r}")
    return float(text)


# --------------------------------------------------------------------------------------------------
# Building specs from papermill's inspection
# --------------------------------------------------------------------------------------------------
def _literal(source: str) -> tuple[bool, Any]:
    try:
        return True, ast.literal_eval(source)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None


def _kind_of(value: Any) -> str | None:
    for kind, cls in _SCALAR_TYPES.items():
        if type(value) is cls:
            return kind
    return None


def _from_annotation(annotation: str) -> tuple[str | None, str | None, bool]:
    """(kind, item kind, optional) from an annotation such as ``list[int]`` or ``Optional[float]``."""
    text = annotation.replace(" ", "")
    optional = False
    match = re.fullmatch(r"(?:typing\.)?Optional\[(.+)\]", text)
    if match:
        text, optional = match.group(1), True
    parts = [p for p in text.split("|") if p]
    if "None" in parts and len(parts) > 1:
        parts.remove("None")
        optional = True
    text = parts[0] if len(parts) == 1 else ""
    if text in _SCALAR_TYPES:
        return text, None, optional
    match = re.fullmatch(r"(?:typing\.)?(?:list|List)(?:\[(\w+)\])?", text)
    if match:
        item = match.group(1)
        return "list", item if item in _SCALAR_TYPES else None, optional
    return None, None, optional


def spec_from_inspection(name: str, info: Mapping[str, Any]) -> ParamSpec:
    """One :class:`ParamSpec` from papermill's ``{inferred_type_name, default, help}``."""
    annotation = str(info.get("inferred_type_name") or "None")
    help_text = str(info.get("help") or "")
    ok, default = _literal(str(info.get("default", "None")))
    kind, item_kind, optional = (None, None, False) if annotation == "None" else _from_annotation(annotation)
    if kind is None:
        if ok and default is None:
            kind, optional = "str", True
        elif ok and isinstance(default, list):
            kind = "list"
        else:
            kind = _kind_of(default) if ok else None
    if kind == "list" and item_kind is None:
        kinds = {_kind_of(item) for item in default} if ok and isinstance(default, list) else set()
        if not kinds:
            item_kind = "str"
        elif kinds == {"int", "float"}:
            item_kind = "float"
        elif len(kinds) == 1 and None not in kinds:
            item_kind = kinds.pop()
        else:
            kind = None  # mixed or nested lists cannot be typed safely
    spec = ParamSpec(name=name, kind=kind or "str", item_kind=item_kind if kind == "list" else None,
                     optional=optional or (ok and default is None), default=default if ok else None,
                     help=help_text, fixed=name in RUN_PARAMETERS, unsupported=kind is None)
    _apply_help_constraints(spec)
    return spec


def _apply_help_constraints(spec: ParamSpec) -> None:
    scalar = spec.item_kind if spec.kind == "list" else spec.kind
    match = _CHOICES_RE.search(spec.help)
    if match and scalar is not None:
        try:
            spec.choices = [_parse_scalar(scalar, _unquote(v.strip())) for v in match.group("values").split(",")
                            if v.strip()]
        except ParamError:
            spec.choices = None
    match = _RANGE_RE.search(spec.help)
    if match and scalar in ("int", "float"):
        lo, hi = match.group("lo"), match.group("hi")
        spec.minimum = float(lo) if lo and _FLOAT_RE.match(lo) else None
        spec.maximum = float(hi) if hi and _FLOAT_RE.match(hi) else None


def specs(parameters: Mapping[str, Mapping[str, Any]]) -> list[ParamSpec]:
    """Specs of all parameters, in the template's order."""
    return [spec_from_inspection(name, info) for name, info in parameters.items()]


def validate_form(fields: list[ParamSpec], form: Mapping[str, str], *, keep_blank: bool = False
                  ) -> tuple[dict[str, Any], dict[str, str]]:
    """Parse submitted text for every editable field: (values, errors by field name).

    ``keep_blank``: a blank field means "leave unchanged" (batch reruns, defaults) and is omitted.
    Fields the form did not send are omitted too; unknown names are ignored by construction.
    """
    values: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for spec in fields:
        if not spec.editable or spec.name not in form:
            continue
        raw = form[spec.name]
        if keep_blank and raw.strip() == "":
            continue
        try:
            values[spec.name] = spec.parse(raw)
        except ParamError as exc:
            errors[spec.name] = str(exc)
    return values, errors


def check_values(fields: list[ParamSpec], values: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
    """Check JSON values (API bodies, stored defaults): unknown or non-editable names are errors."""
    by_name = {spec.name: spec for spec in fields}
    checked: dict[str, Any] = {}
    errors: dict[str, str] = {}
    for name, value in values.items():
        spec = by_name.get(name)
        if spec is None or not spec.editable:
            errors[name] = "not an editable parameter of this template"
            continue
        try:
            checked[name] = spec.check(value)
        except ParamError as exc:
            errors[name] = str(exc)
    return checked, errors
