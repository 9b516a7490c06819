"""Read what an executed notebook says: its error, its scraps, its output files.

Scraps are what templates glue with scrapbook (papermill's companion): display outputs of mimetype
``application/scrapbook.scrap.<encoder>+json``. JSON scraps (numbers, lists, booleans) are the bundle's
``data``: read straight from the executed notebook's outputs. Scraps of other encoders (``text`` for strings,
pandas, custom) are decoded by scrapbook, in the kernel that glued them (it imported scrapbook to glue):
only their payloads go there, no notebook is read again, and nothing happens for a notebook that glued
nothing.
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


def glued_payloads(nb: NotebookNode) -> list[dict[str, Any]]:
    """The scrap payloads an executed notebook's outputs hold, in the order they were glued."""
    found = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            for mimetype, payload in (output.get("data") or {}).items():
                if mimetype.startswith(SCRAP_PREFIX) and mimetype.endswith(SCRAP_SUFFIX) \
                        and isinstance(payload, dict) and "name" in payload:
                    encoder = mimetype[len(SCRAP_PREFIX):-len(SCRAP_SUFFIX)]
                    found.append({**payload, "encoder": payload.get("encoder") or encoder})
    return found


def glued_scraps(payloads: list[dict[str, Any]], decoded: dict[str, Any] | None = None) -> dict[str, Any]:
    """Scraps by name (the last glue of a name wins, as in scrapbook): JSON scraps are their payload's ``data``;
    the others come from ``decoded`` (what scrapbook made of them, see :func:`scraps_from_kernel`)."""
    found: dict[str, Any] = {}
    for payload in payloads:
        name = str(payload["name"])
        if payload["encoder"] == "json":
            data = payload.get("data")
            found[name] = _summary(type(data).__name__, "json", json.dumps(data), None)
        elif decoded is not None and name in decoded:
            found[name] = decoded[name]
    return found


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


#: Runs in the finished run's kernel, which imported scrapbook itself to glue them: scrapbook decodes the payloads
#: of encoders other than JSON (text, pandas, ...) there, and the runner needs neither scrapbook nor pandas.
_KERNEL_DECODE = """
def _nbreduce_decode(payloads):
    import json
    from scrapbook.encoders import registry
    from scrapbook.scraps import payload_to_scrap
    found = {}
    for payload in json.loads(payloads):
        scrap = registry.decode(payload_to_scrap(payload))
        try:
            text = json.dumps(scrap.data)
        except (TypeError, ValueError):
            text = None
        found[scrap.name] = {"encoder": scrap.encoder, "type": type(scrap.data).__name__, "json": text,
                             "repr": None if text is not None else repr(scrap.data)[:200]}
    return json.dumps(found)
"""


def scraps_from_kernel(km, payloads: list[dict[str, Any]], timeout: float = 30) -> dict[str, Any]:
    """The payloads of scraps only scrapbook can decode, decoded with scrapbook inside the (still running) kernel
    that glued them (one round trip: no notebook file is read)."""
    from runner.kernels.pool import evaluate_silently

    raw = evaluate_silently(km, _KERNEL_DECODE, f"_nbreduce_decode({json.dumps(payloads)!r})", timeout)
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
