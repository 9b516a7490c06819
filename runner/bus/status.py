"""Job state without a database: the status topic folded into the latest event per job.

Correct without compaction (the embedded broker never compacts): every reader replays the topic and
keeps, per job id, the event that :func:`supersedes` the others. The same table serves the CLI
(``nbreduce runs``), the runner at start-up and the portal, which keeps following it for live updates.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Self

from runner.bus.models import JobState, StatusEvent
from runner.bus.table import TopicTable
from runner.bus.topics import REDUCTION_STATUS
from runner.config import Settings


@dataclass(frozen=True, slots=True)
class JobMemo:
    """What a runner remembers of a job: enough to tell a first delivery from a redelivery, a finished job or
    another message reusing the job's id. A runner lives for months and knows every job the status topic holds:
    a memo takes 0.4 KB where the event takes 6.4 KB (measured with tracemalloc: a succeeded job with a trigger,
    parameters, scraps and timings, 1.2 KB on the wire), so 300,000 jobs take 116 MB, not 1.9 GB."""

    state: JobState
    timestamp: datetime
    instrument: str | None
    run_number: int | list[int] | None
    queued_at: datetime | None
    #: The digest of the message the job was made from (``TriggerRef.digest``).
    digest: str | None

    @classmethod
    def of(cls, event: StatusEvent) -> JobMemo:
        return cls(event.state, event.timestamp, sys.intern(event.instrument) if event.instrument else None,
                   event.run_number, event.queued_at, event.trigger.digest if event.trigger else None)


def supersedes(new: StatusEvent | JobMemo, old: StatusEvent | JobMemo) -> bool:
    """Whether ``new`` replaces ``old`` as a job's state: a final state is never replaced by a non-final one
    (a redelivered job re-announcing its archived result can be older than a "queued" published meanwhile);
    otherwise the later event wins."""
    if new.state.final != old.state.final:
        return new.state.final
    return new.timestamp >= old.timestamp


class StatusView(TopicTable[StatusEvent]):
    """Latest :class:`StatusEvent` per job id."""

    def __init__(self, settings: Settings, keep: Callable[[StatusEvent], Any] | None = None):
        super().__init__(settings, REDUCTION_STATUS, StatusEvent, key=lambda event: event.job_id, newer=supersedes,
                         keep=keep)

    @property
    def jobs(self) -> dict[str, StatusEvent]:
        return self.rows

    @classmethod
    def rebuild(cls, settings: Settings) -> Self:
        """Replay the whole status topic (up to its current end)."""
        view = cls(settings)
        view.load()
        return view


class JobMemos(StatusView):
    """The runner's view of the status topic: a :class:`JobMemo` per job (``put`` takes whole events)."""

    def __init__(self, settings: Settings):
        super().__init__(settings, keep=JobMemo.of)

    def get(self, key: str) -> JobMemo | None:  # type: ignore[override]
        return super().get(key)  # type: ignore[return-value]
