"""The Kafka topics of nbreduce, with explicit partitions, retention and cleanup policy.

Retention is set on every topic because Redpanda's local default (24 h) would silently drop job
history. Readers never rely on compaction: the embedded Tansu broker does not compact, so every
reader folds "last value per key wins" itself. Reasons for each figure: docs/operations.md.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from confluent_kafka.admin import AdminClient, NewTopic

DAY_MS = 24 * 3600 * 1000

RUN_COMPLETIONS = "nbreduce.run-completions"
REDUCTION_REQUESTS = "nbreduce.reduction-requests"
REDUCTION_STATUS = "nbreduce.reduction-status"
DEAD_LETTER = "nbreduce.dead-letter"
PARAMETER_DEFAULTS = "nbreduce.parameter-defaults"
TRIGGER_STATE = "nbreduce.trigger-state"

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
    def env_override(self) -> str:
        """Environment variable that overrides this topic's retention in days (-1 = forever)."""
        return "NBREDUCE_RETENTION_" + self.name.split(".", 1)[1].replace("-", "_").upper()

    def retention_ms(self) -> int:
        days = os.environ.get(self.env_override)
        value = int(days) if days is not None else self.retention_days
        return -1 if value is None or value < 0 else value * DAY_MS

    def config(self) -> dict[str, str]:
        return {"retention.ms": str(self.retention_ms()), "cleanup.policy": self.cleanup_policy}


TOPICS: tuple[TopicSpec, ...] = (
    TopicSpec(RUN_COMPLETIONS, 6, 30, "delete", "run-completion triggers from instruments and watchers"),
    TopicSpec(REDUCTION_REQUESTS, 6, 30, "delete", "manual submissions and reruns"),
    TopicSpec(REDUCTION_STATUS, 6, 400, "compact,delete", "job state keyed by job id (last event wins)"),
    TopicSpec(DEAD_LETTER, 1, 90, "delete", "rejected messages with original bytes and reason"),
    TopicSpec(PARAMETER_DEFAULTS, 1, None, "compact", "default template parameters per instrument / RB"),
    TopicSpec(TRIGGER_STATE, 1, None, "compact", "trigger bookkeeping, e.g. last run seen per instrument"),
)


def ensure_topics(admin: AdminClient, specs: tuple[TopicSpec, ...] = TOPICS, timeout: float = 30) -> list[str]:
    """Create the topics that are missing; returns the names created. Existing topics are left as they are."""
    existing = set(admin.list_topics(timeout=timeout).topics)
    missing = [s for s in specs if s.name not in existing]
    replication = int(os.environ.get("NBREDUCE_REPLICATION_FACTOR", "1"))  # 3 on a production Redpanda
    if not missing:
        return []
    futures = admin.create_topics(
        [NewTopic(s.name, num_partitions=s.partitions, replication_factor=replication, config=s.config())
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
