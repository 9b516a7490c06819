"""confluent-kafka clients configured for nbreduce.

Group timeouts are short on purpose: with librdkafka's default ``max.poll.interval.ms`` a JoinGroup
hangs for minutes on the embedded broker, so long reductions run off the polling thread instead.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from runner.bus.models import WireModel
from runner.config import Settings

log = logging.getLogger(__name__)
#: librdkafka's own log lines (connection refused while a broker restarts, ...) go to Python logging.
_librdkafka_log = logging.getLogger("nbreduce.librdkafka")

GROUP_SETTINGS = {
    "max.poll.interval.ms": 10000,
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
}
#: A fetch waits at most this long for new data: a run completion or a status event should reach its
#: consumer quickly, not after librdkafka's default 500 ms long-poll. Not for whole-topic reads: Tansu on
#: S3 storage answers a fetch whose wait is shorter than its storage read with no data, so a reader of
#: old data never reached the end (measured with 25 ms).
LOW_LATENCY = {"fetch.wait.max.ms": 100}


def client_config(settings: Settings) -> dict[str, Any]:
    """Connection settings of every client: bootstrap servers plus the librdkafka properties of
    ``broker.kafka``, which is how TLS and SASL are configured for a production broker."""
    return {"bootstrap.servers": settings.bootstrap(), "logger": _librdkafka_log, **settings.broker.kafka}


def admin(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings))


def producer(settings: Settings, **extra: Any) -> Producer:
    return Producer(
        {
            **client_config(settings),
            "acks": "all",
            "linger.ms": 2,
            "message.timeout.ms": 30000,
            **extra,
        }
    )


def group_consumer(settings: Settings, group: str, **extra: Any) -> Consumer:
    """A consumer-group member that commits offsets explicitly, only after the work is published."""
    return Consumer(
        {
            **client_config(settings),
            "group.id": group,
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "auto.offset.reset": "earliest",
            **GROUP_SETTINGS,
            **LOW_LATENCY,
            **extra,
        }
    )


class Publisher:
    """Synchronous publishing of wire models: returns only when the broker acknowledged the message."""

    def __init__(self, settings: Settings):
        self._producer = producer(settings)

    def publish(self, topic: str, message: WireModel | bytes | None, key: str | bytes | None = None,
                timeout: float = 30) -> None:
        """``message=None`` publishes a tombstone (deletes ``key`` on compacted topics)."""
        errors: list[KafkaError] = []
        value = message.to_bytes() if isinstance(message, WireModel) else message
        self._producer.produce(topic, value=value, key=key,
                               on_delivery=lambda err, _msg: errors.append(err) if err else None)
        remaining = self._producer.flush(timeout)
        if errors:
            raise KafkaException(errors[0])
        if remaining:
            raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, f"{topic}: not acknowledged in {timeout}s"))

    def send(self, topic: str, message: WireModel, key: str | bytes | None = None) -> None:
        """Publish without waiting for the acknowledgement (heartbeats: the next one supersedes a lost one)."""
        try:
            self._producer.produce(topic, value=message.to_bytes(), key=key,
                                   on_delivery=lambda err, _msg: log.debug("%s: not delivered: %s", topic, err) if err
                                   else None)
        except BufferError:  # the broker has been away long enough to fill the queue: drop this one
            log.debug("%s: producer queue full, dropped", topic)
        self._producer.poll(0)

    def close(self) -> None:
        self._producer.flush(10)


def read_topic(settings: Settings, topic: str, timeout: float = 30, batch: int = 10000) -> Iterator[Message]:
    """Every message of ``topic`` from the beginning up to the end of each partition at read time.

    Uses ``assign`` rather than a group (no rebalance wait, no committed offsets). The end of a
    partition is its partition-EOF event, not ``get_watermark_offsets`` (Tansu answers ListOffsets
    with a wrong high watermark), or the first message written after the read began, so a topic
    written to faster than it is fetched still ends.
    """
    consumer = Consumer(
        {
            **client_config(settings),
            "group.id": "nbreduce-reader",
            "enable.auto.commit": False,
            "enable.partition.eof": True,
            "fetch.max.bytes": 52428800,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout).topics.get(topic)
        if metadata is None or metadata.error is not None:
            return
        pending = set(metadata.partitions)
        began_ms = int(time.time() * 1000)
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in pending])
        idle_deadline = time.monotonic() + timeout
        while pending:
            messages = consumer.consume(batch, timeout=0.1)
            if not messages and time.monotonic() > idle_deadline:
                reason = f"{topic}: partitions {sorted(pending)} did not reach their end in {timeout}s"
                raise KafkaException(KafkaError(KafkaError._TIMED_OUT, reason))
            for msg in messages:
                idle_deadline = time.monotonic() + timeout
                err = msg.error()
                if err is None:
                    yield msg
                    if msg.timestamp()[1] > began_ms:
                        pending.discard(msg.partition())
                elif err.code() == KafkaError._PARTITION_EOF:
                    pending.discard(msg.partition())
                else:
                    raise KafkaException(err)
    finally:
        consumer.close()
