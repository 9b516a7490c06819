"""Data files of a run: where they may be, when they are ready, what they say about the run.

A run-stop can arrive before the NeXus file is closed, so the runner looks again, bounded and with
backoff (the run parked on a timer meanwhile, see :mod:`runner.pipeline.consumer`), until the file
exists, is stable and opens as HDF5 (the writer holds HDF5's file lock while it writes). Some runs
are folders (IMAT's FITS image stacks): a folder is ready when it holds
files, none of them a writer's temporary file, and every FITS image in it is whole (FITS files are
made of 2880-byte records, so a file cut short is caught without reading it). Paths outside the
configured data roots are refused: a message must never make the runner read arbitrary files.
"""

from __future__ import annotations

import os
from pathlib import Path

HDF5_SUFFIXES = {".nxs", ".nxs5", ".h5", ".hdf5", ".hdf", ".nx5"}
FITS_SUFFIXES = {".fits", ".fit", ".fts"}
FITS_RECORD = 2880
#: Names of files still being written (atomic writers' temporary names, partial downloads).
TEMPORARY_SUFFIXES = {".tmp", ".part", ".partial"}


class DataPathError(ValueError):
    """A data path a message named is not acceptable (reason in the message)."""


def check_data_paths(paths: list[str], roots: list[Path]) -> list[Path]:
    """Absolute, symlink-resolved paths, each inside one of ``roots``; else :class:`DataPathError`."""
    resolved_roots = [r.resolve() for r in roots]
    checked = []
    for raw in paths:
        if "\x00" in raw:
            raise DataPathError(f"data path contains a NUL byte: {raw!r}")
        path = Path(raw)
        if not path.is_absolute():
            raise DataPathError(f"data path must be absolute: {raw!r}")
        real = Path(os.path.realpath(path))
        if not any(real.is_relative_to(root) for root in resolved_roots):
            allowed = ", ".join(str(r) for r in resolved_roots)
            raise DataPathError(f"data path {raw} is outside the configured data roots ({allowed})")
        checked.append(real)
    return checked


def _folder_ready(folder: Path) -> tuple[bool, str]:
    """A run folder is ready when it holds files, none still being written and every FITS image whole."""
    if not os.access(folder, os.R_OK | os.X_OK):
        return False, "is not readable"
    files = 0
    for root, _, names in os.walk(folder):
        for name in names:
            path = Path(root) / name
            if path.suffix.lower() in TEMPORARY_SUFFIXES:
                return False, f"is still being written ({path.relative_to(folder)})"
            if path.suffix.lower() in FITS_SUFFIXES:
                size = path.stat().st_size
                if size == 0 or size % FITS_RECORD:
                    return False, f"holds an incomplete FITS image ({path.relative_to(folder)}, {size} bytes)"
            files += 1
    return (True, "ready") if files else (False, "is an empty folder")


def is_ready(path: Path) -> tuple[bool, str]:
    """Whether ``path`` (a file, or a run folder) can be read now; the second value says why not."""
    try:
        if path.is_dir():
            return _folder_ready(path)
        if not path.is_file():
            return False, "does not exist yet"
        if not os.access(path, os.R_OK):
            return False, "is not readable"
        if path.stat().st_size == 0:
            return False, "is empty"
        if path.suffix.lower() in HDF5_SUFFIXES:
            import h5py

            with h5py.File(path, "r"):
                pass
    except OSError as exc:
        return False, f"cannot be opened yet ({exc})"
    return True, "ready"
