"""Data files of a run: where they may be, when they are ready, what they say about the run.

A run-stop can arrive before the NeXus file is closed, so the runner waits, bounded and with
backoff, until the file exists, is stable and opens as HDF5 (the writer holds HDF5's file lock
while it writes). Paths outside the configured data roots are refused: a message must never make
the runner read arbitrary files.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

HDF5_SUFFIXES = {".nxs", ".nxs5", ".h5", ".hdf5", ".hdf", ".nx5"}


class DataPathError(ValueError):
    """A data path a message named is not acceptable (reason in the message)."""


class DataNotReady(TimeoutError):
    """The data file did not become readable in time."""


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


def is_ready(path: Path) -> tuple[bool, str]:
    """Whether ``path`` can be read now; the second value says why not."""
    try:
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


def wait_until_ready(paths: list[Path], max_wait: float, stop: threading.Event | None = None,
                     first_delay: float = 0.2, max_delay: float = 5.0) -> float:
    """Block until every file is ready; returns seconds waited. Raises :class:`DataNotReady` after ``max_wait``."""
    start = time.monotonic()
    delay = first_delay
    pending = list(paths)
    while True:
        pending = [p for p in pending if not is_ready(p)[0]]
        if not pending:
            return time.monotonic() - start
        waited = time.monotonic() - start
        if waited >= max_wait or (stop is not None and stop.is_set()):
            reasons = "; ".join(f"{p} {is_ready(p)[1]}" for p in pending)
            raise DataNotReady(f"data file not readable after {waited:.0f} s: {reasons}")
        pause = min(delay, max_delay, max_wait - waited)
        if stop is not None:
            stop.wait(pause)
        else:
            time.sleep(pause)
        delay *= 2
