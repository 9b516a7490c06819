"""Read what an executed notebook says: its error, its scraps, its output files.

Scraps are what templates glue with scrapbook (papermill's companion): display outputs of mimetype
``application/scrapbook.scrap.<encoder>+json``. Most are JSON scraps (numbers, texts, short lists), whose
value is the bundle's ``data``: those are read straight from the executed notebook's outputs. Only scraps
of other encoders (pandas, arrow, custom) need scrapbook to decode them; scrapbook and pandas are then
imported in the run's kernel, never for a notebook that glued nothing.
"""

from __future__ import annotations

import ast
import json
import logging
from pathlib import Path
from typing import Any

from nbformat import NotebookNode

from runner.bus.models import ErrorInfo

log = logging.getLogger(__name__)

#: Scrap values larger than this (as JSON) are summarised in status events, never copied whole.
MAX_SCRAP_BYTES = 2048
#: scrapbook's mimetype of a scrap: ``application/scrapbook.scrap.<encoder>+json``.
SCRAP_PREFIX, SCRAP_SUFFIX = "application/scrapbook.scrap.", "+json"
JSON_SCRAP = f"{SCRAP_PREFIX}json{SCRAP_SUFFIX}"


def glued_scraps(nb: NotebookNode) -> tuple[dict[str, Any], bool]:
    """The JSON scraps of an executed notebook from its own output bundles (the last glue of a name wins, as in
    scrapbook), and whether scraps of other encoders were glued too (those need scrapbook to be read)."""
    found: dict[str, Any] = {}
    others = False
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            for mimetype, payload in (output.get("data") or {}).items():
                if not (mimetype.startswith(SCRAP_PREFIX) and mimetype.endswith(SCRAP_SUFFIX)):
                    continue
                if mimetype != JSON_SCRAP or not isinstance(payload, dict) or "name" not in payload:
                    others = True
                    continue
                data = payload.get("data")
                found[str(payload["name"])] = _summary(type(data).__name__, "json", json.dumps(data), None)
    return found, others


def error_from_notebook(nb: NotebookNode) -> ErrorInfo | None:
    """The first error output of an executed notebook (papermill stops at the first failing cell)."""
    for index, cell in enumerate(nb.cells):
        for output in cell.get("outputs", []):
            if output.get("output_type") == "error":
                from nbconvert.filters import strip_ansi

                return ErrorInfo(
                    ename=output.get("ename", "Error"),
                    evalue=output.get("evalue", ""),
                    cell_index=index,
                    cell_source=cell.get("source", ""),
                    traceback=strip_ansi("\n".join(output.get("traceback", []))),
                )
    return None


#: Runs in the finished run's kernel, whose environment has scrapbook when the template glues: the
#: runner then needs neither scrapbook nor pandas in its own memory.
_KERNEL_SCRAPS = """
def _nbreduce_scraps(path):
    import json
    try:
        import scrapbook
    except ImportError:  # an environment without scrapbook has glued nothing
        return "{}"
    found = {}
    for name, scrap in scrapbook.read_notebook(path).scraps.items():
        try:
            text = json.dumps(scrap.data)
        except (TypeError, ValueError):
            text = None
        found[name] = {"encoder": scrap.encoder, "type": type(scrap.data).__name__, "json": text,
                       "repr": None if text is not None else repr(scrap.data)[:200]}
    return json.dumps(found)
"""


def scraps_from_kernel(km, notebook: Path, timeout: float = 30) -> dict[str, Any]:
    """Scraps of ``notebook`` read with scrapbook inside the (still running) kernel that produced it."""
    from runner.kernels.pool import evaluate_silently

    raw = evaluate_silently(km, _KERNEL_SCRAPS, f"_nbreduce_scraps({str(notebook)!r})", timeout)
    found = json.loads(ast.literal_eval(raw))
    return {name: _summary(info["type"], info["encoder"], info["json"], info["repr"]) for name, info in found.items()}


def scraps_summary(notebook: Path) -> dict[str, Any]:
    """Scraps glued by the notebook, read with scrapbook here (when its kernel is gone)."""
    import scrapbook

    try:
        scraps = scrapbook.read_notebook(str(notebook)).scraps
    except Exception as exc:  # a broken notebook must not fail the publication of its status
        log.warning("cannot read scraps of %s: %s", notebook, exc)
        return {}
    summary: dict[str, Any] = {}
    for name, scrap in scraps.items():
        try:
            encoded: str | None = json.dumps(scrap.data)
        except (TypeError, ValueError):
            encoded = None
        summary[name] = _summary(type(scrap.data).__name__, scrap.encoder, encoded,
                                 None if encoded is not None else repr(scrap.data)[:200])
    return summary


def _summary(type_name: str, encoder: str, encoded: str | None, text: str | None) -> Any:
    """A scrap as a JSON-safe value small enough for a status event."""
    if encoded is None:
        return {"type": type_name, "encoder": encoder, "summary": text}
    if len(encoded) > MAX_SCRAP_BYTES:
        return {"type": type_name, "encoder": encoder, "summary": encoded[:200] + "…"}
    return json.loads(encoded)


def output_files(folder: Path, exclude: set[str]) -> list[Path]:
    """Files the template wrote into its output folder (the notebook and nbreduce's own files excluded)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in exclude and not p.name.startswith("."))
