"""A topic as a table: the last value per key, replayed from the start and then followed live.

This is how nbreduce keeps state without a database: job status, parameter defaults, trigger
bookkeeping and health are topics, and every reader folds them into "last value per key" itself
(correct without compaction, which the embedded broker never does). A tombstone (a record without a
value) deletes its key. One :class:`TopicTable` per topic (optionally per key prefix of a shared topic),
used three ways:

* :meth:`load` — read to the end once (CLI views, start-up state);
* :meth:`follow` — keep following in the caller's thread until a stop event (portal, runner, demo);
* :meth:`poll` — one batch at a time, for a caller that multiplexes several tables in its own loop.

``caught_up`` is set once every partition has reached its end at least once: from then on the table
is complete as of its start, which is when a reader may act on it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition
from pydantic import BaseModel, ValidationError

from runner.bus.clients import RateLimited, client_config, low_latency, read_topic, take
from runner.config import BrokerNotConfigured, Settings

log = logging.getLogger(__name__)
log.addFilter(RateLimited())  # a follower's complaints while the broker is away: once per 30 s

M = TypeVar("M", bound=BaseModel)


class TopicTable(Generic[M]):
    """Last ``model`` per key of ``topic``; keys are the records' keys unless ``key`` derives them from the value.

    ``prefix`` keeps only records whose key starts with it (several tables share the trigger-state topic)
    and strips it from the table's keys; ``where`` keeps only values it accepts. ``newer(new, old)`` decides
    whether a value replaces the one held (default: always, i.e. log order), e.g. a job's final state is
    never replaced by an older, non-final one. ``keep`` turns a value into what the table holds (default: the
    value), for a long-lived reader that needs a few fields of each of many values: it must keep what ``newer``
    reads.
    """

    def __init__(self, settings: Settings, topic: str, model: type[M], *, key: Callable[[M], str] | None = None,
                 prefix: str = "", newer: Callable[[M, M], bool] | None = None,
                 where: Callable[[M], bool] | None = None, keep: Callable[[M], Any] | None = None):
        self.settings = settings
        self.topic = topic
        self.model = model
        self.prefix = prefix
        self._key = key
        self._newer = newer
        self._where = where
        self._keep = keep
        self.rows: dict[str, M] = {}
        #: Records that were not valid ``model`` values (kept out of the table, counted).
        self.invalid = 0
        self.caught_up = threading.Event()
        #: Why following stopped working, while it does not (None when it works).
        self.error: str | None = None
        self._lock = threading.RLock()
        self._consumer: Consumer | None = None
        self._pending: set[int] = set()

    # -- folding ------------------------------------------------------------------------------------
    def apply(self, raw_key: bytes | None, raw_value: bytes | None) -> M | None:
        """Fold one record; returns the value when it changed the table (tombstones and stale values: None)."""
        key = raw_key.decode(errors="replace") if raw_key is not None else None
        if key is not None and not key.startswith(self.prefix):
            return None
        if raw_value is None:  # tombstone
            if key is not None:
                with self._lock:
                    self.rows.pop(key[len(self.prefix):], None)
            return None
        try:
            value = self.model.model_validate_json(raw_value)
        except (ValidationError, ValueError):
            self.invalid += 1
            log.debug("%s: ignoring a record that is not a %s (key %r)", self.topic, self.model.__name__, key)
            return None
        return self.put(value, key[len(self.prefix):] if self._key is None and key is not None else None)

    def put(self, value: M, key: str | None = None) -> M | None:
        """Fold a value known without reading it back (the writer's own update); same rules as :meth:`apply`."""
        if self._where is not None and not self._where(value):
            return None
        if key is None:
            if self._key is None:
                raise ValueError(f"{self.topic}: records without a key cannot be folded")
            key = self._key(value)
        with self._lock:
            current = self.rows.get(key)
            if current is not None and self._newer is not None and not self._newer(value, current):
                return None
            self.rows[key] = value if self._keep is None else self._keep(value)
        return value

    # -- reading ------------------------------------------------------------------------------------
    def get(self, key: str) -> M | None:
        with self._lock:
            return self.rows.get(key)

    def snapshot(self) -> list[M]:
        with self._lock:
            return list(self.rows.values())

    def items(self) -> list[tuple[str, M]]:
        with self._lock:
            return list(self.rows.items())

    def __len__(self) -> int:
        return len(self.rows)

    def load(self, timeout: float = 30) -> TopicTable[M]:
        """Fold the whole topic as it is now (see :func:`runner.bus.clients.read_topic`); returns ``self``."""
        for msg in read_topic(self.settings, self.topic, timeout=timeout):
            self.apply(msg.key(), msg.value())
        self.caught_up.set()
        return self

    # -- following ----------------------------------------------------------------------------------
    def open(self) -> None:
        """Assign every partition from its beginning (no consumer group: nothing to join, nothing committed)."""
        if self._consumer is not None:
            return
        consumer = Consumer({**client_config(self.settings), "group.id": f"nbreduce-table-{self.topic}",
                             "enable.auto.commit": False, "enable.partition.eof": True,
                             **low_latency(self.settings)})
        try:
            metadata = consumer.list_topics(self.topic, timeout=self.settings.broker.timeout_seconds)
            topic = metadata.topics.get(self.topic)
            if topic is None or topic.error is not None:
                raise KafkaException(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, f"no topic {self.topic}"))
            self._pending = set(topic.partitions)
            consumer.assign([TopicPartition(self.topic, p, OFFSET_BEGINNING) for p in topic.partitions])
        except BaseException:
            consumer.close()
            raise
        self._consumer = consumer

    def poll(self, timeout: float = 0.2, batch: int = 10000) -> list[M]:
        """Fold what arrived within ``timeout``; returns the values that changed the table."""
        self.open()
        assert self._consumer is not None
        changed: list[M] = []
        for msg in take(self._consumer, batch, timeout):
            err = msg.error()
            if err is None:
                value = self.apply(msg.key(), msg.value())
                if value is not None:
                    changed.append(value)
            elif err.code() == KafkaError._PARTITION_EOF:
                self._pending.discard(msg.partition())
                if not self._pending:
                    self.caught_up.set()
            else:
                log.warning("following %s: %s", self.topic, err)
        return changed

    def follow(self, stop: threading.Event, on_change: Callable[[M], None] | None = None,
               retry_seconds: float = 2.0) -> None:
        """Follow the topic until ``stop`` is set, calling ``on_change`` for each change; broker failures are
        logged and retried (the table is rebuilt from the start, so nothing is missed)."""
        while not stop.is_set():
            try:
                changed = self.poll()
            except (KafkaException, BrokerNotConfigured) as exc:
                self.error = f"{self.topic} unavailable: {exc}"
                log.warning("following %s; retrying in %.0f s", self.error, retry_seconds)
                self.close()
                stop.wait(retry_seconds)
                continue
            self.error = None
            for value in changed:
                if on_change is not None:
                    on_change(value)
        self.close()

    def start(self, stop: threading.Event, on_change: Callable[[M], None] | None = None) -> threading.Thread:
        """:meth:`follow` in a daemon thread."""
        thread = threading.Thread(target=self.follow, args=(stop, on_change), name=f"follow-{self.topic}",
                                  daemon=True)
        thread.start()
        return thread

    def close(self) -> None:
        if self._consumer is not None:
            consumer, self._consumer = self._consumer, None
            consumer.close()

