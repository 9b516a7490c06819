"""The Kafka topics of nbreduce, with explicit partitions, retention and cleanup policy.

Retention is set on every topic because Redpanda's local default (24 h) would silently drop job
history. Readers never rely on compaction: the embedded Tansu broker does not compact, so every
reader folds "last value per key wins" itself. Reasons for each figure: docs/operations.md.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from confluent_kafka.admin import AdminClient, NewTopic

from runner.config import Settings

DAY_MS = 24 * 3600 * 1000

RUN_COMPLETIONS = "nbreduce.run-completions"
REDUCTION_REQUESTS = "nbreduce.reduction-requests"
REDUCTION_STATUS = "nbreduce.reduction-status"
DEAD_LETTER = "nbreduce.dead-letter"
PARAMETER_DEFAULTS = "nbreduce.parameter-defaults"
TRIGGER_STATE = "nbreduce.trigger-state"
HEALTH = "nbreduce.health"
REDUCTION_PROGRESS = "nbreduce.reduction-progress"
NOTIFICATIONS = "nbreduce.notifications"

#: Kafka headers on a re-injected dead letter: the dead letter's id, and an id fresh for every replay.
#: Each replay is a new job (the original is final as ``rejected``), the same one on redelivery.
REPLAY_HEADER = "nbreduce-replay-of"
REPLAY_ID_HEADER = "nbreduce-replay-id"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    retention_days: int | None  # None = keep forever
    cleanup_policy: str
    purpose: str

    @property
    def short_name(self) -> str:
        """Key of this topic in ``retention.topic_days`` (``reduction_status`` for ``nbreduce.reduction-status``)."""
        return self.name.split(".", 1)[1].replace("-", "_")

    def retention_ms(self, overrides: Mapping[str, int] | None = None) -> int:
        value = (overrides or {}).get(self.short_name, self.retention_days)
        return -1 if value is None or value < 0 else value * DAY_MS

    def config(self, overrides: Mapping[str, int] | None = None) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms(overrides)), "cleanup.policy": self.cleanup_policy}


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(RUN_COMPLETIONS, 6, 30, "delete", "run-completion triggers from instruments and watchers"),
    TopicSpec(REDUCTION_REQUESTS, 6, 30, "delete", "manual submissions and reruns"),
    TopicSpec(REDUCTION_STATUS, 6, 400, "compact,delete", "job state keyed by job id (last event wins)"),
    TopicSpec(DEAD_LETTER, 1, 90, "delete", "rejected messages with original bytes and reason"),
    TopicSpec(PARAMETER_DEFAULTS, 1, None, "compact", "default template parameters per instrument / RB"),
    TopicSpec(TRIGGER_STATE, 1, None, "compact", "trigger bookkeeping, e.g. last run seen per instrument"),
    TopicSpec(HEALTH, 1, 7, "compact,delete", "heartbeats of runners and triggers, keyed by component"),
    TopicSpec(REDUCTION_PROGRESS, 6, 1, "delete", "live progress and log lines of running jobs, keyed by job id"),
    TopicSpec(NOTIFICATIONS, 1, None, "compact", "users' notification subscriptions and their last deliveries"),
)


def ensure_topics(admin: AdminClient, settings: Settings, specs: tuple[TopicSpec, ...] = TOPICS,
                  timeout: float = 30) -> list[str]:
    """Create the topics that are missing; returns the names created. Existing topics are left as they are."""
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [s for s in specs if s.name not in existing]
    replication = settings.broker.replication_factor
    overrides = settings.retention.topic_days
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=replication, config=s.config(overrides))
         for s in missing],
        request_timeout=timeout,
    )
    created = []
    for name, future in futures.items():
        try:
            future.result()
            created.append(name)
        except Exception as exc:  # a concurrent creator is fine, anything else is not
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    return created
