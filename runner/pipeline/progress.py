"""Live progress of running reductions: which cell, how long, the latest log lines — at most about once a second.

papermill's client calls :class:`RunProgress` from the thread executing the notebook: nbclient's
``on_cell_start`` hook for each cell, and papermill's ``stdout_file``/``stderr_file`` for every stream output.
Those calls only update memory under a lock; one :class:`ProgressSender` thread per runner turns what
changed into :class:`~runner.bus.models.ProgressEvent` messages and hands them to the producer without
waiting for the broker (``Publisher.send``), so a slow or absent broker never slows a reduction down. The
topic keeps a day (docs/operations.md): the executed notebook is the permanent record.

The same stream hook finds the Python warnings raised by the template's own cells (their file is one of
ipykernel's cell files): they join the template's ``nbreduce_warnings`` in the job's status.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from runner.bus.models import LogLine, ProgressEvent, utcnow
from runner.bus.topics import REDUCTION_PROGRESS

log = logging.getLogger(__name__)

#: Lines in one event at most (the rest of a burst is skipped, the offset says how many).
MAX_LINES_PER_EVENT = 200
#: Characters of one log line at most.
MAX_LINE = 1000
#: Python warnings recorded per run at most.
MAX_WARNINGS = 20
#: ``<file>:<line>: <Category>: <message>`` as ``warnings.showwarning`` prints it, from a cell of the notebook
#: (ipykernel compiles each cell to ``<tmp>/ipykernel_<pid>/<hash>.py``).
_CELL_WARNING = re.compile(r"ipykernel_\d+[/\\]\d+\.py:(\d+): (\w*Warning): (.+)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)


class _Stream:
    """The file-like object papermill writes one stream's outputs to."""

    def __init__(self, progress: RunProgress, name: str):
        self._progress, self.name = progress, name

    def write(self, text: str) -> None:
        self._progress.write(self.name, text)

    def flush(self) -> None:
        pass


class RunProgress:
    """The progress of one run; written by the executing thread, read by the sender thread."""

    def __init__(self, job_id: str, instrument: str | None = None, rb_number: str | None = None):
        self.job_id, self.instrument, self.rb_number = job_id, instrument, rb_number
        self.started_at: datetime = utcnow()
        self._t0 = time.monotonic()
        self._lock = threading.Lock()
        self._labels: dict[int, tuple[int, str]] = {}  # cell index -> (code cell number, label)
        self.cells = 0
        self.cell = 0
        self.cell_label = ""
        self._lines: list[LogLine] = []  # not yet sent
        self._sent = 0  # lines before _lines
        self._partial = {"stdout": "", "stderr": ""}
        self._dirty = True
        self.done = False
        #: Python warnings raised by the notebook's own cells, as ``Category: message (cell k)``.
        self.warnings: list[str] = []
        #: Seconds spent in this object's hooks by the executing thread (the benchmark's figure).
        self.hook_seconds = 0.0
        self.stdout, self.stderr = _Stream(self, "stdout"), _Stream(self, "stderr")

    # -- called by papermill's client (executing thread) ------------------------------------------------
    def begin(self, cells: Iterable[Any]) -> None:
        """Number the code cells and label each with the markdown heading above it, or its first line."""
        t0 = time.perf_counter()
        heading, number, labels = "", 0, {}
        for index, cell in enumerate(cells):
            source = cell.get("source", "")
            if cell.get("cell_type") == "markdown":
                found = _HEADING.findall(source)
                heading = found[-1] if found else heading
            elif cell.get("cell_type") == "code" and source.strip():
                number += 1
                first = next((line.strip() for line in source.splitlines() if line.strip()), "")
                labels[index] = (number, (heading or first)[:120])
        with self._lock:
            self._labels, self.cells, self._dirty = labels, number, True
        self.hook_seconds += time.perf_counter() - t0

    def cell_start(self, cell: Any = None, cell_index: int = 0, **_: Any) -> None:
        """nbclient's ``on_cell_start`` hook."""
        t0 = time.perf_counter()
        found = self._labels.get(cell_index)
        if found is not None:
            with self._lock:
                self.cell, self.cell_label = found
                self._dirty = True
        self.hook_seconds += time.perf_counter() - t0

    def write(self, stream: str, text: str) -> None:
        """A stream output of the running cell (papermill's ``stdout_file``/``stderr_file``)."""
        t0 = time.perf_counter()
        with self._lock:
            text = self._partial.get(stream, "") + text
            *complete, rest = text.split("\n")
            self._partial[stream] = rest[-MAX_LINE:]
            for line in complete:
                line = line.rsplit("\r", 1)[-1]  # progress bars redraw their line: keep what is shown last
                self._lines.append(LogLine(stream=stream, text=line[:MAX_LINE]))
                if stream == "stderr":
                    self._warning(line)
            if len(self._lines) > MAX_LINES_PER_EVENT:  # a burst: keep the newest, count the rest as skipped
                skipped = len(self._lines) - MAX_LINES_PER_EVENT
                self._sent += skipped
                del self._lines[:skipped]
            self._dirty = True
        self.hook_seconds += time.perf_counter() - t0

    def _warning(self, line: str) -> None:
        match = _CELL_WARNING.search(line)
        if match and len(self.warnings) < MAX_WARNINGS:
            text = f"{match.group(2)}: {match.group(3).strip()[:300]}" + (f" (cell {self.cell})" if self.cell else "")
            if text not in self.warnings:
                self.warnings.append(text)

    # -- called by the sender --------------------------------------------------------------------------
    def event(self, force: bool = False) -> ProgressEvent | None:
        """What changed since the previous event (None when nothing did and ``force`` is not set)."""
        with self._lock:
            if not self._dirty and not force:
                return None
            if self.done:  # what is left unterminated is a line too
                for stream, rest in self._partial.items():
                    if rest:
                        self._lines.append(LogLine(stream=stream, text=rest))  # type: ignore[arg-type]
                        self._partial[stream] = ""
            lines, offset = self._lines, self._sent
            self._sent += len(lines)
            self._lines = []
            self._dirty = False
            return ProgressEvent(job_id=self.job_id, instrument=self.instrument, rb_number=self.rb_number,
                                 started_at=self.started_at, elapsed_seconds=round(time.monotonic() - self._t0, 2),
                                 cell=self.cell, cells=self.cells, cell_label=self.cell_label, log_offset=offset,
                                 lines=lines, done=self.done)


class ProgressSender:
    """One thread per runner sending what changed in its running jobs, each at most once per ``interval``."""

    def __init__(self, publisher: Any, interval: float = 1.0):
        self.publisher = publisher
        self.interval = interval
        self._runs: dict[str, RunProgress] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, job_id: str, instrument: str | None, rb_number: str | None) -> RunProgress:
        progress = RunProgress(job_id, instrument, rb_number)
        with self._lock:
            self._runs[job_id] = progress
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="progress", daemon=True)
                self._thread.start()
        return progress

    def finish(self, progress: RunProgress) -> None:
        """The run ended: send what is left, marked done, now (the portal stops showing it as running)."""
        with self._lock:
            self._runs.pop(progress.job_id, None)
        progress.done = True
        self._send(progress.event(force=True))

    def close(self) -> None:
        self._stop.set()

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            with self._lock:
                runs = list(self._runs.values())
            for progress in runs:
                self._send(progress.event())

    def _send(self, event: ProgressEvent | None) -> None:
        if event is None:
            return
        try:
            self.publisher.send(REDUCTION_PROGRESS, event, key=event.job_id)
        except Exception as exc:  # progress is best effort: never let it fail a reduction
            log.debug("progress of %s not sent: %s", event.job_id[:8], exc)
