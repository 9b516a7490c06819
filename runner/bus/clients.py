"""confluent-kafka clients configured for nbreduce.

Group timeouts are short on purpose: with librdkafka's default ``max.poll.interval.ms`` a JoinGroup
hangs for minutes on the embedded broker, so long reductions run off the polling thread instead.

Broker outages are survived, not reported as failures of the work: every client reconnects by itself,
:func:`broker_trouble` tells an outage (retry as long as it takes) from a record the broker will never
take (a poison: handled once), producers have a bounded delivery time (and are idempotent where the broker
hands out producer ids correctly), and librdkafka's connection noise is rate-limited (one line per kind of
problem and 30 s, with the count of the rest).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from runner.bus.models import MAX_RECORD_BYTES, WireModel
from runner.config import BrokerNotConfigured, Settings

log = logging.getLogger(__name__)
#: librdkafka's own log lines (connection refused while a broker restarts, ...) go to Python logging.
_librdkafka_log = logging.getLogger("nbreduce.librdkafka")

#: Errors that mean "the broker is unreachable right now" (librdkafka reconnects by itself).
BROKER_DOWN = {KafkaError._TRANSPORT, KafkaError._ALL_BROKERS_DOWN, KafkaError._RESOLVE, KafkaError._TIMED_OUT,
               KafkaError._MSG_TIMED_OUT}
#: Kafka errors caused by the record itself: waiting never cures them. Every other Kafka error is broker
#: trouble (outage, leader change, authorisation being fixed ...) and is retried for as long as it lasts.
PERMANENT = {KafkaError.MSG_SIZE_TOO_LARGE, KafkaError.RECORD_LIST_TOO_LARGE, KafkaError.INVALID_MSG,
             KafkaError.INVALID_MSG_SIZE, KafkaError.INVALID_RECORD, KafkaError.INVALID_TIMESTAMP,
             KafkaError._INVALID_ARG, KafkaError._INVALID_TYPE}


#: Errors of an idempotent producer whose state a restarted broker no longer knows: that producer refuses every
#: later record (measured after a killed Tansu restarted: PRODUCER_FENCED on every publish, for ever), so it is
#: replaced by a new one, which gets a new producer id.
PRODUCER_LOST = {KafkaError._FATAL, KafkaError.PRODUCER_FENCED, KafkaError.INVALID_PRODUCER_EPOCH,
                 KafkaError.UNKNOWN_PRODUCER_ID, KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
                 KafkaError.INVALID_PRODUCER_ID_MAPPING}


#: What Tansu on S3 storage answers a write to a partition another producer wrote at the same moment (measured:
#: 3 producers writing one partition together, a third of their records); the record was not written.
WRITE_CONFLICT = KafkaError.UNKNOWN
#: Writes of a record refused in write conflicts by :meth:`Publisher.send` before it reports the conflict.
WRITE_ATTEMPTS = 10


def producer_lost(err: KafkaError) -> bool:
    return err.fatal() or err.code() in PRODUCER_LOST


class BrokerUnavailable(RuntimeError):
    """The broker did not answer in time (one clear line for the command line)."""


def broker_trouble(exc: BaseException) -> bool:
    """Whether ``exc`` is a broker problem that passes by itself (retry) rather than one of the record (poison)."""
    if isinstance(exc, BrokerNotConfigured | BrokerUnavailable):
        return True
    if not isinstance(exc, KafkaException):
        return False
    err = exc.args[0] if exc.args else None
    return not isinstance(err, KafkaError) or err.code() not in PERMANENT


class RateLimited(logging.Filter):
    """At most one log line per kind of message and ``interval`` seconds; the next one says how many were
    dropped. A broker outage otherwise floods the log (thousands of "Connection refused" a minute)."""

    _digits = re.compile(r"\d+")

    def __init__(self, interval: float = 30.0):
        super().__init__()
        self.interval = interval
        self._seen: dict[str, tuple[float, int]] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        kind = self._digits.sub("#", f"{record.name}:{record.msg}")[:200]
        now = time.monotonic()
        with self._lock:
            last, dropped = self._seen.get(kind, (-self.interval, 0))
            if now - last < self.interval:
                self._seen[kind] = (last, dropped + 1)
                return False
            self._seen[kind] = (now, 0)
        if dropped:
            record.msg = f"{record.msg} ({dropped} similar messages in the last {now - last:.0f} s not shown)"
        return True


_librdkafka_log.addFilter(RateLimited())

GROUP_SETTINGS = {
    "max.poll.interval.ms": 10000,
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
}
def low_latency(settings: Settings) -> dict[str, Any]:
    """A fetch waits at most this long for new data, so a run completion or a status event reaches its consumer
    at once rather than after librdkafka's default 500 ms long-poll.

    ``broker.fetch_wait_ms`` when set; else 10 ms on the embedded broker with memory storage (Tansu does not
    answer a waiting fetch of several partitions when data arrives: measured ~20 ms at 100 ms, 1-5 ms at
    5 ms) and 100 ms otherwise: Tansu on S3 storage answers a fetch whose wait is shorter than its storage
    read with no data at all (measured: nothing read at 10 ms or 25 ms), and Kafka or Redpanda answer a
    waiting fetch as soon as data arrives, whatever the wait. Not for whole-topic reads (librdkafka's default).
    """
    wait = settings.broker.fetch_wait_ms
    if wait is None:
        wait = 100
        if not settings.broker.bootstrap_servers:
            with contextlib.suppress(OSError, ValueError):
                wait = 10 if json.loads(settings.broker_state_file.read_text()).get("storage") == "memory" else 100
    return {"fetch.wait.max.ms": wait}


def client_config(settings: Settings) -> dict[str, Any]:
    """Connection settings of every client: bootstrap servers plus the librdkafka properties of
    ``broker.kafka``, which is how TLS and SASL are configured for a production broker."""
    return {"bootstrap.servers": settings.bootstrap(), "logger": _librdkafka_log, "log.connection.close": False,
            "reconnect.backoff.max.ms": 2000, **settings.broker.kafka}


def admin(settings: Settings) -> AdminClient:
    return AdminClient(client_config(settings))


def check_broker(settings: Settings, timeout: float | None = None) -> None:
    """Raise :class:`BrokerUnavailable` (one line) unless the broker answers within ``timeout`` seconds
    (default ``broker.timeout_seconds``). An embedded broker that is not running is said at once."""
    timeout = settings.broker.timeout_seconds if timeout is None else timeout
    bootstrap = settings.bootstrap()
    if not settings.broker.bootstrap_servers:
        from runner.bus.embedded import EmbeddedBroker

        if not EmbeddedBroker(settings).status()["running"]:
            raise BrokerUnavailable(f"the embedded broker of {settings.home} ({bootstrap}) is not running: "
                                    "`nbreduce broker start`")
    client = AdminClient({**client_config(settings),
                          "socket.connection.setup.timeout.ms": max(1000, int(timeout * 1000))})
    try:
        client.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerUnavailable(f"broker {bootstrap} did not answer within {timeout:.0f} s "
                                f"({exc.args[0].str() if exc.args else exc})") from None


def producer(settings: Settings, **extra: Any) -> Producer:
    """A producer whose records are acknowledged by every replica. Idempotent where the broker supports it
    (librdkafka's own retries after a lost connection never write a record twice); else one request in flight
    per connection, so a retry never reorders a partition (``broker.idempotence`` says why Tansu is the else)."""
    ordering: dict[str, Any] = ({"enable.idempotence": True} if settings.idempotent_producers() else
                                {"enable.idempotence": False, "max.in.flight.requests.per.connection": 1})
    return Producer(
        {
            **client_config(settings),
            "acks": "all",
            **ordering,
            "linger.ms": 2,
            "message.timeout.ms": 30000,
            **extra,
        }
    )


def take(consumer: Consumer, max_messages: int, timeout: float) -> list[Message]:
    """Up to ``max_messages`` messages, returning as soon as the first one is there.

    librdkafka's ``consume(n, timeout)`` waits the whole ``timeout`` unless ``n`` messages arrive (measured:
    a lone run completion waited the full 200 ms of the runner's poll): wait for one with ``poll``, then take
    what has already been fetched without waiting.
    """
    first = consumer.poll(timeout)
    if first is None:
        return []
    return [first, *consumer.consume(max_messages - 1, timeout=0)] if max_messages > 1 else [first]


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
            **low_latency(settings),
            **extra,
        }
    )


def encode(message: WireModel | bytes | None) -> bytes | None:
    """The record value of ``message``, bounded to :data:`~runner.bus.models.MAX_RECORD_BYTES` (long fields cut
    with a marker); a record that cannot be bounded raises a permanent ``MSG_SIZE_TOO_LARGE``."""
    if not isinstance(message, WireModel):
        return message
    value = message.to_bytes()
    if len(value) > MAX_RECORD_BYTES:
        try:
            bounded = message.bounded(MAX_RECORD_BYTES)
        except ValueError as exc:
            raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, str(exc))) from None
        log.warning("%s of %d bytes cut to fit the %d-byte record limit", type(message).__name__, len(value),
                    MAX_RECORD_BYTES)
        value = bounded.to_bytes()
    return value


class Publisher:
    """Publishing of wire models: :meth:`publish` returns only when the broker acknowledged the record,
    :meth:`send` does not wait. ``timeout``: longest wait for an acknowledgement (librdkafka's
    ``message.timeout.ms``: a record is either delivered within it or reported failed, never both).

    ``broker_error`` says what the producer last saw of the broker (None once a record was delivered).
    A producer that lost its state (:data:`PRODUCER_LOST`: an idempotent producer a restarted broker fenced or
    no longer knows) is replaced; the record that met the error is retried by the caller, as broker trouble.
    """

    def __init__(self, settings: Settings, timeout: float = 30.0):
        self.settings = settings
        self.timeout = timeout
        self.broker_error: str | None = None
        self._lock = threading.Lock()
        self._producer = self._new_producer()

    def _new_producer(self) -> Producer:
        return producer(self.settings, **{"message.timeout.ms": int(self.timeout * 1000), "error_cb": self._on_error})

    def _replace(self, failed: Producer, err: KafkaError) -> None:
        with self._lock:
            if self._producer is not failed:
                return  # replaced already
            log.error("producer failed (%s): replaced by a new one", err.str())
            self._producer = self._new_producer()
        threading.Thread(target=failed.flush, args=(1,), daemon=True).start()  # its records fail, reported

    def _on_error(self, err: KafkaError) -> None:
        if err.code() in BROKER_DOWN:
            self.broker_error = f"broker unreachable: {err.str()}"
        if producer_lost(err):
            self._replace(self._producer, err)

    def _delivered(self, client: Producer, err: KafkaError | None) -> None:
        if err is None:
            self.broker_error = None
        elif err.code() in BROKER_DOWN:
            self.broker_error = f"broker unreachable: {err.str()}"
        elif producer_lost(err):
            self._replace(client, err)

    def publish(self, topic: str, message: WireModel | bytes | None, key: str | bytes | None = None,
                timeout: float | None = None) -> None:
        """``message=None`` publishes a tombstone (deletes ``key`` on compacted topics). Waits for this record's
        acknowledgement only (not for other threads' records); a :data:`WRITE_CONFLICT` is written again."""
        value = encode(message)
        deadline = time.monotonic() + (timeout or self.timeout) + 5
        for attempt in itertools.count():
            done = threading.Event()
            outcome: list[KafkaError | None] = []

            def on_delivery(err: KafkaError | None, outcome: list[KafkaError | None] = outcome,
                            done: threading.Event = done) -> None:
                outcome.append(err)
                done.set()

            client = self._produce(topic, value, key, on_delivery)
            while not done.is_set():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, f"{topic}: not acknowledged in time"))
                client.poll(min(left, 0.05))
            err = outcome[0]
            if err is None:
                return
            if err.code() != WRITE_CONFLICT or time.monotonic() + 0.2 > deadline:
                raise KafkaException(err)
            time.sleep(min(0.01 * 2 ** attempt, 0.2))  # another writer won this partition's write: write again

    def send(self, topic: str, message: WireModel, key: str | bytes | None = None,
             on_delivery: Callable[[KafkaError | None], None] | None = None) -> None:
        """Publish without waiting for the acknowledgement (heartbeats, a job's non-final states: the next one
        supersedes a lost one). ``on_delivery`` is called with the outcome, from whichever thread polls; a
        :data:`WRITE_CONFLICT` is written again (a few times) before it counts."""
        value = encode(message)
        tries = itertools.count(2)

        def delivered(err: KafkaError | None) -> None:
            if err is not None and err.code() == WRITE_CONFLICT and next(tries) <= WRITE_ATTEMPTS:
                hand_over()  # another writer won this partition's write: write again
                return
            if err is not None:
                log.debug("%s: not delivered: %s", topic, err)
            if on_delivery is not None:
                on_delivery(err)

        def hand_over(again: bool = True) -> Producer | None:
            try:
                return self._produce(topic, value, key, delivered)
            except BufferError:  # the broker has been away long enough to fill the queue: not sent
                delivered(KafkaError(KafkaError._QUEUE_FULL, f"{topic}: producer queue full"))
            except KafkaException as exc:
                if not again:
                    raise  # refused at once: the caller's problem, as the record's
                delivered(exc.args[0] if exc.args else KafkaError(KafkaError._FAIL, str(exc)))
            return None

        client = hand_over(again=False)
        if client is not None:
            client.poll(0)

    def poll(self, timeout: float = 0) -> None:
        """Serve delivery reports of :meth:`send` (the runner's loop calls this)."""
        self._producer.poll(timeout)

    def _produce(self, topic: str, value: bytes | None, key: str | bytes | None,
                 callback: Callable[[KafkaError | None], None]) -> Producer:
        """Hand the record to the current producer (a fatally failed one is replaced first); returns the producer
        that holds it, which is the one to poll for its delivery report."""
        for attempt in (1, 2):
            with self._lock:
                client = self._producer

            def report(err: KafkaError | None, _msg: Message, client: Producer = client) -> None:
                self._delivered(client, err)
                callback(err)

            try:
                client.produce(topic, value=value, key=key, on_delivery=report)
                return client
            except KafkaException as exc:
                err = exc.args[0] if exc.args else None
                if attempt == 2 or not (isinstance(err, KafkaError) and producer_lost(err)):
                    raise
                self._replace(client, err)
        raise AssertionError("unreachable")

    def close(self, timeout: float = 10) -> None:
        self._producer.flush(timeout)


class Deliveries:
    """The records one piece of work handed to the producer without waiting (:meth:`Publisher.send`), and what to
    do once the broker acknowledged all of them: the runner commits a rejected message's offset only then, so a
    thousand rejections cost a thousand sends and one wait, not a thousand round trips, and lose nothing."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pending = 0
        self._error: KafkaError | None = None
        self._then: Callable[[KafkaError | None], None] | None = None

    def track(self, on_delivered: Callable[[], None] | None = None) -> Callable[[KafkaError | None], None]:
        """A delivery callback for one more record; ``on_delivered`` runs when that record was acknowledged."""
        with self._lock:
            self._pending += 1

        def delivered(err: KafkaError | None) -> None:
            if err is None and on_delivered is not None:
                on_delivered()
            with self._lock:
                self._pending -= 1
                self._error = self._error or err
                then = self._then if self._pending == 0 else None
                if then is not None:
                    self._then = None
            if then is not None:
                then(self._error)

        return delivered

    def then(self, callback: Callable[[KafkaError | None], None]) -> None:
        """Call ``callback`` (with the first delivery error, or None) once every tracked record is acknowledged
        (at once when none is pending)."""
        with self._lock:
            if self._pending:
                self._then = callback
                return
        callback(self._error)


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
            messages = take(consumer, batch, 0.1)
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
