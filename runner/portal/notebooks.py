"""Executed notebooks as the portal shows them: nbconvert HTML and the plots inside.

Archived versions never change, so renders are cached by path and modification time.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import nbformat

IMAGE_TYPES = ("image/png", "image/jpeg")
IMAGE_SUFFIXES = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".gif": "image/gif",
                  ".svg": "image/svg+xml", ".webp": "image/webp"}


def render_html(path: Path) -> str:
    """Full-page HTML of an executed notebook (served sandboxed: its outputs may carry scripts)."""
    return _render(str(path), path.stat().st_mtime_ns)


@lru_cache(maxsize=32)
def _render(path: str, mtime_ns: int) -> str:
    from nbconvert import HTMLExporter  # heavy import, only when a notebook is first rendered

    exporter = HTMLExporter(template_name="lab")
    body, _ = exporter.from_notebook_node(nbformat.read(path, as_version=4))
    return body


def notebook_images(path: Path, limit: int = 12) -> list[tuple[str, str]]:
    """(mime type, base64 data) of the first ``limit`` PNG/JPEG outputs: the run page's plots."""
    return list(_images(str(path), path.stat().st_mtime_ns, limit))


@lru_cache(maxsize=256)
def _images(path: str, mtime_ns: int, limit: int) -> tuple[tuple[str, str], ...]:
    found: list[tuple[str, str]] = []
    notebook = nbformat.read(path, as_version=4)
    for cell in notebook.cells:
        for output in cell.get("outputs", []) if cell.cell_type == "code" else []:
            data = output.get("data", {})
            for mime in IMAGE_TYPES:
                if mime in data and isinstance(data[mime], str):
                    found.append((mime, data[mime].replace("\n", "")))
                    break
            if len(found) >= limit:
                return tuple(found)
    return tuple(found)


def cell_timings(path: Path) -> list[dict]:
    """Where the time went: papermill's per-cell durations of an executed notebook, in cell order."""
    return list(_timings(str(path), path.stat().st_mtime_ns))


@lru_cache(maxsize=256)
def _timings(path: str, mtime_ns: int) -> tuple[dict, ...]:
    notebook = nbformat.read(path, as_version=4)
    found, heading, number = [], "", 0
    for cell in notebook.cells:
        if cell.cell_type == "markdown":
            titles = [line.lstrip("#").strip() for line in cell.source.splitlines() if line.startswith("#")]
            heading = titles[-1] if titles else heading
            continue
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        number += 1
        meta = cell.metadata.get("papermill", {})
        tags = cell.metadata.get("tags", [])
        first = next((line.strip() for line in cell.source.splitlines() if line.strip()), "")
        label = ("injected parameters" if "injected-parameters" in tags else
                 "parameters" if "parameters" in tags else heading or first)
        found.append({"cell": number, "label": label[:100], "first_line": first[:100],
                      "seconds": meta.get("duration"), "status": meta.get("status", "")})
    return tuple(found)


def notebook_outputs(path: Path) -> list[tuple[int, str, str]]:
    """(code cell number, stream name, text) of every stream output: the log of a finished run."""
    notebook = nbformat.read(str(path), as_version=4)
    found, number = [], 0
    for cell in notebook.cells:
        if cell.cell_type != "code" or not cell.source.strip():
            continue
        number += 1
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream":
                found.append((number, output.get("name", "stdout"), output.get("text", "")))
            elif output.get("output_type") == "error":
                from nbconvert.filters import strip_ansi

                found.append((number, "stderr", strip_ansi("\n".join(output.get("traceback", []))) + "\n"))
    return found
