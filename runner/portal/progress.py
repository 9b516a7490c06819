"""Running reductions as the portal shows them: the latest progress of each job and its log so far.

The progress topic is folded with a :class:`~runner.bus.table.TopicTable` (last event per job: the progress
bars of the run list); every event that changed it is also handed to :class:`ProgressBoard`, which appends
its lines to that job's log (bounded), so the run page can stream a log that grows. Logs of finished jobs
are dropped after a while: the executed notebook holds the whole output.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from runner.bus.models import ProgressEvent
from runner.bus.table import TopicTable
from runner.bus.topics import REDUCTION_PROGRESS
from runner.config import Settings

#: Lines of one job's log the portal keeps (older ones are shown as skipped).
MAX_LOG_LINES = 5000
#: Seconds a finished job's log stays in memory (a page opened just after the end still shows it).
KEEP_FINISHED_SECONDS = 600


@dataclass
class JobLog:
    """The log of one job as far as the portal has seen it."""

    lines: deque = field(default_factory=lambda: deque(maxlen=MAX_LOG_LINES))
    #: Number of lines of the whole log before ``lines[0]``.
    first: int = 0
    finished: float | None = None

    @property
    def end(self) -> int:
        return self.first + len(self.lines)

    def add(self, event: ProgressEvent) -> list[dict[str, Any]]:
        """Append the event's lines; returns what is new for live readers (a gap becomes a marker line)."""
        new: list[dict[str, Any]] = []
        missing = event.log_offset - self.end
        if missing > 0:  # lines the runner skipped in a burst, or events no longer on the topic
            gap = {"stream": "gap", "text": f"… {missing} lines not shown …"}
            if len(self.lines) == self.lines.maxlen:
                self.first += 1
            self.lines.append(gap)
            new.append(gap)
            self.first += missing - 1
        skip = max(0, self.end - event.log_offset)  # already have these (a replay)
        for line in event.lines[skip:]:
            entry = {"stream": line.stream, "text": line.text}
            if len(self.lines) == self.lines.maxlen:
                self.first += 1
            self.lines.append(entry)
            new.append(entry)
        if event.done:
            self.finished = time.monotonic()
        return new


def progress_payload(event: ProgressEvent) -> dict[str, Any]:
    """What the run list and the run page show of a running job."""
    return {"job_id": event.job_id, "cell": event.cell, "cells": event.cells, "label": event.cell_label,
            "elapsed": event.elapsed_seconds, "fraction": round(event.fraction, 3), "done": event.done}


class ProgressBoard(TopicTable[ProgressEvent]):
    """Latest progress per job (the table) plus each job's log (fed by :meth:`record`, on the IOLoop)."""

    def __init__(self, settings: Settings):
        super().__init__(settings, REDUCTION_PROGRESS, ProgressEvent, key=lambda event: event.job_id)
        self.logs: dict[str, JobLog] = {}

    def record(self, event: ProgressEvent) -> list[dict[str, Any]]:
        if event.done and not self.caught_up.is_set():  # replaying jobs that ended: their notebooks tell all
            self.logs.pop(event.job_id, None)
            with self._lock:
                self.rows.pop(event.job_id, None)
            return []
        log = self.logs.setdefault(event.job_id, JobLog())
        new = log.add(event)
        self._forget_finished()
        return new

    def running(self, job_id: str) -> ProgressEvent | None:
        """The job's latest progress while it runs (None once done or never seen)."""
        event = self.get(job_id)
        return event if event is not None and not event.done else None

    def log_of(self, job_id: str) -> tuple[int, list[dict[str, Any]]]:
        log = self.logs.get(job_id)
        return (log.first, list(log.lines)) if log is not None else (0, [])

    def _forget_finished(self) -> None:
        now = time.monotonic()
        old = [j for j, log in self.logs.items() if log.finished and now - log.finished > KEEP_FINISHED_SECONDS]
        for job_id in old:
            self.logs.pop(job_id, None)
            with self._lock:
                self.rows.pop(job_id, None)
