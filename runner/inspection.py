"""Read what an executed notebook says: its error, its scraps, its output files.

Scraps are read with scrapbook (papermill's companion), whose mimetype
``application/scrapbook.scrap.<encoder>+json`` the templates write through ``sb.glue``.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from nbformat import NotebookNode

from runner.models import ErrorInfo

log = logging.getLogger(__name__)

#: Scrap values larger than this (as JSON) are summarised in status events, never copied whole.
MAX_SCRAP_BYTES = 2048


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


def scraps_summary(notebook: Path) -> dict[str, Any]:
    """Scraps glued by the notebook, as JSON-safe values small enough for a status event."""
    import scrapbook

    try:
        scraps = scrapbook.read_notebook(str(notebook)).scraps
    except Exception as exc:  # a broken notebook must not fail the publication of its status
        log.warning("cannot read scraps of %s: %s", notebook, exc)
        return {}
    summary: dict[str, Any] = {}
    for name, scrap in scraps.items():
        value = scrap.data
        try:
            encoded = json.dumps(value)
        except (TypeError, ValueError):
            summary[name] = {"type": type(value).__name__, "encoder": scrap.encoder, "summary": repr(value)[:200]}
            continue
        if len(encoded) > MAX_SCRAP_BYTES:
            summary[name] = {"type": type(value).__name__, "encoder": scrap.encoder, "summary": encoded[:200] + "…"}
        else:
            summary[name] = value
    return summary


def output_files(folder: Path, exclude: set[str]) -> list[Path]:
    """Files the template wrote into its output folder (the notebook and nbreduce's own files excluded)."""
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.name not in exclude and not p.name.startswith("."))
