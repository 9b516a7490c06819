"""Typed template parameters: specs from papermill's inspection, checked by pydantic, parsed from form text.

papermill's inspection gives each parameter's name, annotation (``inferred_type_name``), default
(source text) and help comment. From them :func:`specs` builds a :class:`ParamSpec` per parameter:
kind from the annotation, else from the default's literal; enums and ranges from the help comment
(``# one of: a, b`` / ``# range: 0..10``); ``# (advanced) ...`` puts the field in the form's collapsed
section. Checking is pydantic's, in strict mode: each spec becomes an annotated type (``Literal`` for
choices, ``Field(ge, le)`` for ranges, finite floats, bounded text and lists) and a template's editable
parameters one model (:func:`parameters_model`). Form input is parsed strictly into JSON values —
never evaluated — so whatever a user types reaches papermill as data, which writes it as a Python literal.
"""

from __future__ import annotations

import ast
import json
import re
import typing
from collections.abc import Collection, Mapping
from functools import lru_cache
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter, ValidationError, create_model

#: Names nbreduce sets from the run itself when the template declares them (never user-editable).
RUN_PARAMETERS = ("data_file", "data_files", "run_number", "run_numbers", "rb_number", "instrument", "run_title",
                  "output_dir", "template_dir")

Kind = Literal["bool", "int", "float", "str", "list"]
ItemKind = Literal["bool", "int", "float", "str"]

MAX_TEXT = 10_000  # characters of one submitted value
MAX_ITEMS = 1_000  # items of one list
MAX_INT = 2**63 - 1
ADVANCED_MARK = "(advanced)"
_INT_RE = re.compile(r"^[+-]?[0-9]{1,19}$")
_FLOAT_RE = re.compile(r"^[+-]?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][+-]?[0-9]{1,3})?$")
_CHOICES_RE = re.compile(r"one of:\s*(?P<values>[^;#]+)", re.IGNORECASE)
_RANGE_RE = re.compile(
    r"range:\s*(?P<lo>[+-]?[0-9.eE+-]+)?\s*\.\.\s*(?P<hi>[+-]?[0-9.eE+-]*[0-9.])?", re.IGNORECASE)
_BOOL_TEXT = {"true": True, "false": False}
_SCALAR_TYPES: dict[str, type] = {"bool": bool, "int": int, "float": float, "str": str}
#: The strict, bounded pydantic type of each scalar kind.
_CHECKED: dict[str, Any] = {
    "bool": bool,
    "int": Annotated[int, Field(ge=-MAX_INT, le=MAX_INT)],
    "float": Annotated[float, Field(allow_inf_nan=False)],
    "str": Annotated[str, StringConstraints(max_length=MAX_TEXT, pattern=r"^[^\x00]*$")],
}
#: Names an annotation in a template may use; anything else makes the parameter unsupported in forms.
_ANNOTATION_NAMES = {"int": int, "float": float, "str": str, "bool": bool, "list": list, "List": list,
                     "Optional": typing.Optional, "typing": typing, "None": None}


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
    #: Set by nbreduce from the run (data file, run number...) or an instrument constant: shown, never editable.
    fixed: bool = False
    #: The template's type is not one a form can edit (dicts, objects): shown, never editable.
    unsupported: bool = False
    #: Shown in the form's collapsed "advanced" section (help comment starting with ``(advanced)``).
    advanced: bool = False

    @property
    def editable(self) -> bool:
        return not (self.fixed or self.unsupported)

    @property
    def type_label(self) -> str:
        label = f"list[{self.item_kind}]" if self.kind == "list" else self.kind
        return f"{label} | None" if self.optional else label

    # -- checking JSON values -------------------------------------------------------------------
    def annotation(self) -> Any:
        """The pydantic type of this parameter: kind, choices, range, bounds and optionality."""
        scalar_kind = (self.item_kind or "str") if self.kind == "list" else self.kind
        scalar: Any = _CHECKED[scalar_kind]
        if self.choices is not None:
            scalar = Literal[tuple(self.choices)]
        elif scalar_kind in ("int", "float") and (self.minimum is not None or self.maximum is not None):
            scalar = Annotated[scalar, Field(ge=self.minimum, le=self.maximum)]
        checked = Annotated[list[scalar], Field(max_length=MAX_ITEMS)] if self.kind == "list" else scalar
        return checked | None if self.optional else checked

    def check(self, value: Any) -> Any:
        """Strict type, enum and range check of a JSON value (form-parsed or from an API body)."""
        if value is None and not self.optional:
            raise ParamError("a value is required")
        try:
            return _adapter(self.model_dump_json(include=_TYPE_FIELDS)).validate_python(value, strict=True)
        except ValidationError as exc:
            raise ParamError(describe_errors(exc)) from None

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


_TYPE_FIELDS = {"kind", "item_kind", "optional", "choices", "minimum", "maximum"}


@lru_cache(maxsize=1024)
def _adapter(type_json: str) -> TypeAdapter:
    """Type adapters are costly to build and specs repeat: one per distinct type."""
    return TypeAdapter(ParamSpec(name="value", **json.loads(type_json)).annotation())


def describe_errors(exc: ValidationError, limit: int = 5) -> str:
    """pydantic's errors as one line of ``where: problem`` (``where`` left out for a bare value)."""
    parts = []
    for error in exc.errors()[:limit]:
        where = ".".join(str(p) for p in error.get("loc", ()))
        parts.append(f"{where}: {error['msg']}" if where else str(error["msg"]))
    return "; ".join(parts)


def parameters_model(fields: list[ParamSpec], name: str = "TemplateParameters") -> type[BaseModel]:
    """A strict pydantic model of a template's editable parameters (unknown names are errors)."""
    return _model(name, tuple(spec.model_dump_json(include={"name", *_TYPE_FIELDS}) for spec in fields
                              if spec.editable))


@lru_cache(maxsize=256)
def _model(name: str, specs_json: tuple[str, ...]) -> type[BaseModel]:
    fields = [ParamSpec.model_validate_json(text) for text in specs_json]
    return create_model(name, __config__=ConfigDict(strict=True, extra="forbid"),
                        **{spec.name: (spec.annotation(), None) for spec in fields})


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
    """(kind, item kind, optional) of a template's annotation such as ``list[int]`` or ``float | None``.

    The annotation is the template's own source (trusted like the rest of the template), evaluated with
    the few names a form can represent; typing's introspection does the rest.
    """
    try:
        hint = eval(annotation, {"__builtins__": {}}, dict(_ANNOTATION_NAMES))
    except Exception:
        return None, None, False
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    optional = len(args) < len(typing.get_args(hint))
    if optional:
        if len(args) != 1:
            return None, None, True
        hint = args[0]
    origin = typing.get_origin(hint)
    if hint is list or origin is list:
        [item] = typing.get_args(hint) or [None]
        item_kind = _kind_of_type(item)
        return "list", item_kind, optional
    return _kind_of_type(hint), None, optional


def _kind_of_type(hint: Any) -> str | None:
    return next((kind for kind, cls in _SCALAR_TYPES.items() if hint is cls), None)


def spec_from_inspection(name: str, info: Mapping[str, Any], fixed: bool = False) -> ParamSpec:
    """One :class:`ParamSpec` from papermill's ``{inferred_type_name, default, help}``."""
    annotation = str(info.get("inferred_type_name") or "None")
    help_text = str(info.get("help") or "").strip()
    advanced = help_text.lower().startswith(ADVANCED_MARK)
    if advanced:
        help_text = help_text[len(ADVANCED_MARK):].strip()
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
                     help=help_text, fixed=fixed or name in RUN_PARAMETERS, unsupported=kind is None,
                     advanced=advanced)
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


def specs(parameters: Mapping[str, Mapping[str, Any]], fixed: Collection[str] = ()) -> list[ParamSpec]:
    """Specs of all parameters, in the template's order; ``fixed`` names (instrument constants) are not editable."""
    return [spec_from_inspection(name, info, fixed=name in fixed) for name, info in parameters.items()]


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
    """Check JSON values (API bodies, stored defaults, requests from Kafka) against the template's model.

    Unknown or non-editable names are errors; a missing value means "the template's default".
    """
    model = parameters_model(fields)
    errors: dict[str, str] = {}
    try:
        checked = model.model_validate(dict(values))
    except ValidationError as exc:
        for error in exc.errors():
            name = str(error["loc"][0]) if error.get("loc") else "parameters"
            where = ".".join(str(p) for p in error["loc"][1:])
            message = "not an editable parameter of this template" if error["type"] == "extra_forbidden" \
                else (f"item {int(where) + 1}: " if where.isdigit() else f"{where}: " if where else "") + error["msg"]
            errors.setdefault(name, message)
        return {k: v for k, v in values.items() if k not in errors}, errors
    return {name: getattr(checked, name) for name in values}, {}
