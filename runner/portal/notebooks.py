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
