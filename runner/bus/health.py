"""Heartbeats: every long-running component says on ``nbreduce.health`` that it is alive and how it is.

One record per component, keyed ``<kind>:<name>``; readers fold the topic (last heartbeat per key
wins) and call a component stale when its last heartbeat is older than a few of its intervals. Tests
and benchmarks wait on a runner's heartbeat instead of sleeping; ``nbreduce runners`` and
``nbreduce triggers`` show them.
"""

from __future__ import annotations

import os
import socket
from datetime import datetime, timedelta
from typing import Any, Literal, TypeVar

from pydantic import Field

from runner.bus.models import WireModel, utcnow
from runner.bus.table import TopicTable
from runner.bus.topics import HEALTH
from runner.config import Settings

#: A component whose last heartbeat is older than this many of its intervals is shown as stale.
STALE_AFTER_INTERVALS = 3


class Heartbeat(WireModel):
    """What every heartbeat says."""

    name: str
    host: str = Field(default_factory=socket.gethostname)
    pid: int = Field(default_factory=os.getpid)
    started_at: datetime = Field(default_factory=utcnow)
    timestamp: datetime = Field(default_factory=utcnow)
    #: Seconds until the next heartbeat is due.
    interval_seconds: float = 30.0
    #: ``ok``, ``starting``, ``broker unreachable``, ``archive unwritable``, ``stopping`` or ``stopped``.
    state: str = "ok"
    #: What is wrong, in the words of whatever said so (the broker client, the file system), while it lasts.
    problem: str | None = None

    component: str = "component"

    @property
    def key(self) -> str:
        return f"{self.component}:{self.name}"

    def stale(self, now: datetime | None = None) -> bool:
        age = (now or utcnow()) - self.timestamp
        return self.state != "stopped" and age > timedelta(seconds=STALE_AFTER_INTERVALS * self.interval_seconds)


class RunnerHealth(Heartbeat):
    """Heartbeat of one runner: its group, environments, running jobs, assignment and kernel pool."""

    kind: Literal["runner-health"] = "runner-health"
    component: Literal["runner"] = "runner"
    group: str
    environments: list[str] | None = None
    max_parallel: int
    running: list[str] = Field(default_factory=list)
    partitions: list[str] = Field(default_factory=list)
    #: ``runner.kernels.pool.PoolStats`` as a dict (warm kernels per name, hits, cold starts, failures).
    kernels: dict[str, Any] = Field(default_factory=dict)
    jobs_done: int = 0


class TriggerHealth(Heartbeat):
    """Heartbeat of one trigger: a stalled trigger shows."""

    kind: Literal["trigger-health"] = "trigger-health"
    component: Literal["trigger"] = "trigger"
    trigger_kind: str
    #: Latest run number seen per instrument.
    last_run_seen: dict[str, int] = Field(default_factory=dict)
    published: int = 0
    dead_lettered: int = 0
    errors: int = 0
    last_error: str | None = None
    last_error_at: datetime | None = None


H = TypeVar("H", bound=Heartbeat)


def health_table(settings: Settings, model: type[H]) -> TopicTable[H]:
    """The latest heartbeat of every component of ``model``'s kind."""
    component = model.model_fields["component"].default
    return TopicTable(settings, HEALTH, model, prefix=f"{component}:")
