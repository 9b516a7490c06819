"""The trigger interface: every external "a run finished" signal becomes one :class:`RunCompletion`.

A trigger is a small class, as JupyterHub's Authenticator or Spawner are: the runner only ever sees
``nbreduce.run-completions``, so a facility adds a signal source by writing one subclass. Publishing,
dead-lettering, bookkeeping in the trigger-state topic and health heartbeats are shared here, so every
trigger behaves the same way when its input is bad (dead letter, keep going) or the broker is away
(retry with backoff, never lose or skip input).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
import uuid
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, ClassVar, TypeVar

from confluent_kafka import TIMESTAMP_NOT_AVAILABLE, KafkaException, Message
from pydantic import BaseModel, ValidationError

from runner.bus.clients import Publisher
from runner.bus.health import TriggerHealth, health_table
from runner.bus.models import DeadLetter, RunCompletion, WireModel, utcnow
from runner.bus.table import TopicTable
from runner.bus.topics import DEAD_LETTER, HEALTH, RUN_COMPLETIONS, TRIGGER_STATE
from runner.bus.work import WorkConsumer
from runner.config import BrokerNotConfigured, Settings

log = logging.getLogger(__name__)

#: Failures of the platform rather than of the input: retried, the input is never skipped because of them.
TRANSIENT_ERRORS: tuple[type[Exception], ...] = (KafkaException, BrokerNotConfigured)
M = TypeVar("M", bound=BaseModel)
_ID_NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://nbreduce/run-completion")


def stable_id(*parts: object) -> str:
    """Deterministic message id: a completion emitted twice (redelivery, restart) is one job downstream."""
    return uuid.uuid5(_ID_NAMESPACE, ":".join(str(p) for p in parts)).hex


def describe(exc: BaseException) -> str:
    """One line naming what was wrong; pydantic errors become ``field: problem`` pairs."""
    if isinstance(exc, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'message'}: {e['msg']}" for e in exc.errors())
    return f"{type(exc).__name__}: {exc}"


def message_time(msg: Message) -> datetime | None:
    """The broker timestamp of ``msg``: deterministic across redeliveries, unlike the time of processing."""
    kind, millis = msg.timestamp()
    if kind == TIMESTAMP_NOT_AVAILABLE or millis <= 0:
        return None
    return datetime.fromtimestamp(millis / 1000, UTC)


def trigger_health(settings: Settings) -> list[TriggerHealth]:
    """Latest heartbeat of every trigger that ever ran against this broker (for ``nbreduce triggers``)."""
    return sorted(health_table(settings, TriggerHealth).load().snapshot(), key=lambda h: h.name)


class Trigger(ABC):
    """One source of run completions.

    Subclasses set :attr:`kind`, implement :meth:`poll_once` and use :meth:`emit`, :meth:`dead_letter`
    and :meth:`save_state`. :meth:`run` drives them until a stop event is set.
    """

    kind: ClassVar[str]
    #: Pause between two :meth:`poll_once` calls (0 for triggers that block in the broker).
    interval: float = 0.0
    #: Minimum seconds between two heartbeats (0 = one per poll cycle).
    heartbeat_interval: float = 30.0
    #: Longest pause between retries after a broker failure.
    max_backoff: float = 30.0

    def __init__(self, settings: Settings, *, name: str | None = None, publisher: Publisher | None = None):
        self.settings = settings
        self.name = name or self.kind
        self._publisher = publisher
        self.health = TriggerHealth(name=self.name, trigger_kind=self.kind)
        self._last_heartbeat: float | None = None
        self._started = False

    # -- the part a subclass writes ------------------------------------------------------------
    def start(self) -> None:
        """Load state from the broker before the first poll; called again after a failed start."""
        return None

    @abstractmethod
    def poll_once(self, timeout: float = 1.0) -> int:
        """Handle what arrived (at most ``timeout`` seconds of waiting); returns the number of inputs handled.

        Bad input is dead-lettered here; only broker failures (:data:`TRANSIENT_ERRORS`) may escape, and
        then the input that was being handled must be offered again on the next call.
        """

    def close(self) -> None:
        """Release broker connections (a lingering client delays a broker shutdown)."""
        if self._publisher is not None:
            self._publisher.close()
            self._publisher = None

    # -- shared publishing ------------------------------------------------------------------------
    @property
    def publisher(self) -> Publisher:
        if self._publisher is None:
            self._publisher = Publisher(self.settings)
        return self._publisher

    def emit(self, completion: RunCompletion) -> None:
        """Publish a completion for the runners, keyed by its message id: one instrument's runs spread over the
        partitions, so every runner of the group shares them (runs need no order among themselves; multi-run
        jobs have their own trigger), and a re-emitted completion lands where its first copy did."""
        self.publisher.publish(RUN_COMPLETIONS, completion, key=completion.message_id or completion.instrument)
        self.health.published += 1
        for run in completion.runs:
            self.seen(completion.instrument, run)
        log.info("%s: %s run %s -> %s", self.name, completion.instrument, completion.run_number, completion.data)

    def dead_letter(self, reason: str, topic: str, value: bytes | None, key: bytes | None = None,
                    partition: int | None = None, offset: int | None = None) -> None:
        """Keep rejected input byte for byte with the reason, for inspection and replay."""
        letter = DeadLetter.wrap(reason, topic, value, key, partition=partition, offset=offset, reporter=self.name)
        self.publisher.publish(DEAD_LETTER, letter, key=topic)
        self.health.dead_lettered += 1
        log.warning("%s: dead-lettered input from %s[%s]@%s: %s", self.name, topic, partition, offset, reason)

    def dead_letter_message(self, msg: Message, reason: str) -> None:
        self.dead_letter(reason, msg.topic(), msg.value(), msg.key(), partition=msg.partition(), offset=msg.offset())

    def save_state(self, key: str, state: WireModel) -> None:
        """Bookkeeping that must survive a restart, in the (compacted) trigger-state topic."""
        self.publisher.publish(TRIGGER_STATE, state, key=key)

    def load_state(self, prefix: str, model: type[M]) -> dict[str, M]:
        """Saved states under ``prefix`` (prefix stripped from the keys); unreadable entries are skipped."""
        table = TopicTable(self.settings, TRIGGER_STATE, model, prefix=prefix).load()
        if table.invalid:
            log.warning("%s: ignored %d unreadable %s states", self.name, table.invalid, prefix)
        return dict(table.items())

    # -- health -----------------------------------------------------------------------------------
    def seen(self, instrument: str, run: int) -> None:
        current = self.health.last_run_seen.get(instrument)
        if current is None or run > current:
            self.health.last_run_seen[instrument] = run

    def record_error(self, message: str) -> None:
        self.health.errors += 1
        self.health.last_error = message
        self.health.last_error_at = utcnow()
        log.error("%s: %s", self.name, message)

    def heartbeat(self, now: float, force: bool = False) -> None:
        """Publish :class:`TriggerHealth` (at most every :attr:`heartbeat_interval` s); never raises."""
        if not force and self._last_heartbeat is not None and now - self._last_heartbeat < self.heartbeat_interval:
            return
        self.health.timestamp = utcnow()
        self.health.interval_seconds = max(self.heartbeat_interval, self.interval, 1.0)
        try:
            self.publisher.publish(HEALTH, self.health, key=self.health.key)
            self._last_heartbeat = now
        except TRANSIENT_ERRORS as exc:
            log.warning("%s: heartbeat not published: %s", self.name, exc)

    # -- the loop ---------------------------------------------------------------------------------
    def step(self, timeout: float = 1.0) -> int:
        """Start if needed, then poll once; used by :meth:`run` and by tests that drive a trigger by hand."""
        if not self._started:
            self.start()
            self._started = True
        return self.poll_once(timeout)

    def run(self, stop: threading.Event) -> None:
        """Poll until ``stop`` is set. Broker failures and bugs are logged, counted and retried with backoff."""
        backoff = 1.0
        log.info("%s: %s trigger started", self.name, self.kind)
        try:
            while not stop.is_set():
                try:
                    self.step()
                    backoff = 1.0
                    pause = self.interval
                except TRANSIENT_ERRORS as exc:
                    self.record_error(f"broker unavailable, retrying in {backoff:.0f} s: {exc}")
                    pause, backoff = backoff, min(backoff * 2, self.max_backoff)
                except Exception as exc:  # a bug must not stop run detection: keep it visible, keep going
                    log.exception("%s: unexpected failure", self.name)
                    self.record_error(f"unexpected failure, retrying in {backoff:.0f} s: {describe(exc)}")
                    pause, backoff = backoff, min(backoff * 2, self.max_backoff)
                self.heartbeat(time.monotonic())
                if pause:
                    stop.wait(pause)
        finally:
            self.heartbeat(time.monotonic(), force=True)
            self.close()
            log.info("%s: stopped", self.name)


class ConsumerTrigger(Trigger):
    """A trigger fed by Kafka topics: a consumer-group member that commits only after its output is published."""

    #: Messages taken from the broker per poll.
    batch_size: int = 100

    def __init__(self, settings: Settings, *, topics: Sequence[str], group: str | None = None,
                 name: str | None = None, publisher: Publisher | None = None, **consumer_config: Any):
        super().__init__(settings, name=name, publisher=publisher)
        if not topics:
            raise ValueError(f"{self.name}: no topics to consume")
        self.topics = list(topics)
        self.group = group or f"nbreduce-trigger-{self.name}"
        self._consumer_config = consumer_config
        self._work: WorkConsumer | None = None

    @abstractmethod
    def handle(self, msg: Message) -> None:
        """Turn one message into completions, dead letters or state; raise only :data:`TRANSIENT_ERRORS`."""

    def start(self) -> None:
        if self._work is None:
            self._work = WorkConsumer(self.settings, self.group, self.topics, name=self.name, **self._consumer_config)

    def poll_once(self, timeout: float = 1.0) -> int:
        self.start()
        assert self._work is not None
        messages = self._work.poll(self.batch_size, timeout)
        for index, msg in enumerate(messages):
            try:
                with self._input(msg):
                    self.handle(msg)
            except TRANSIENT_ERRORS:
                self._work.rewind(messages[index:])
                raise
            self._work.done(msg)
        if self._work.broker_error:
            self.record_error(self._work.broker_error)
        self._work.commit()
        return len(messages)

    @contextmanager
    def _input(self, msg: Message) -> Iterator[None]:
        """A bug triggered by one message dead-letters that message instead of blocking the topic."""
        try:
            yield
        except TRANSIENT_ERRORS:
            raise
        except Exception as exc:
            log.exception("%s: failed on %s[%d]@%d", self.name, msg.topic(), msg.partition(), msg.offset())
            self.dead_letter_message(msg, f"{self.name} failed on this message: {describe(exc)}")

    def close(self) -> None:
        if self._work is not None:
            self._work.close()
            self._work = None
        super().close()


@contextmanager
def stop_on_signals(stop: threading.Event | None = None) -> Iterator[threading.Event]:
    """``stop`` as given (its owner handles signals), else a new event set by SIGINT/SIGTERM in the main thread."""
    if stop is not None or threading.current_thread() is not threading.main_thread():
        yield stop or threading.Event()
        return
    stop = threading.Event()
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, lambda *_: stop.set())
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
