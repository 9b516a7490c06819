"""The archive's one documented layout: ``<archive>/<INSTRUMENT>/RB<rb>/<run>/v<k>/`` with ``job.json``.

A version is complete exactly when it holds ``job.json``; ``.staging/`` (hidden) holds notebooks being
executed. Readers walk the layout with :func:`version_dirs`, which never follows a symbolic link.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from pathlib import Path

STAGING = ".staging"
RECORD = "job.json"


def run_label(runs: list[int]) -> str:
    """Folder name of a run, or of a multi-run job (``first-last``)."""
    return str(runs[0]) if len(runs) == 1 else f"{min(runs)}-{max(runs)}"


_RB = re.compile(r"^RB[0-9]+$")
_RUN = re.compile(r"^[0-9]+(-[0-9]+)?$")
_VERSION = re.compile(r"^v[0-9]+$")


def _subdirs(folder: Path, pattern: re.Pattern[str] | None = None) -> Iterator[Path]:
    """Real sub-folders (symlinks excluded) whose name fits the layout; hidden ones never do."""
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError:
        return
    for entry in entries:
        if entry.name.startswith(".") or not entry.is_dir(follow_symlinks=False):
            continue
        if pattern is None or pattern.match(entry.name):
            yield Path(entry.path)


def version_dirs(root: Path, instrument: str | None = None, rb_number: str | None = None) -> Iterator[Path]:
    """Every version folder of the layout under ``root`` (optionally one instrument's, one experiment's),
    in name order; symbolic links are never followed, so nothing outside the archive is visited."""
    for inst_dir in _subdirs(Path(root)):
        if instrument and inst_dir.name != instrument.upper():
            continue
        for rb_dir in _subdirs(inst_dir, _RB):
            if rb_number and rb_dir.name != f"RB{rb_number}":
                continue
            for run_dir in _subdirs(rb_dir, _RUN):
                yield from _subdirs(run_dir, _VERSION)
