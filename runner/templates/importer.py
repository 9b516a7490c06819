"""Existing ISIS reduction scripts -> nbreduce templates (``nbreduce template import``).

Two shapes of script exist. The legacy autoreduction service ran ``reduce.py`` from a folder
``NDX<INST>/user/scripts/autoreduction/``: it replaced the script's ``reduce_vars`` module (dicts
``standard_vars``, ``advanced_vars`` and ``variable_help``, keys often human-readable such as
``'Minimum Extents'``) with the run's values, then called ``main(input_file=..., output_dir=...)``.
FIA, its successor, keeps one ``reduce.py`` per instrument whose settings are top-level assignments
that the service rewrites as text before running the whole file.

The conversion moves only the settings and keeps the script as it is: every variable becomes one typed
line of the template's ``parameters`` cell (so the runner injects it and the rerun form edits it), a cell
rebuilds ``reduce_vars`` from those parameters with the original keys, the script body follows in cells
split at its top-level definitions, and a last cell calls ``main`` as the service did. What cannot be
expressed as parameters (computed settings, network downloads when the script runs, star imports of
unknown modules, a ``main`` the service could not call...) stays as code and is listed in the report:
nothing is dropped. Sources are read with :mod:`ast` and :mod:`tokenize`, never executed; the notebook is
built with :mod:`nbformat`.

The parameters cell is written for papermill's inspection, which the runner and the rerun form rely
on: it reads one ``name: annotation = value  # help`` per line, skips lines with two ``=`` and cuts the
value at the first ``#``, and accepts no ``|`` in annotations. Hence ``Optional[...]`` (imported at the
top of the cell), ``=`` and ``#`` escaped inside string values (``\\x3d``, ``\\x23``) and replaced in help
comments, and help collapsed to one line.
"""

from __future__ import annotations

import ast
import builtins
import hashlib
import io
import json
import keyword
import math
import pprint
import re
import shutil
import sys
import tokenize
import tomllib
import unicodedata
from collections import Counter
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook
from pydantic import BaseModel, Field

from runner.atomic import write_atomic
from runner.templates.params import ADVANCED_MARK, RUN_PARAMETERS
from runner.templates.registry import CONFIG_NAME, TEMPLATE_NAME

SCRIPT_NAME = "reduce.py"
SETTINGS_MODULE = "reduce_vars"
SETTINGS_NAME = f"{SETTINGS_MODULE}.py"
#: ``reduce_vars`` dicts that hold variables, and the section of the rerun form each one fills.
SECTIONS = {"standard_vars": "standard", "advanced_vars": "advanced"}
HELP_DICT = "variable_help"
#: The parameter naming this template's folder, where the helper modules copied from the legacy folder live.
TEMPLATE_DIR = "template_dir"
#: FIA reads the list of files a script wrote from this variable after running it: a result, not a setting.
FIA_RESULT = "output"
LEGACY_CALL = "main(input_file=data_file, output_dir=output_dir)"
DEFAULT_ENVIRONMENT = "mantid"
INSTRUMENT_RE = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")
_NDX_RE = re.compile(r"^NDX([A-Z][A-Z0-9_]{0,31})$", re.IGNORECASE)
HELP_LIMIT = 240  # characters of help in a parameter's comment (the full text stays in variable_help)

#: ISIS data file names, ``<prefix><run zero-padded to digits>.nxs``, from Mantid's ``instrument/Facilities.xml``
#: (the current ``zeropadding`` entry of each ISIS instrument; the facility default is 5 digits).
ISIS_FILE_NAMES: dict[str, tuple[str, int]] = {
    "ALF": ("ALF", 5), "ARGUS": ("ARGUS", 8), "CHRONUS": ("CHRONUS", 8), "CRISP": ("CRISP", 8),
    "EMU": ("EMU", 8), "ENGINX": ("ENGINX", 8), "GEM": ("GEM", 5), "HET": ("HET", 5), "HIFI": ("HIFI", 8),
    "HRPD": ("HRP", 5), "IMAT": ("IMAT", 8), "INES": ("INS", 5), "INTER": ("INTER", 8), "IRIS": ("IRIS", 8),
    "LARMOR": ("LARMOR", 8), "LET": ("LET", 8), "LOQ": ("LOQ", 8), "MAPS": ("MAP", 5), "MARI": ("MAR", 5),
    "MERLIN": ("MER", 5), "MUSR": ("MUSR", 8), "NIMROD": ("NIMROD", 8), "OFFSPEC": ("OFFSPEC", 8),
    "OSIRIS": ("OSIRIS", 8), "PEARL": ("PEARL", 8), "POLARIS": ("POLARIS", 8), "POLREF": ("POLREF", 8),
    "SANDALS": ("SLS", 5), "SANS2D": ("SANS2D", 8), "SURF": ("SURF", 8), "SXD": ("SXD", 5),
    "TOSCA": ("TSC", 5), "VESUVIO": ("VESUVIO", 8), "WISH": ("WISH", 8), "ZOOM": ("ZOOM", 8),
}
#: Top-level packages that come with Mantid (its Python API and its ``scripts/`` folder).
MANTID_PACKAGES = frozenset({"mantid", "mantidqt", "isis_powder", "sans", "Engineering", "Direct", "Diffraction",
                             "Inelastic", "Muon", "reduction_workflow", "SANS"})
#: The run's identity nbreduce injects (``RUN_PARAMETERS``) that an imported template declares: type and help.
IDENTITY: dict[str, tuple[str, str]] = {
    "data_file": ("str", "data file of the run (set by nbreduce)"),
    "run_number": ("int", "run number (set by nbreduce)"),
    "rb_number": ("str", "experiment (RB) number (set by nbreduce)"),
    "instrument": ("str", "instrument (set by nbreduce)"),
    "run_title": ("str", "run title (set by nbreduce)"),
    "output_dir": ("str", "folder that receives every output file; the kernel runs in it (set by nbreduce)"),
}
assert set(IDENTITY) <= set(RUN_PARAMETERS)
_IDENTITY_TYPES = {"str": str, "int": int}
#: Names the generated cells define: a parameter must not take them.
_NOTEBOOK_NAMES = {"Optional", "sys", "types", "os", "Path", SETTINGS_MODULE, *SECTIONS, HELP_DICT, TEMPLATE_DIR,
                   "HELPER_MODULES", "main", "web_var", FIA_RESULT}
#: Names a parameter cannot have: keywords, builtins (a parameter named ``list`` would break the script)
#: and the attributes of pydantic's BaseModel (the runner checks parameters with a model of these fields).
RESERVED = frozenset(keyword.kwlist) | frozenset(keyword.softkwlist) | frozenset(dir(builtins)) | frozenset(
    n for n in dir(BaseModel) if not n.startswith("_")) | frozenset(RUN_PARAMETERS) | frozenset(_NOTEBOOK_NAMES)

Level = Literal["error", "warning", "info"]
Section = Literal["standard", "advanced", "setting"]


class ConversionError(ValueError):
    """The source cannot be converted at all (missing, not Python 3, no instrument); nothing was written."""


# --------------------------------------------------------------------------------------------------
# The report
# --------------------------------------------------------------------------------------------------
class Finding(BaseModel):
    """Something a scientist must know about the conversion. ``error``: the template cannot run as it is;
    ``warning``: it runs but differs from the old service or depends on something outside the template."""

    level: Level
    file: str
    line: int | None = None
    message: str

    def __str__(self) -> str:
        return f"{self.file}{f':{self.line}' if self.line else ''}: {self.message}"


class SourceFile(BaseModel):
    name: str
    role: Literal["script", "settings", "helper"]
    sha256: str


class Variable(BaseModel):
    """One legacy variable and the parameter it became."""

    name: str = Field(description="identifier in the template")
    key: str = Field(description="original key in reduce_vars (or the FIA variable's own name)")
    section: Section
    annotation: str
    default: str = Field(description="Python literal of the default, as written in the parameters cell")
    help: str = ""
    editable: bool = True
    note: str = Field("", description="why the rerun form cannot edit it, or how the type was chosen")
    line: int | None = None

    @property
    def advanced(self) -> bool:
        return self.section == "advanced"


class ConversionReport(BaseModel):
    """What ``nbreduce template import`` made of a script: printed, and returned as JSON with ``--json``."""

    instrument: str
    source: str
    kind: Literal["legacy", "fia"]
    environment: str
    files: list[SourceFile]
    variables: list[Variable]
    helpers: list[str] = Field(default_factory=list, description="modules copied beside the notebook")
    call: str | None = Field(None, description="the last cell's call of main")
    findings: list[Finding] = Field(default_factory=list)
    template: str | None = Field(None, description="folder the template was written to")
    enabled: bool = False

    def of_level(self, level: Level) -> list[Finding]:
        return [f for f in self.findings if f.level == level]

    @property
    def runnable(self) -> bool:
        """No error: the generated notebook can run as it is (warnings may still need a look)."""
        return not self.of_level("error")

    def text(self) -> str:
        """The report for a terminal."""
        kind = "legacy autoreduction script" if self.kind == "legacy" else "top-level script, FIA style"
        out = [f"{self.instrument}: imported from {self.source} ({kind})",
               "  files: " + ", ".join(f"{f.name} ({f.role}, sha256 {f.sha256[:12]})" for f in self.files)]
        counts = Counter(v.section for v in self.variables)
        summary = ", ".join(f"{n} {'settings' if s == 'setting' else s}" for s, n in counts.items()) or "none"
        out.append(f"  parameters: {summary}")
        width = max((len(v.name) for v in self.variables), default=0)
        for v in self.variables:
            origin = "" if v.key == v.name else f"  <- {v.key!r}"
            flags = (" (advanced)" if v.advanced else "") + ("" if v.editable else " (not editable in forms)")
            out.append(f"    {v.name:<{width}}  {v.annotation} = {_short(v.default, 40)}{flags}{origin}")
        if self.helpers:
            out.append("  helper modules copied beside the notebook: " + ", ".join(self.helpers))
        out.append(f"  last cell: {self.call or '(none)'}")
        out.append(f"  environment: {self.environment}")
        if self.template:
            state = "enabled" if self.enabled else "disabled: check it, then set enabled = true in instrument.toml"
            out.append(f"  wrote {self.template}/{TEMPLATE_NAME} and {CONFIG_NAME} ({state})")
        for level, title in (("error", "errors (the template cannot run until they are fixed)"),
                             ("warning", "warnings (check these)"), ("info", "notes")):
            found = self.of_level(level)  # type: ignore[arg-type]
            if found:
                out.append(f"{title}:")
                out.extend(f"  - {f}" for f in found)
        return "\n".join(out)


# --------------------------------------------------------------------------------------------------
# Names, types and literals
# --------------------------------------------------------------------------------------------------
def identifier(key: str, taken: Collection[str] = ()) -> str:
    """A Python identifier for a legacy key: ``'Minimum Extents'`` -> ``minimum_extents``, ``'bkgd-range-min'`` ->
    ``bkgd_range_min``, ``'hardmaskOnly'`` -> ``hardmask_only``, ``'λ min'`` -> ``lamda_min``.

    Keywords, builtins and the notebook's own names get a trailing ``_``; a leading digit a ``var_`` prefix
    (never a leading underscore: pydantic, which checks parameters, refuses those fields); names in ``taken``
    a ``_2``, ``_3``... suffix.
    """
    parts: list[str] = []
    for char in unicodedata.normalize("NFKD", key):
        category = unicodedata.category(char)
        if char.isascii() and char.isalnum():
            parts.append(char)
        elif category.startswith("M"):
            continue  # combining accent of a decomposed letter: Å -> A
        elif category.startswith("L"):  # a letter without ASCII form: its Unicode name (GREEK ... LAMDA)
            parts.append(" " + re.sub(r"[^0-9A-Za-z]+", " ", unicodedata.name(char, "").split(" ")[-1]) + " ")
        else:
            parts.append(" ")
    text = re.sub(r"(?<=[a-z0-9])(?=[A-Z])", " ", "".join(parts))  # camelCase -> camel Case
    name = "_".join(text.lower().split()) or "variable"
    if name[0].isdigit():
        name = f"var_{name}"
    if name in RESERVED:
        name += "_"
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name}_{n}"
    return candidate


def annotate(value: Any) -> tuple[str, bool, str]:
    """(annotation, editable in the rerun form, note) of a legacy value.

    None says nothing about the type: it becomes ``Optional[str]`` (the old web app offered such
    variables as text too). Lists of one scalar type are typed (ints and floats together: ``list[float]``),
    an empty list as numbers like the old web app did (``list[float]`` accepts whole numbers too); nested
    or mixed lists, tuples and dicts keep a bare type that forms cannot edit.
    """
    if value is None:
        return "Optional[str]", True, "None in the script: text, or None when left empty"
    for cls in (bool, int, float, str):
        if type(value) is cls:
            return cls.__name__, True, ""
    if isinstance(value, list):
        kinds = {type(item) for item in value}
        if not kinds:
            return "list[float]", True, "empty in the script: a list of numbers, as the old web app assumed"
        if len(kinds) == 1 and kinds <= {bool, int, float, str}:
            return f"list[{kinds.pop().__name__}]", True, ""
        if kinds <= {int, float}:
            return "list[float]", True, ""
        nested = any(isinstance(item, (list, tuple, dict, set)) for item in value)
        return "list", False, f"{'nested' if nested else 'mixed'} list: not editable in the rerun form"
    name = type(value).__name__
    return name, False, f"{name}: not editable in the rerun form"


def literal_source(value: Any) -> str | None:
    """The value as a one-line Python literal papermill's inspection reads back, or None if it has none.

    ``=`` and ``#`` can only occur inside string literals of a ``repr``; they are written as escapes so that
    papermill neither skips the line (two ``=``) nor cuts the value at the ``#``.
    """
    text = repr(value).replace("=", "\\x3d").replace("#", "\\x23")
    try:
        ok = _same(ast.literal_eval(text), value)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return None
    return text if ok else None


def _same(a: Any, b: Any) -> bool:
    """Equal with the same types all the way down (``1 == 1.0 == True`` is not good enough for a default)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, float):
        return math.isfinite(a) and a == b
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    return a == b


def comment_text(text: str, limit: int = HELP_LIMIT) -> str:
    """Help text as one line papermill reads whole: whitespace collapsed, ``=`` replaced (papermill skips a line
    with two), and the rerun form's ``one of:``/``range:`` syntax defused (legacy help was not written for it)."""
    line = " ".join(str(text).split()).replace("=", "\uff1d")
    line = re.sub(r"(one of|range)\s*:", r"\1", line, flags=re.IGNORECASE)
    if line.startswith("type:"):  # papermill would read it as a type comment
        line = "type " + line[5:]
    return line if len(line) <= limit else line[: limit - 1].rstrip() + "…"


def _short(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def file_name_of(instrument: str) -> tuple[str, int] | None:
    """(file prefix, run digits) of an ISIS instrument's data files, if known."""
    return ISIS_FILE_NAMES.get(instrument)


# --------------------------------------------------------------------------------------------------
# Reading sources (never executing them)
# --------------------------------------------------------------------------------------------------
@dataclass
class Source:
    """A Python file read for conversion: text with normalised newlines, its lines, comments by line, syntax tree."""

    path: Path
    name: str
    data: bytes
    text: str
    lines: list[str]
    tree: ast.Module
    comments: dict[int, str]

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()

    def segment(self, first: int, last: int) -> str:
        return "\n".join(self.lines[first - 1:last])

    def expression(self, node: ast.AST) -> str:
        return ast.get_source_segment(self.text, node) or ast.unparse(node)


def read_source(path: Path, name: str | None = None) -> Source:
    """Read and parse one file; a syntax error (Python 2 scripts are common) is a :class:`ConversionError`."""
    name = name or path.name
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ConversionError(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        encoding, _ = tokenize.detect_encoding(io.BytesIO(data).readline)
        text = data.decode(encoding)
    except (SyntaxError, UnicodeDecodeError, LookupError) as exc:
        raise ConversionError(f"{name}: cannot decode the file ({exc})") from None
    text = text.lstrip("\ufeff").replace("\r\n", "\n").replace("\r", "\n")
    try:
        tree = ast.parse(text, filename=name)
    except SyntaxError as exc:
        hint = (" — it looks like Python 2; nbreduce runs Python 3: port it (e.g. with 2to3) and import again"
                if re.search(r"print|Missing parentheses|except .*,", f"{exc.msg} {exc.text or ''}") else "")
        raise ConversionError(f"{name} line {exc.lineno}: {exc.msg}{hint}") from None
    except ValueError as exc:  # null bytes
        raise ConversionError(f"{name}: {exc}") from None
    comments: dict[int, str] = {}
    try:
        for token in tokenize.generate_tokens(io.StringIO(text).readline):
            if token.type == tokenize.COMMENT:
                comments[token.start[0]] = token.string.lstrip("#").strip()
    except (tokenize.TokenError, SyntaxError):
        pass  # comments are only help text
    return Source(path=path, name=name, data=data, text=text, lines=text.split("\n"), tree=tree, comments=comments)


def _span(stmt: ast.stmt) -> tuple[int, int]:
    first = min([stmt.lineno, *(d.lineno for d in getattr(stmt, "decorator_list", ()))])
    return first, stmt.end_lineno or stmt.lineno


def _scope_nodes(node: ast.AST) -> Iterable[ast.AST]:
    """Nodes of ``node`` in its own scope: nested functions, classes, lambdas and comprehensions are not entered."""
    stack = [node]
    while stack:  # depth first, in source order
        current = stack.pop()
        yield current
        inner = []
        for child in ast.iter_child_nodes(current):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                yield child  # its name is bound here; its body is another scope
            elif not isinstance(child, (ast.Lambda, ast.ListComp, ast.SetComp, ast.DictComp, ast.GeneratorExp)):
                inner.append(child)
        stack += reversed(inner)


def bound_names(stmt: ast.stmt) -> list[str]:
    """Names a top-level statement binds at module level (assignments, imports, definitions, loop targets...)."""
    if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
        return [stmt.name]  # its body is another scope
    names: list[str] = []
    for node in _scope_nodes(stmt):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            names.append(node.id)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.append(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names += [(a.asname or a.name).split(".")[0] for a in node.names if a.name != "*"]
        elif isinstance(node, (ast.ExceptHandler, ast.MatchAs, ast.MatchStar)) and node.name:
            names.append(node.name)
    return names


def _is_docstring(stmt: ast.stmt) -> bool:
    return isinstance(stmt, ast.Expr) and isinstance(stmt.value, ast.Constant) and isinstance(stmt.value.value, str)


def _literal(node: ast.AST) -> tuple[bool, Any]:
    try:
        value = ast.literal_eval(node)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        return False, None
    return literal_source(value) is not None, value


def _has_call(node: ast.AST) -> bool:
    return any(isinstance(n, (ast.Call, ast.Await, ast.Yield, ast.YieldFrom, ast.NamedExpr)) for n in ast.walk(node))


def _single_target(stmt: ast.stmt) -> str | None:
    """The name of ``name = value`` / ``name: T = value``, else None."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Name):
        return stmt.targets[0].id
    if isinstance(stmt, ast.AnnAssign) and stmt.value is not None and isinstance(stmt.target, ast.Name):
        return stmt.target.id
    return None


def _first_line(source: Source, node: ast.AST) -> str:
    return _short(source.lines[node.lineno - 1].strip(), 70)


# --------------------------------------------------------------------------------------------------
# reduce_vars.py
# --------------------------------------------------------------------------------------------------
@dataclass
class Entry:
    """One key of ``standard_vars``/``advanced_vars``: converted to a parameter, or kept as code."""

    key: str | None
    value: Any
    literal: bool
    source: str  # the entry's code as written (``**other`` for a spread)
    line: int
    comment: str = ""
    name: str | None = None  # the parameter, once named


@dataclass
class SettingsItem:
    """A top-level statement of ``reduce_vars.py``, in order: a section dict literal, one ``section['key'] = value``,
    the help dict, or code kept as it is."""

    kind: Literal["section", "entry", "help", "code"]
    target: str | None
    line: int
    source: str = ""
    entries: list[Entry] = field(default_factory=list)


@dataclass
class SettingsModule:
    items: list[SettingsItem]
    help: dict[str, dict[str, str]]
    bound: list[str]
    findings: list[Finding]
    flat_help: bool = False  # variable_help is {key: help} for both sections, not {section: {key: help}}

    def entries(self, section: str) -> list[Entry]:
        """The entries that hold the section's values once the module has run: those of its last (re)assignment
        and the ``section['key'] = value`` after it, the last one of each key."""
        start = max((i for i, item in enumerate(self.items) if item.target == section and item.kind != "entry"),
                    default=-1)
        live: dict[str, Entry] = {}
        for item in self.items[max(start, 0):]:
            if item.target == section and item.kind in ("section", "entry"):
                for entry in item.entries:
                    if entry.key is not None:
                        live[entry.key] = entry  # an existing key keeps its place, as in a dict
        return list(live.values())


def _empty_container(node: ast.AST | None) -> bool:
    """``{}``, ``dict()`` or ``(collections.)OrderedDict()``: a section filled by ``section['key'] = value`` below."""
    if isinstance(node, ast.Dict):
        return not node.keys
    if isinstance(node, ast.Call) and not node.args and not node.keywords:
        func = node.func
        return (func.id if isinstance(func, ast.Name) else func.attr if isinstance(func, ast.Attribute) else "") \
            in ("dict", "OrderedDict")
    return False


def _subscript_entry(stmt: ast.stmt) -> tuple[str, ast.expr, ast.expr] | None:
    """(section, key node, value node) of ``standard_vars['key'] = value``."""
    if isinstance(stmt, ast.Assign) and len(stmt.targets) == 1 and isinstance(stmt.targets[0], ast.Subscript):
        target = stmt.targets[0]
        if isinstance(target.value, ast.Name) and target.value.id in SECTIONS:
            return target.value.id, target.slice, stmt.value
    return None


def read_settings(source: Source) -> SettingsModule:
    """The variables, help and any other code of a ``reduce_vars.py``."""
    findings: list[Finding] = []
    items: list[SettingsItem] = []
    help_value: Any = None
    name = source.name
    for stmt in source.tree.body:
        target = _single_target(stmt)
        value = getattr(stmt, "value", None)
        first, last = _span(stmt)
        code = source.segment(first, last)
        if target in SECTIONS and isinstance(value, ast.Dict) and value.keys:
            entries = _entries(source, value, target, findings)
            items.append(SettingsItem("section", target, stmt.lineno, entries=entries))
            continue
        subscript = _subscript_entry(stmt)
        if subscript is not None:
            section, key_node, value_node = subscript
            key_ok, key = _literal(key_node)
            ok, parsed = _literal(value_node)
            if key_ok and isinstance(key, str):
                if not ok:
                    findings.append(Finding(level="warning", file=name, line=stmt.lineno, message=f"{section}[{key!r}] "
                                            f"= `{_short(source.expression(value_node), 60)}` is computed: kept as "
                                            "code, not a parameter"))
                entry = Entry(key, parsed, ok, code, stmt.lineno, source.comments.get(last, ""))
                items.append(SettingsItem("entry", section, stmt.lineno, source=code, entries=[entry]))
                continue
        if target == HELP_DICT and value is not None:
            ok, parsed = _literal(value)
            if ok and isinstance(parsed, dict):
                help_value = parsed
                items.append(SettingsItem("help", target, stmt.lineno, source=pprint.pformat(
                    parsed, width=110, sort_dicts=False)))
                continue
        if _is_docstring(stmt):
            continue
        if target in SECTIONS:
            if not _empty_container(value):
                findings.append(Finding(level="warning", file=name, line=stmt.lineno, message=f"{target} is not a "
                                        "dict literal: kept as code, its variables are not parameters"))
        elif target == HELP_DICT:
            findings.append(Finding(level="warning", file=name, line=stmt.lineno,
                                    message=f"{HELP_DICT} is not a literal: kept as code, parameters have no help"))
        elif not (isinstance(stmt, (ast.Import, ast.ImportFrom)) and all(a.name == "collections" or
                                                                         a.name == "OrderedDict" for a in stmt.names)):
            what = "star import: its names are not copied onto the rebuilt module" if any(
                isinstance(n, ast.ImportFrom) and any(a.name == "*" for a in n.names) for n in ast.walk(stmt)) \
                else "kept as code (it runs before the settings are rebuilt)"
            findings.append(Finding(level="warning", file=name, line=stmt.lineno,
                                    message=f"`{_first_line(source, stmt)}`: {what}"))
        items.append(SettingsItem("code", target, stmt.lineno, source=code))
    module = SettingsModule(items=items, help=_help_by_section(help_value), findings=findings,
                            flat_help=isinstance(help_value, dict) and not any(
                                isinstance(help_value.get(s), dict) for s in SECTIONS),
                            bound=list(dict.fromkeys(n for s in source.tree.body if not _is_docstring(s)
                                                     for n in bound_names(s))))
    for section in SECTIONS:
        live = {id(e) for e in module.entries(section)}
        dead = [e for item in items if item.target == section for e in item.entries if id(e) not in live and e.key]
        for entry in dead:
            findings.append(Finding(level="info", file=name, line=entry.line, message=f"{section}[{entry.key!r}] is "
                                    "replaced further down (as in Python, the last value is the one converted)"))
    return module


def _entries(source: Source, node: ast.Dict, target: str, findings: list[Finding]) -> list[Entry]:
    entries: list[Entry] = []
    seen: dict[str, int] = {}
    for key_node, value_node in zip(node.keys, node.values, strict=True):
        line = value_node.lineno
        comment = source.comments.get(value_node.end_lineno or line, "")
        if key_node is None:
            entries.append(Entry(None, None, False, f"**{source.expression(value_node)}", line))
            findings.append(Finding(level="warning", file=source.name, line=line,
                                    message=f"{target}: `**{source.expression(value_node)}` merges computed "
                                            "variables: kept as code, not parameters"))
            continue
        key_ok, key = _literal(key_node)
        if not key_ok or not isinstance(key, str):
            code = f"{source.expression(key_node)}: {source.expression(value_node)}"
            entries.append(Entry(None, None, False, code, line))
            findings.append(Finding(level="warning", file=source.name, line=line,
                                    message=f"{target}: key {source.expression(key_node)} is not a string: "
                                            "kept as code, not a parameter"))
            continue
        if key in seen:
            findings.append(Finding(level="warning", file=source.name, line=line,
                                    message=f"{target}: key {key!r} appears twice (also line {seen[key]}); the last "
                                            "value wins, as in Python"))
        seen[key] = line
        ok, value = _literal(value_node)
        code = f"{key!r}: {source.expression(value_node)}"
        if not ok:
            findings.append(Finding(level="warning", file=source.name, line=line,
                                    message=f"{target}[{key!r}] = `{_short(source.expression(value_node), 60)}` is "
                                            "computed: kept as code, not a parameter"))
        entry = Entry(key, value, ok, code, line, comment)
        # a dict literal keeps a repeated key where it first appeared, with its last value
        at = next((i for i, e in enumerate(entries) if e.key == key), None)
        if at is None:
            entries.append(entry)
        else:
            entries[at] = entry
    return entries


def _help_by_section(value: Any) -> dict[str, dict[str, str]]:
    """``variable_help`` as ``{section dict: {key: help}}``; a flat ``{key: help}`` applies to every section."""
    if not isinstance(value, dict):
        return {}
    if any(isinstance(value.get(s), dict) for s in SECTIONS):
        return {s: {str(k): str(v) for k, v in (value.get(s) or {}).items()} for s in SECTIONS}
    flat = {str(k): str(v) for k, v in value.items() if not isinstance(v, dict)}
    return {s: flat for s in SECTIONS}


# --------------------------------------------------------------------------------------------------
# reduce.py
# --------------------------------------------------------------------------------------------------
@dataclass
class Import:
    module: str  # full dotted name
    line: int
    star: bool

    @property
    def top(self) -> str:
        return self.module.split(".")[0]


def imports_of(tree: ast.Module) -> list[Import]:
    """Absolute imports anywhere in a module (functions import helpers too)."""
    found: list[Import] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(a.name, node.lineno, False) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append(Import(node.module, node.lineno, any(a.name == "*" for a in node.names)))
    return found


def _imports_of_file(path: Path) -> list[Import]:
    try:
        return imports_of(ast.parse(path.read_bytes()))
    except (SyntaxError, ValueError):
        return []  # reported when the helper is copied


def local_module(folder: Path, name: str) -> Path | None:
    """``name.py`` or the package ``name/`` in ``folder``."""
    if (folder / f"{name}.py").is_file():
        return folder / f"{name}.py"
    if (folder / name / "__init__.py").is_file():
        return folder / name
    return None


_NETWORK_CALLS = {"urlopen", "urlretrieve", "download", "wget"}  # ScriptRepository.download, urllib, wget
_HTTP_MODULES = {"requests", "httpx", "urllib", "urllib3", "urllib2"}
_HTTP_VERBS = {"get", "post", "put", "head", "request", "stream", "urlopen", "urlretrieve"}


def _network_call(call: ast.Call) -> bool:
    func = call.func
    if isinstance(func, ast.Name):
        return func.id in _NETWORK_CALLS
    if isinstance(func, ast.Attribute):
        if func.attr in _NETWORK_CALLS:
            return True
        base = func.value
        while isinstance(base, ast.Attribute):
            base = base.value
        return isinstance(base, ast.Name) and base.id in _HTTP_MODULES and func.attr in _HTTP_VERBS
    return False


def _module_level_calls(tree: ast.Module) -> Iterable[ast.Call]:
    """Calls that run when the module runs: not those in the bodies of its functions (or lambdas)."""
    for stmt in tree.body:
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        stack: list[ast.AST] = [stmt]
        while stack:
            node = stack.pop()
            if isinstance(node, ast.Call):
                yield node
            stack += [c for c in ast.iter_child_nodes(node)
                      if not isinstance(c, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))]


def network_findings(source: Source) -> list[Finding]:
    """Downloads that happen every time the script runs: directly, or through a function of the script."""
    downloading = {f.name for f in source.tree.body if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                   and any(isinstance(n, ast.Call) and _network_call(n) for n in ast.walk(f))}
    findings = []
    for call in _module_level_calls(source.tree):
        named = call.func.id if isinstance(call.func, ast.Name) else None
        if _network_call(call) or named in downloading:
            url = next((a.value for a in ast.walk(call) if isinstance(a, ast.Constant) and isinstance(a.value, str)
                        and "://" in a.value), None)
            what = f" ({_short(url, 90)})" if url else ""
            findings.append(Finding(level="warning", file=source.name, line=call.lineno,
                                    message=f"downloads from the network every time it runs{what}: each run then "
                                            "depends on that server; put the file in the template's folder instead"))
    return findings


def _main_guard(stmt: ast.stmt) -> bool:
    if not isinstance(stmt, ast.If) or not isinstance(stmt.test, ast.Compare) or len(stmt.test.ops) != 1:
        return False
    sides = [stmt.test.left, *stmt.test.comparators]
    return isinstance(stmt.test.ops[0], ast.Eq) and any(isinstance(s, ast.Name) and s.id == "__name__" for s in sides) \
        and any(isinstance(s, ast.Constant) and s.value == "__main__" for s in sides)


def main_call(main: ast.FunctionDef | ast.AsyncFunctionDef | None, file: str) -> tuple[str | None, list[Finding]]:
    """The last cell's call of ``main``, as the autoreduction service made it: ``main(input_file=, output_dir=)``."""
    if main is None:
        return None, [Finding(level="error", file=file, message="no top-level main(): the autoreduction service "
                              "called main(input_file, output_dir); the last cell must be written by hand")]
    args = main.args
    signature = f"main({ast.unparse(args)})"
    positional = [a.arg for a in args.posonlyargs + args.args]
    required = positional[:len(positional) - len(args.defaults)]
    required += [a.arg for a, d in zip(args.kwonlyargs, args.kw_defaults, strict=True) if d is None]
    keywordable = {a.arg for a in args.args + args.kwonlyargs}
    wanted = {"input_file", "output_dir"}
    if isinstance(main, ast.AsyncFunctionDef):
        return None, [Finding(level="error", file=file, line=main.lineno,
                              message=f"async {signature}: the service never awaited it; write the last cell by hand")]
    if (wanted <= keywordable or args.kwarg) and not (set(required) - wanted) \
            and not wanted & {a.arg for a in args.posonlyargs}:
        findings = [] if wanted <= keywordable else [Finding(
            level="warning", file=file, line=main.lineno,
            message=f"{signature} receives input_file= and output_dir= through **{args.kwarg.arg} as the service "
                    "passed them: check that it reads those names")]  # type: ignore[union-attr]
        return LEGACY_CALL, findings
    if len(required) == 2 and len(positional) >= 2 and not args.kwonlyargs:
        return "main(data_file, output_dir)", [Finding(
            level="warning", file=file, line=main.lineno,
            message=f"{signature}: called with the data file and output folder as positional arguments "
                    f"({required[0]}, {required[1]}); the service passed input_file= and output_dir=, which it "
                    "refuses")]
    return None, [Finding(level="error", file=file, line=main.lineno,
                          message=f"{signature} cannot be called as the service called it (main(input_file=..., "
                                  "output_dir=...)): the last cell must be written by hand")]


def _absolute_paths(source: Source) -> list[tuple[int, str]]:
    paths: dict[str, int] = {}
    # in an f-string only the leading text is a path's start: f"{folder}/file.csv" is relative to something
    inner = {id(v) for n in ast.walk(source.tree) if isinstance(n, ast.JoinedStr) for v in n.values[1:]}
    for node in ast.walk(source.tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in inner:
            text = node.value.strip()
            if re.match(r"^/[A-Za-z0-9_.~-]+(/[^\s]*)?$", text) and len(text) > 2:
                paths.setdefault(text, node.lineno)
    return sorted(((line, path) for path, line in paths.items()))


# --------------------------------------------------------------------------------------------------
# The conversion
# --------------------------------------------------------------------------------------------------
@dataclass
class Setting:
    """A top-level literal assignment of a FIA script that became a parameter (or was bound to the run)."""

    stmt: ast.stmt
    name: str
    value: Any
    lead: list[str]
    comment: str
    identity: bool = False  # bound to nbreduce's parameter of the same name (e.g. output_dir = "/output")


@dataclass
class Conversion:
    """A planned template: the report, the notebook, the helper files to copy and the instrument.toml text."""

    report: ConversionReport
    notebook: nbformat.NotebookNode
    helpers: dict[str, Path]
    config: dict[str, Any]


def locate(source: Path) -> tuple[Path, Path]:
    """(script, folder) of a SOURCE argument: a legacy folder holding reduce.py, or one script file."""
    source = Path(source).expanduser()
    if source.is_dir():
        script = source / SCRIPT_NAME
        if not script.is_file():
            raise ConversionError(f"{source} has no {SCRIPT_NAME}")
        return script.resolve(), source.resolve()
    if source.is_file():
        return source.resolve(), source.resolve().parent
    raise ConversionError(f"{source} does not exist")


def instrument_of(script: Path) -> str | None:
    """The instrument of a script, from its path: ``NDXMARI/user/scripts/autoreduction/`` or ``MARI/reduce.py``."""
    for part in reversed(script.parent.parts):
        match = _NDX_RE.match(part)
        if match:
            return match.group(1).upper()
    return script.parent.name if INSTRUMENT_RE.match(script.parent.name) else None


def convert(source: Path, instrument: str | None = None, environment: str = DEFAULT_ENVIRONMENT, *,
            known_environments: Collection[str] | None = None) -> Conversion:
    """Plan the template for ``source`` (nothing is written): see :func:`write_template`."""
    script_path, folder = locate(source)
    name = (instrument or instrument_of(script_path) or "").upper()
    if not INSTRUMENT_RE.match(name):
        raise ConversionError(f"cannot tell the instrument of {script_path} from its path: give --instrument"
                              if not instrument else f"invalid instrument name {instrument!r} (A-Z, 0-9, _)")
    if not re.match(r"^[A-Za-z][A-Za-z0-9_-]{0,39}$", environment):
        raise ConversionError(f"invalid environment name {environment!r}")
    script = read_source(script_path, SCRIPT_NAME if script_path.name == SCRIPT_NAME else script_path.name)
    findings: list[Finding] = []
    imports = imports_of(script.tree)
    imports_settings = any(i.top == SETTINGS_MODULE for i in imports)
    settings_path = folder / SETTINGS_NAME
    use_settings = settings_path.is_file() and (source.is_dir() or imports_settings) and settings_path != script_path
    settings_source = read_source(settings_path) if use_settings else None
    settings = read_settings(settings_source) if settings_source else None
    main = next((s for s in reversed(script.tree.body) if isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef))
                 and s.name == "main"), None)
    kind: Literal["legacy", "fia"] = "legacy" if (settings or imports_settings or main) else "fia"
    files = [SourceFile(name=script.name, role="script", sha256=script.sha256)]
    if settings is not None and settings_source is not None:
        files.append(SourceFile(name=SETTINGS_NAME, role="settings", sha256=settings_source.sha256))
        findings += settings.findings
        if not imports_settings:
            findings.append(Finding(level="warning", file=script.name, message=f"does not import {SETTINGS_MODULE}: "
                                    "its variables became parameters but the script does not read them"))
    elif imports_settings:
        findings.append(Finding(level="error", file=script.name, line=next(i.line for i in imports
                                                                            if i.top == SETTINGS_MODULE),
                                message=f"imports {SETTINGS_MODULE} but there is no {SETTINGS_NAME} beside it"))

    helpers, helper_findings = _helpers(script, folder, imports)
    findings += helper_findings
    for rel, path in helpers.items():
        if path.is_file():
            files.append(SourceFile(name=rel, role="helper", sha256=hashlib.sha256(path.read_bytes()).hexdigest()))
    helper_imports = [i for path in helpers.values() for module in (path.rglob("*.py") if path.is_dir() else [path])
                      for i in _imports_of_file(module)]
    findings += _import_findings(script, imports, folder, environment, helper_imports)
    findings += network_findings(script)
    findings += _script_findings(script, kind)
    if known_environments is not None and environment not in known_environments:
        findings.append(Finding(level="warning", file=CONFIG_NAME, message=f"environment {environment!r} is not "
                                f"defined (known: {', '.join(sorted(known_environments)) or 'none'}): the runner "
                                "fails the template until it is built"))

    top_names = {n for s in script.tree.body for n in bound_names(s)}
    uses_file = any(isinstance(n, ast.Name) and n.id == "__file__" for n in ast.walk(script.tree))
    if uses_file:
        findings.append(Finding(level="info", file=script.name, message="uses __file__: the notebook sets it to "
                                f"{SCRIPT_NAME} in the template's folder, where helper modules are copied"))
    variables: list[Variable] = []
    taken = set(top_names) | set(settings.bound if settings else ())  # kept code of reduce_vars runs in the notebook
    if settings is not None:
        for section, label in SECTIONS.items():
            for entry in settings.entries(section):
                if entry.key is None or not entry.literal:
                    continue
                entry.name = identifier(entry.key, taken)
                taken.add(entry.name)
                variables.append(_variable(entry, label, settings.help.get(section, {})))  # type: ignore[arg-type]
        keys = {section: {e.key for e in settings.entries(section)} for section in SECTIONS}
        every = set().union(*keys.values())
        orphans = {(key, "any section" if settings.flat_help else section)
                   for section, helps in settings.help.items() for key in helps
                   if key not in (every if settings.flat_help else keys[section])}
        for key, where in sorted(orphans):
            findings.append(Finding(level="info", file=SETTINGS_NAME, message=f"{HELP_DICT} has help for {key!r}, "
                                    f"which is not a variable of {where}"))
    fia_settings: list[Setting] = []
    if kind == "fia":
        fia_settings, setting_findings = fia_settings_of(script)
        findings += setting_findings
        for s in fia_settings:
            if not s.identity:
                variables.append(_fia_variable(s))
        findings.append(Finding(level="info", file=script.name, message="no main() and no reduce_vars (FIA style): "
                                "the literal assignments before the script's logic became parameters; the rest runs "
                                "as it is, top to bottom"))
    whole = [v.name for v in variables if v.annotation in ("int", "list[int]")]
    if whole:
        findings.append(Finding(level="info", file=SETTINGS_NAME if settings else script.name, message="typed as whole "
                                "numbers from their values (the old web app also took decimals): change the "
                                "annotation to float where a decimal makes sense: " + ", ".join(whole)))
    empty = [v.name for v in variables if v.default == "[]"]
    if empty:
        findings.append(Finding(level="info", file=SETTINGS_NAME if settings else script.name, message="empty lists "
                                "typed as lists of numbers, as the old web app assumed: change the annotation to "
                                "list[str] where they hold text: " + ", ".join(empty)))
    call, call_findings = (main_call(main, script.name) if kind == "legacy" else (None, []))
    findings += call_findings

    fixed = file_name_of(name)
    needs_dir = bool(helpers) or uses_file
    report = ConversionReport(instrument=name, source=str(folder if source.is_dir() else script_path),
                              kind=kind, environment=environment, files=files, variables=variables,
                              helpers=sorted(helpers), call=call, findings=findings)
    notebook = build_notebook(report, script, settings, fia_settings, needs_dir=needs_dir, uses_file=uses_file)
    config: dict[str, Any] = {
        "name": name,
        "description": f"{name} reduction imported from {_described(script_path, folder, kind)}",
        "enabled": False,
        "environment": environment,
    }
    if fixed:
        config["file_prefix"], config["run_digits"] = fixed
    return Conversion(report=report, notebook=notebook, helpers=helpers, config=config)


def _described(script: Path, folder: Path, kind: str) -> str:
    parts = script.parts
    ndx = next((i for i, p in enumerate(parts) if _NDX_RE.match(p)), None)
    where = "/".join(parts[ndx:-1]) if ndx is not None else "/".join(parts[-3:-1])
    what = "legacy autoreduction script" if kind == "legacy" else "script"
    return f"{what} {where}/{script.name}"


def _variable(entry: Entry, section: Section, helps: dict[str, str]) -> Variable:
    assert entry.key is not None and entry.name is not None
    annotation, editable, note = annotate(entry.value)
    text = helps.get(entry.key) or entry.comment
    return Variable(name=entry.name, key=entry.key, section=section, annotation=annotation,
                    default=literal_source(entry.value) or "None", help=" ".join(text.split()), editable=editable,
                    note=note, line=entry.line)


def _fia_variable(setting: Setting) -> Variable:
    annotation, editable, note = annotate(setting.value)
    return Variable(name=setting.name, key=setting.name, section="setting", annotation=annotation,
                    default=literal_source(setting.value) or "None", help=setting.comment, editable=editable,
                    note=note, line=setting.stmt.lineno)


def fia_settings_of(script: Source) -> tuple[list[Setting], list[Finding]]:
    """A FIA script's settings: literal ``name = value`` at module level before its logic starts.

    The logic starts at the first top-level statement that is not an import, a definition, a docstring or an
    assignment free of calls. A setting must be bound only once at module level, alone on its lines and not
    start with ``_``; FIA's result list ``output`` is not one. A setting named like the run's identity
    (``output_dir = "/output"``) with the identity's type is bound to nbreduce's value.
    """
    body = script.tree.body
    bindings = Counter(n for s in body for n in bound_names(s))
    lines_used = Counter(line for s in body for line in range(_span(s)[0], _span(s)[1] + 1))
    findings: list[Finding] = []
    settings: list[Setting] = []
    prev_end = 0
    logic_started = False
    late: list[str] = []
    for stmt in body:
        first, last = _span(stmt)
        lead_range = (prev_end + 1, first - 1)
        prev_end = last
        target = _single_target(stmt)
        if not logic_started and not (
                isinstance(stmt, (ast.Import, ast.ImportFrom, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
                or _is_docstring(stmt)
                or (isinstance(stmt, (ast.Assign, ast.AnnAssign)) and not _has_call(stmt))):
            logic_started = True
        if target is None:
            continue
        ok, value = _literal(stmt.value)  # type: ignore[attr-defined]
        if not ok or target == FIA_RESULT:
            continue
        if target in _NOTEBOOK_NAMES or (target in RUN_PARAMETERS and target not in IDENTITY):
            if not logic_started:
                findings.append(Finding(level="info", file=script.name, line=stmt.lineno, message=f"{target}: a name "
                                        "the template uses itself (or a run value nbreduce sets): kept as code"))
            continue
        alone = all(lines_used[n] == 1 for n in range(first, last + 1))
        if bindings[target] != 1 or not alone or target.startswith("_"):
            why = ("is bound more than once" if bindings[target] != 1 else "shares its line with other code"
                   if not alone else "starts with _ (not allowed as a parameter)")
            if not logic_started:
                findings.append(Finding(level="info", file=script.name, line=stmt.lineno,
                                        message=f"{target} {why}: kept as code, not a parameter"))
            continue
        if logic_started:
            late.append(f"{target} (line {stmt.lineno})")
            continue
        lead = [script.lines[n - 1] for n in range(lead_range[0], lead_range[1] + 1)
                if script.lines[n - 1].strip().startswith("#")]
        comment = script.comments.get(last) or script.comments.get(first, "")  # alone on its lines: its own
        setting = Setting(stmt=stmt, name=target, value=value, lead=lead, comment=comment)
        if target in IDENTITY:
            if type(value) is _IDENTITY_TYPES[IDENTITY[target][0]]:
                setting.identity = True
                findings.append(Finding(level="info" if target != "output_dir" else "warning", file=script.name,
                                        line=stmt.lineno, message=f"{target} = {value!r} is replaced by nbreduce's "
                                        f"{target} (the run's value)"))
            else:
                findings.append(Finding(level="warning", file=script.name, line=stmt.lineno,
                                        message=f"{target} is a parameter nbreduce sets from the run, with another "
                                                "type here: kept as code (it overrides the run's value)"))
                continue
        settings.append(setting)
    if late:
        findings.append(Finding(level="info", file=script.name, message="literal assignments after the script's logic "
                                "starts stay code, not parameters: " + ", ".join(late) + "; move them above its "
                                "first statement with a call and import again to make them parameters"))
    return settings, findings


def _helpers(script: Source, folder: Path, imports: list[Import]) -> tuple[dict[str, Path], list[Finding]]:
    """Modules of the legacy folder that the script imports (and that they import): copied beside the notebook."""
    helpers: dict[str, Path] = {}
    findings: list[Finding] = []
    queue = [i.top for i in imports]
    while queue:
        top = queue.pop(0)
        if top == SETTINGS_MODULE or any(Path(h).stem == top for h in helpers):
            continue
        path = local_module(folder, top)
        if path is None or path == script.path:
            continue
        helpers[path.name] = path
        for module in (path.rglob("*.py") if path.is_dir() else [path]):
            try:
                queue += [i.top for i in imports_of(ast.parse(module.read_bytes()))]
            except (SyntaxError, ValueError) as exc:  # e.g. Python 2: copied as it is, for a person to port
                findings.append(Finding(level="error", file=str(module.relative_to(folder)),
                                        message=f"not valid Python 3 ({exc}): copied as it is, to be ported; "
                                                "its imports not followed"))
    others = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix == ".py"
                    and p.name not in helpers and p != script.path and p.name != SETTINGS_NAME)
    if others:
        findings.append(Finding(level="info", file=folder.name or str(folder),
                                message="not imported by the script, not copied: " + ", ".join(others)))
    data = sorted(p.name for p in folder.iterdir() if p.is_file() and p.suffix not in (".py", ".pyc")
                  and not p.name.startswith("."))
    referenced = [n for n in data if n in script.text]
    if referenced:
        findings.append(Finding(level="warning", file=script.name, message="reads files of the legacy folder, which "
                                "are not copied (the script names them by their old path): " + ", ".join(referenced)))
    return helpers, findings


def _import_findings(script: Source, imports: list[Import], folder: Path, environment: str,
                     helper_imports: Iterable[Import] = ()) -> list[Finding]:
    """Star imports of modules not beside the script, and what the environment must provide (helpers' needs too)."""
    findings: list[Finding] = []
    external: dict[str, int] = {}
    for imp in [*imports, *(replace(i, star=False) for i in helper_imports)]:
        if imp.top in sys.stdlib_module_names or imp.top in ("__future__", SETTINGS_MODULE) \
                or local_module(folder, imp.top):
            continue
        external.setdefault(imp.top, imp.line)
        if imp.star and imp.top not in MANTID_PACKAGES:
            findings.append(Finding(level="warning", file=script.name, line=imp.line,
                                    message=f"from {imp.module} import *: {imp.top} is not beside the script, so the "
                                            f"names it provides are unknown; environment {environment!r} must "
                                            "provide it"))
    if external:
        mantid = sorted(n for n in external if n in MANTID_PACKAGES)
        others = sorted(n for n in external if n not in MANTID_PACKAGES)
        parts = ([f"Mantid ({', '.join(mantid)})"] if mantid else []) + others
        findings.append(Finding(level="info", file=script.name, message=f"environment {environment!r} must provide: "
                                + ", ".join(parts)))
    return findings


def _script_findings(script: Source, kind: str) -> list[Finding]:
    findings: list[Finding] = []
    for call in _module_level_calls(script.tree):
        func = call.func
        if isinstance(func, ast.Attribute) and func.attr in ("append", "insert", "extend") \
                and isinstance(func.value, ast.Attribute) and func.value.attr == "path" \
                and isinstance(func.value.value, ast.Name) and func.value.value.id == "sys":
            findings.append(Finding(level="warning", file=script.name, line=call.lineno,
                                    message=f"`{_short(ast.unparse(call), 80)}`: that folder is not part of the "
                                            "template; helper modules are copied beside the notebook instead"))
    paths = _absolute_paths(script)
    output = [(line, p) for line, p in paths if p == "/output" or p.startswith("/output/")]
    for line, path in output:
        findings.append(Finding(level="warning", file=script.name, line=line,
                                message=f"uses {path!r}, FIA's container output folder: write to output_dir"))
    others = [f"{p} (line {line})" for line, p in paths if (line, p) not in output]
    if others:
        findings.append(Finding(level="warning", file=script.name, message="absolute paths, which must exist where "
                                "the runner runs: " + ", ".join(others[:12]) + (" ..." if len(others) > 12 else "")))
    if kind == "legacy":
        for stmt in script.tree.body:
            if _main_guard(stmt):
                findings.append(Finding(level="info", file=script.name, line=stmt.lineno,
                                        message="`if __name__ == \"__main__\":` block: the service never ran it; kept "
                                                "commented out in the last cell"))
    if any(isinstance(s, ast.ImportFrom) and s.module == "__future__" and any(a.name == "annotations" for a in s.names)
           for s in script.tree.body):
        findings.append(Finding(level="info", file=script.name, message="`from __future__ import annotations` is "
                                "repeated in each cell that defines functions or classes (a cell is compiled alone)"))
    return findings


# --------------------------------------------------------------------------------------------------
# The notebook
# --------------------------------------------------------------------------------------------------
def _parameter_line(name: str, annotation: str, default: str, comment: str) -> str:
    return f"{name}: {annotation} = {default}" + (f"  # {comment}" if comment else "")


def parameters_source(report: ConversionReport, fia_settings: list[Setting], needs_dir: bool) -> str:
    """The ``parameters`` cell: the run's identity, the template folder if needed, then the legacy variables."""
    lines: list[str] = []
    if any(v.annotation.startswith("Optional[") for v in report.variables):
        lines += ["from typing import Optional  # papermill reads Optional[...] (not `X | None`) in this cell", ""]
    lines.append("# The run: set by nbreduce for every run")
    for name, (annotation, help_text) in IDENTITY.items():
        default = {"instrument": repr(report.instrument), "run_number": "0", "output_dir": "'output'"}.get(name, "''")
        lines.append(_parameter_line(name, annotation, default, help_text))
    if needs_dir:
        lines += ["", "# This template's folder: the helper modules copied from the legacy folder are imported from it",
                  _parameter_line(TEMPLATE_DIR, "str", "'.'", "folder of this template (set by nbreduce; "
                                  "'.' when run by hand from the template's folder)")]
    by_name = {s.name: s for s in fia_settings}
    titles = {"standard": f"{SETTINGS_MODULE}.standard_vars", "advanced": f"{SETTINGS_MODULE}.advanced_vars "
              "(the rerun form shows them in its collapsed advanced section)",
              "setting": f"Settings of {report.files[0].name} (FIA rewrote them for each run)"}
    section = None
    for v in report.variables:
        if v.section != section:
            section = v.section
            lines += ["", f"# {titles[section]}"]
        setting = by_name.get(v.name)
        if setting is not None:
            lines += [line for line in setting.lead if line.strip() not in ("#", "")]
        parts = [ADVANCED_MARK] if v.advanced else []
        if v.key != v.name:
            parts.append(f"{v.key!r}" + (":" if v.help else ""))
        if v.help:
            parts.append(comment_text(v.help))
        if not v.editable:
            parts.append(f"[{v.note}]")
        lines.append(_parameter_line(v.name, v.annotation, v.default, comment_text(" ".join(parts), 10_000)))
    return "\n".join(lines)


def settings_module_source(settings: SettingsModule | None, report: ConversionReport) -> str:
    """The cell that rebuilds ``reduce_vars`` from the parameters with the original keys."""
    lines = [f"# reduce.py reads its settings from the `{SETTINGS_MODULE}` module: rebuilt here from the parameters",
             "# above, with the original keys, so that the script runs unchanged.",
             "import sys", "import types", ""]
    defined: set[str] = set()
    items = settings.items if settings else []
    for index, item in enumerate(items):
        if item.kind == "section":
            lines.append(f"{item.target} = {{")
            for entry in item.entries:
                if entry.name is not None:
                    lines.append(f"    {entry.key!r}: {entry.name},")
                elif entry.literal:
                    lines.append(f"    {entry.source},  # replaced further down, as in {SETTINGS_NAME}")
                else:
                    lines.append(f"    {entry.source},  # computed in {SETTINGS_NAME} line {entry.line}: kept as code")
            lines += ["}", ""]
            defined.add(item.target or "")
        elif item.kind == "entry":
            entry = item.entries[0]
            if entry.name is not None:
                lines.append(f"{item.target}[{entry.key!r}] = {entry.name}")
            elif entry.literal:
                lines.append(f"{item.source}  # replaced further down, as in {SETTINGS_NAME}")
            else:
                lines.append(f"{item.source}  # computed in {SETTINGS_NAME} line {item.line}: kept as code")
            if index + 1 == len(items) or items[index + 1].kind != "entry":
                lines.append("")
        elif item.kind == "help":
            lines += [f"{HELP_DICT} = {item.source}", ""]
            defined.add(HELP_DICT)
        else:
            lines += [f"# kept as code from {SETTINGS_NAME} line {item.line}", item.source, ""]
    defined |= set(settings.bound if settings else ())
    for missing in [s for s in SECTIONS if s not in defined]:
        lines += [f"{missing} = {{}}  # not in {SETTINGS_NAME}; the service always provided it", ""]
    bound = list(dict.fromkeys([*SECTIONS, *(settings.bound if settings else [])]))
    lines.append(f'{SETTINGS_MODULE} = types.ModuleType("{SETTINGS_MODULE}", "Settings of reduce.py, rebuilt by '
                 'nbreduce from the template parameters")')
    lines += [f"{SETTINGS_MODULE}.{name} = {name}" for name in bound]
    lines.append(f'sys.modules["{SETTINGS_MODULE}"] = {SETTINGS_MODULE}')
    return "\n".join(lines)


def template_dir_source(report: ConversionReport, uses_file: bool) -> str:
    modules = tuple(Path(h).stem for h in report.helpers)
    lines = [
        "# This template's folder holds the helper modules copied from the legacy folder. The runner runs the kernel",
        "# in the run's output folder and injects `template_dir`, the template's folder, which goes on sys.path.",
        "import sys",
        "from pathlib import Path",
        "",
        f"HELPER_MODULES = {modules!r}",
        f"_places = [Path({TEMPLATE_DIR}).expanduser().resolve()]",
        '_found = next((p for p in _places if all((p / f"{m}.py").is_file() or (p / m / "__init__.py").is_file()',
        "                                         for m in HELPER_MODULES)), None)",
        "if _found is None:",
        '    raise ModuleNotFoundError(f"helper modules {HELPER_MODULES} of this template are not in "',
        '                              f"{\' or \'.join(map(str, _places))}: run it from the template\'s folder "',
        '                              "or give template_dir")',
        "sys.path.insert(0, str(_found))",
    ]
    if uses_file:
        lines.append(f'__file__ = str(_found / "{SCRIPT_NAME}")  # the script finds files beside itself')
    return "\n".join(lines)


@dataclass
class _Cell:
    ranges: list[tuple[int, int]]
    definition: bool
    notes: dict[int, str] = field(default_factory=dict)  # comment lines inserted after the first n ranges


def body_cells(script: Source, skip: dict[int, str | None], guard: set[int]) -> tuple[list[str], str, str]:
    """(code cells, module docstring, commented-out ``__main__`` block) of the script body.

    One cell per top-level function or class, one per run of other statements; comment lines belong to the
    statement they precede. ``skip``: statements (by line) moved to the parameters cell, with the comment that
    replaces them in place (None: none, their own comments moved with them); ``guard``: the
    ``if __name__ == "__main__":`` block, which the legacy service never ran.
    """
    cells: list[_Cell] = []
    pending: list[tuple[int, int]] = []
    docstring = guard_text = ""
    prev_end = 0
    future_annotations = False
    for index, stmt in enumerate(script.tree.body):
        first, last = _span(stmt)
        lead = (prev_end + 1, first - 1)
        prev_end = last
        if stmt.lineno in skip:
            note = skip[stmt.lineno]
            if note is not None:  # bound to the run's value: its comments stay, a note says where it went
                if not cells or cells[-1].definition:
                    cells.append(_Cell([], False))
                cells[-1].ranges += [*pending, lead]
                cells[-1].notes[len(cells[-1].ranges)] = note
                pending = []
            continue
        if index == 0 and _is_docstring(stmt):
            docstring = str(stmt.value.value)  # type: ignore[attr-defined]
            pending.append(lead)
            continue
        if stmt.lineno in guard:
            guard_text = script.segment(max(lead[0], 1), last).strip("\n")
            continue
        if isinstance(stmt, ast.ImportFrom) and stmt.module == "__future__":
            future_annotations |= any(a.name == "annotations" for a in stmt.names)
        definition = isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
        if definition or not cells or cells[-1].definition:
            cells.append(_Cell([], definition))
        cells[-1].ranges += [*pending, lead, (first, last)]
        pending = []
    if cells and prev_end < len(script.lines):
        cells[-1].ranges.append((prev_end + 1, len(script.lines)))
    sources = []
    for cell in cells:
        parts = []
        for n, (a, b) in enumerate(cell.ranges, start=1):
            if b >= a:
                parts.append(script.segment(a, b))
            if n in cell.notes:
                parts.append(cell.notes[n])
        lines = "\n".join(parts).split("\n")
        while lines and not lines[0].strip():
            lines.pop(0)
        while lines and not lines[-1].strip():
            lines.pop()
        text = "\n".join(lines)
        if future_annotations and cell.definition:
            text = "from __future__ import annotations\n\n" + text
        if text.strip():
            sources.append(text)
    return sources, docstring, guard_text


def _introduction(report: ConversionReport) -> str:
    kind = ("a legacy autoreduction script (`reduce.py` + `reduce_vars.py`)" if report.kind == "legacy"
            else "a script whose settings are top-level assignments (FIA style)")
    rows = "\n".join(f"| `{f.name}` | {f.role} | `{f.sha256}` |" for f in report.files)
    counts = Counter(v.section for v in report.variables)
    if report.kind == "legacy":
        converted = (f"{counts['standard']} standard and {counts['advanced']} advanced variables of `reduce_vars.py` "
                     "became the parameters below (advanced ones in the rerun form's collapsed section); a cell "
                     "rebuilds the `reduce_vars` module from them with the original keys, so the script runs "
                     "unchanged, split into cells at its functions. "
                     + (f"The last cell calls `{report.call}`, as the autoreduction service did."
                        if report.call else "**The last cell must be written by hand** (see below)."))
    else:
        converted = (f"{counts['setting']} top-level settings became the parameters below and were removed from the "
                     "script, which otherwise runs as it is, split into cells at its functions.")
    text = [f"# {report.instrument}: imported reduction script", "",
            f"Converted by `nbreduce template import` from {kind} at `{report.source}`:", "",
            "| file | role | sha256 |", "|---|---|---|", rows, "", converted]
    if report.helpers:
        text += ["", "Helper modules copied beside this notebook: " + ", ".join(f"`{h}`" for h in report.helpers)
                 + ". They are imported from the template's folder (`template_dir`)."]
    for level, title in (("error", "Must be fixed before this template can run"), ("warning", "To check")):
        found = report.of_level(level)  # type: ignore[arg-type]
        if found:
            text += ["", f"**{title}:**", ""] + [f"- `{f.file}{f':{f.line}' if f.line else ''}`: {f.message}"
                                                  for f in found]
    return "\n".join(text)


def build_notebook(report: ConversionReport, script: Source, settings: SettingsModule | None,
                   fia_settings: list[Setting], *, needs_dir: bool, uses_file: bool) -> nbformat.NotebookNode:
    """The template notebook (nbformat v4, no outputs, kernelspec of the environment)."""
    environment = report.environment
    nb = new_notebook(metadata={
        "kernelspec": {"name": f"nbreduce-{environment}", "display_name": f"nbreduce {environment}",
                       "language": "python"},
        "language_info": {"name": "python"},
        # kept in executed copies (the runner owns the "nbreduce" key): where this template came from
        "nbreduce_import": {
            "source": report.source, "kind": report.kind, "files": [f.model_dump() for f in report.files],
            "module": SETTINGS_MODULE if report.kind == "legacy" else None,
            "parameters": {v.name: {"key": v.key, "section": v.section} for v in report.variables},
        },
    })
    cells = [new_markdown_cell(_introduction(report)),
             new_code_cell(parameters_source(report, fia_settings, needs_dir), metadata={"tags": ["parameters"]})]
    if needs_dir:
        cells.append(new_code_cell(template_dir_source(report, uses_file)))
    if report.kind == "legacy":
        cells += [new_markdown_cell(f"## Settings module\n\nThe script imports `{SETTINGS_MODULE}`; this cell "
                                    "rebuilds it from the parameters, with the original keys."),
                  new_code_cell(settings_module_source(settings, report))]
    skip = {s.stmt.lineno: (f"# {_first_line(script, s.stmt)}  <- removed by nbreduce template import: {s.name} "
                            "is the run's value, a parameter set by nbreduce" if s.identity else None)
            for s in fia_settings}
    guard = {s.lineno for s in script.tree.body if report.kind == "legacy" and _main_guard(s)}
    body, docstring, guard_text = body_cells(script, skip, guard)
    intro = f"## {script.name}\n\nThe script as it was" + (", without the settings moved to the parameters cell"
                                                            if skip else "") + "."
    if docstring:
        intro += "\n\n" + "\n".join(f"> {line}" if line.strip() else ">" for line in docstring.strip().splitlines())
    cells.append(new_markdown_cell(intro))
    cells += [new_code_cell(text) for text in body]
    if report.kind == "legacy":
        cells.append(new_markdown_cell("## Run\n\nThe autoreduction service called `main` with the run's data file "
                                       "and output folder; so does this cell."))
        final = [report.call] if report.call else [
            "# The autoreduction service called main(input_file=..., output_dir=...); this script cannot be called",
            "# that way: call it here with the run's values (data_file, output_dir, run_number...), then remove",
            "# the raise.",
            'raise NotImplementedError("nbreduce template import: the call of the reduction must be written here")']
        if guard_text:
            final += ["", "# Not run: the script's own entry point, which the autoreduction service never ran either",
                      *(f"# {line}" if line else "#" for line in guard_text.splitlines())]
        cells.append(new_code_cell("\n".join(final)))
    nb.cells = cells
    nbformat.validate(nb)
    return nb


# --------------------------------------------------------------------------------------------------
# Writing the template
# --------------------------------------------------------------------------------------------------
def toml_text(config: dict[str, Any], header: Iterable[str] = ()) -> str:
    """instrument.toml for the few value types an import writes (strings, booleans, integers, one level of tables),
    checked by reading it back with tomllib."""

    def value(v: Any) -> str:
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, int):
            return str(v)
        if isinstance(v, str):  # a JSON string is a TOML basic string once DEL is escaped too
            return json.dumps(v, ensure_ascii=False).replace("\x7f", "\\u007f")
        raise TypeError(f"cannot write {type(v).__name__} to TOML")

    lines = [f"# {line}" for line in header]
    tables = {k: v for k, v in config.items() if isinstance(v, dict)}
    lines += [f"{k} = {value(v)}" for k, v in config.items() if not isinstance(v, dict)]
    for table, entries in tables.items():
        lines += ["", f"[{table}]", *(f"{k} = {value(v)}" for k, v in entries.items())]
    text = "\n".join(lines) + "\n"
    if tomllib.loads(text) != config:
        raise AssertionError("instrument.toml does not read back as written")
    return text


def write_template(conversion: Conversion, notebooks: Path, *, force: bool = False, enable: bool = False
                   ) -> ConversionReport:
    """Write ``notebooks/<INSTRUMENT>/`` (reduce.ipynb, instrument.toml, helper modules) and return the report.

    An existing template is replaced only with ``force``. The template is written disabled unless ``enable``
    is given and the conversion found no error: an imported script should be checked before it reduces an
    instrument's runs.
    """
    report = conversion.report
    folder = Path(notebooks).expanduser().resolve() / report.instrument
    existing = [p.name for p in (folder / TEMPLATE_NAME, folder / CONFIG_NAME) if p.exists()]
    if existing and not force:
        raise ConversionError(f"{folder} already holds a template ({', '.join(existing)}): --force replaces it")
    enabled = enable and report.runnable
    config = {**conversion.config, "enabled": enabled}
    header = [f"Imported by `nbreduce template import` from {report.source}",
              *(f"  {f.name}: sha256 {f.sha256}" for f in report.files),
              "Check reduce.ipynb (its first cell lists what to check), then set enabled = true." if not enabled
              else "Enabled at import (--enable)."]
    folder.mkdir(parents=True, exist_ok=True)
    for name, path in conversion.helpers.items():
        if path.is_dir():
            target = folder / name
            if target.exists():
                shutil.rmtree(target)
            shutil.copytree(path, target, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            write_atomic(folder / name, path.read_bytes())
    write_atomic(folder / CONFIG_NAME, toml_text(config, header))
    write_atomic(folder / TEMPLATE_NAME, nbformat.writes(conversion.notebook))
    return report.model_copy(update={"template": str(folder), "enabled": enabled})


def import_template(source: Path, notebooks: Path, *, instrument: str | None = None,
                    environment: str = DEFAULT_ENVIRONMENT, force: bool = False, enable: bool = False,
                    known_environments: Collection[str] | None = None) -> ConversionReport:
    """Convert ``source`` and write the template: ``nbreduce template import``."""
    conversion = convert(source, instrument, environment, known_environments=known_environments)
    return write_template(conversion, notebooks, force=force, enable=enable)
