"""Consuming a topic as work: commit an offset only after the work of every message before it is done.

One mechanism for every consumer-group member that does work per message (the runner, the consuming
triggers). Messages are handed out at most as many as the caller can take; when it can take none its
partitions are paused, so a long reduction never costs the group membership (the caller keeps
calling :meth:`WorkConsumer.poll`). Offsets are tracked per partition and committed up to the lowest
message still in flight. On a rebalance the finished work of revoked partitions is committed and the
wanted pause state is applied to the new assignment: librdkafka keeps a partition's pause flag across
revoke and re-assign, so without this a runner that was busy during a broker outage would get its
partitions back paused and never fetch again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition

from runner.bus.clients import BROKER_DOWN, group_consumer, take
from runner.config import Settings

log = logging.getLogger(__name__)

#: A partition as ``(topic, partition)``.
PartitionKey = tuple[str, int]


class OffsetTracker:
    """Which offset of each partition may be committed while several messages are in flight.

    Messages of a partition arrive in offset order, so the committable position is the lowest offset
    still in flight, or one past the highest seen when none is.
    """

    def __init__(self) -> None:
        self._inflight: dict[tuple[str, int], set[int]] = {}
        self._highest: dict[tuple[str, int], int] = {}
        self._committed: dict[tuple[str, int], int] = {}

    def start(self, msg: Message) -> None:
        key = (msg.topic(), msg.partition())
        self._inflight.setdefault(key, set()).add(msg.offset())
        self._highest[key] = max(self._highest.get(key, -1), msg.offset())

    def finish(self, msg: Message) -> None:
        self._inflight.get((msg.topic(), msg.partition()), set()).discard(msg.offset())

    def in_flight(self) -> int:
        return sum(len(v) for v in self._inflight.values())

    def committable(self, keys: Sequence[tuple[str, int]] | None = None) -> list[TopicPartition]:
        offsets = []
        for key in keys if keys is not None else list(self._highest):
            if key not in self._highest:
                continue
            pending = self._inflight.get(key)
            position = min(pending) if pending else self._highest[key] + 1
            if position > self._committed.get(key, -1):
                offsets.append(TopicPartition(key[0], key[1], position))
        return offsets

    def committed(self, offsets: Sequence[TopicPartition]) -> None:
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset

    def forget(self, keys: Sequence[tuple[str, int]]) -> None:
        """A partition went to another member: what was in flight here is no longer ours to commit."""
        for key in keys:
            self._inflight.pop(key, None)
            self._highest.pop(key, None)
            self._committed.pop(key, None)


class WorkConsumer:
    """A consumer-group member of ``topics`` handing out messages as work, committing only finished work.

    The caller's loop: ``poll(n)`` (n = how many it can take now, 0 when busy), ``done(msg)`` when a
    message's work is finished (its results published), ``commit()`` from the polling thread.
    """

    def __init__(self, settings: Settings, group: str, topics: Sequence[str], *, name: str | None = None,
                 consumer: Consumer | None = None,
                 on_revoke: Callable[[list[PartitionKey]], None] | None = None, **config: Any):
        """``consumer``: an already configured client (tests); by default a group member of ``group``.
        ``on_revoke`` is told which partitions went away (revoked or lost): their unstarted work is no longer
        ours (it is redelivered to the new owner)."""
        self.name = name or group
        self._revoked = on_revoke
        self.tracker = OffsetTracker()
        #: The latest broker problem seen by this consumer (None once it fetches or is assigned again).
        self.broker_error: str | None = None
        self._paused = False
        self._error_logged = 0.0
        self._consumer: Consumer = consumer or group_consumer(settings, group, **config)
        self._consumer.subscribe(list(topics), on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)

    # -- the caller's loop --------------------------------------------------------------------------
    def poll(self, max_messages: int, timeout: float = 0.2) -> list[Message]:
        """Up to ``max_messages`` new messages (none, and partitions paused, when it is 0)."""
        self._set_paused(max_messages <= 0)
        messages = []
        for msg in take(self._consumer, max(1, max_messages), timeout):
            err = msg.error()
            if err is not None:
                self._report(err)
                continue
            self.broker_error = None
            self.tracker.start(msg)
            messages.append(msg)
        return messages

    def done(self, msg: Message) -> None:
        """The work of ``msg`` is finished: its offset may be committed once everything before it is."""
        self.tracker.finish(msg)

    def commit(self) -> bool:
        """Commit what is committable; False (and logged) when the broker did not take it (retried next time)."""
        offsets = self.tracker.committable(self._assigned())
        if not offsets:
            return True
        try:
            self._consumer.commit(offsets=offsets, asynchronous=False)
        except KafkaException as exc:
            self._report(exc.args[0] if exc.args and isinstance(exc.args[0], KafkaError) else
                         KafkaError(KafkaError._FAIL, str(exc)), "commit failed (will retry)")
            return False
        self.broker_error = None
        self.tracker.committed(offsets)
        return True

    def rewind(self, unhandled: Sequence[Message]) -> None:
        """Seek each partition back to its first unhandled message, so nothing is skipped after a failure."""
        first: dict[tuple[str, int], int] = {}
        for msg in unhandled:
            where = (msg.topic(), msg.partition())
            first[where] = min(first.get(where, msg.offset()), msg.offset())
        for (topic, partition), offset in first.items():
            try:
                self._consumer.seek(TopicPartition(topic, partition, offset))
            except KafkaException as exc:  # partition revoked meanwhile: its new owner starts at the commit
                log.warning("%s: could not rewind %s[%d] to %d: %s", self.name, topic, partition, offset, exc)

    def assignment(self) -> list[tuple[str, int]]:
        return self._assigned()

    def close(self) -> None:
        """Commit finished work and leave the group (a clean leave rebalances at once, no session timeout)."""
        self.commit()
        self._consumer.close()

    # -- internals ----------------------------------------------------------------------------------
    def _assigned(self) -> list[tuple[str, int]]:
        try:
            return [(tp.topic, tp.partition) for tp in self._consumer.assignment()]
        except KafkaException:
            return []

    def _set_paused(self, paused: bool) -> None:
        if paused == self._paused:
            return
        self._paused = paused
        partitions = self._consumer.assignment()
        if partitions:
            (self._consumer.pause if paused else self._consumer.resume)(partitions)

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self.broker_error = None
        log.info("%s: assigned %s", self.name, [(p.topic, p.partition) for p in partitions])
        if partitions:  # the wanted state, whatever librdkafka remembers of these partitions
            (consumer.pause if self._paused else consumer.resume)(partitions)

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        keys = [(p.topic, p.partition) for p in partitions]
        offsets = self.tracker.committable(keys)
        if offsets:
            try:
                consumer.commit(offsets=offsets, asynchronous=False)
            except KafkaException as exc:
                log.warning("%s: commit on revoke failed: %s", self.name, exc)
        self.tracker.forget(keys)
        if keys and self._revoked is not None:
            self._revoked(keys)

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Partitions lost without a clean revoke (session timed out): nothing may be committed for them."""
        keys = [(p.topic, p.partition) for p in partitions]
        log.warning("%s: lost %s", self.name, keys)
        self.tracker.forget(keys)
        if keys and self._revoked is not None:
            self._revoked(keys)

    def _report(self, err: KafkaError, what: str = "") -> None:
        if err.code() == KafkaError._PARTITION_EOF:
            return
        if err.code() in BROKER_DOWN:
            self.broker_error = f"broker unreachable: {err.str()}"
        now = time.monotonic()
        if now - self._error_logged >= 30:  # librdkafka retries by itself: one line per 30 s is enough
            self._error_logged = now
            log.warning("%s: %s%s", self.name, f"{what}: " if what else "", err.str())
