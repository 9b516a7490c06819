"""Job state without a database: fold the status topic, last event per job id wins.

Correct without compaction (the embedded broker never compacts): every reader replays the topic and
keeps the newest event per key. The same fold serves the CLI (``nbreduce runs``), the runner at
start-up and the portal, which keeps following the topic for live updates.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

from confluent_kafka import Message

from runner.bus.clients import follow_topic, read_topic
from runner.bus.models import StatusEvent
from runner.bus.topics import REDUCTION_STATUS
from runner.config import Settings


class StatusView:
    """Latest :class:`StatusEvent` per job id, in memory."""

    def __init__(self) -> None:
        self.jobs: dict[str, StatusEvent] = {}
        self.invalid = 0
        self._lock = threading.Lock()

    def apply(self, event: StatusEvent) -> bool:
        """Fold one event; returns True when it changed the view (events older than what we hold are ignored)."""
        with self._lock:
            current = self.jobs.get(event.job_id)
            if current is not None and current.timestamp > event.timestamp:
                return False
            self.jobs[event.job_id] = event
            return True

    def apply_raw(self, raw: bytes | None) -> StatusEvent | None:
        if raw is None:  # tombstone of a compacted topic: nothing to keep
            return None
        try:
            event = StatusEvent.from_bytes(raw)
        except ValueError:
            self.invalid += 1
            return None
        return event if self.apply(event) else None

    def snapshot(self) -> list[StatusEvent]:
        with self._lock:
            return list(self.jobs.values())

    def get(self, job_id: str) -> StatusEvent | None:
        return self.jobs.get(job_id)

    @classmethod
    def rebuild(cls, settings: Settings) -> StatusView:
        """Replay the whole status topic (up to its current end)."""
        view = cls()
        for msg in read_topic(settings, REDUCTION_STATUS):
            view.apply_raw(msg.value())
        return view


def follow(settings: Settings, view: StatusView, stop: threading.Event,
           on_change: Callable[[StatusEvent], None] | None = None, caught_up: threading.Event | None = None) -> None:
    """Fold the status topic from the beginning and keep following it until ``stop`` is set."""

    def on_message(msg: Message) -> None:
        changed = view.apply_raw(msg.value())
        if changed is not None and on_change is not None:
            on_change(changed)

    follow_topic(settings, REDUCTION_STATUS, stop, on_message, caught_up)
