"""Job state without a database: the status topic folded into the latest event per job.

Correct without compaction (the embedded broker never compacts): every reader replays the topic and
keeps, per job id, the event that :func:`supersedes` the others. The same table serves the CLI
(``nbreduce runs``), the runner at start-up and the portal, which keeps following it for live updates.
"""

from __future__ import annotations

from runner.bus.models import StatusEvent
from runner.bus.table import TopicTable
from runner.bus.topics import REDUCTION_STATUS
from runner.config import Settings


def supersedes(new: StatusEvent, old: StatusEvent) -> bool:
    """Whether ``new`` replaces ``old`` as a job's state: a final state is never replaced by a non-final one
    (a redelivered job re-announcing its archived result can be older than a "queued" published meanwhile);
    otherwise the later event wins."""
    if new.state.final != old.state.final:
        return new.state.final
    return new.timestamp >= old.timestamp


class StatusView(TopicTable[StatusEvent]):
    """Latest :class:`StatusEvent` per job id."""

    def __init__(self, settings: Settings):
        super().__init__(settings, REDUCTION_STATUS, StatusEvent, key=lambda event: event.job_id, newer=supersedes)

    @property
    def jobs(self) -> dict[str, StatusEvent]:
        return self.rows

    @classmethod
    def rebuild(cls, settings: Settings) -> StatusView:
        """Replay the whole status topic (up to its current end)."""
        view = cls(settings)
        view.load()
        return view
