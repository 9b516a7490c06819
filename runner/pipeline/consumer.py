"""The runner: a consumer-group member that hands each run completion and request to the :class:`Reducer`.

Reductions run in worker threads so the polling thread keeps the group membership alive (the
:class:`~runner.bus.work.WorkConsumer` pauses partitions while every slot is busy). The polling thread
also commits finished work, retries failed messages, publishes heartbeats and, on shutdown, keeps
polling while running reductions finish, so SIGTERM never hands a running job to another runner.

Retries: broker trouble and a job held by another runner are retried until they pass (the message is
fine); any other exception is retried a bounded number of times with backoff, then the message is
dead-lettered with the exception and reported ``failed``, and its partition moves on — one poisonous
message never blocks the runs behind it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum

from confluent_kafka import KafkaException, Message

from runner.archive.permissions import archive_permissions
from runner.archive.store import ReservationBusy
from runner.bus.clients import Publisher
from runner.bus.health import RunnerHealth
from runner.bus.models import JobState, StatusEvent, TriggerRef, utcnow
from runner.bus.status import StatusView
from runner.bus.topics import HEALTH, REDUCTION_REQUESTS, RUN_COMPLETIONS
from runner.bus.work import WorkConsumer
from runner.config import Settings
from runner.kernels.environments import kernel_name as environment_kernel_name
from runner.kernels.environments import preload_by_kernel
from runner.kernels.pool import KernelPool, parse_sizes
from runner.pipeline.engine import KernelProvider
from runner.pipeline.reduce import RUNNER_KERNEL, DefaultsLookup, Interrupted, Reducer, kernel_for
from runner.templates.defaults import DefaultsTable
from runner.templates.registry import TemplateError, TemplateRegistry

log = logging.getLogger(__name__)

#: Attempts of a message whose reduction raised an unexpected exception, and the pauses between them.
MAX_ATTEMPTS = 4
RETRY_DELAYS = (2.0, 10.0, 30.0)
#: Pause before a message held back by broker trouble (or another runner's lock) is tried again.
TRANSIENT_DELAY = 5.0


class Outcome(Enum):
    DONE = "done"  # finished: the offset may be committed
    INTERRUPTED = "interrupted"  # our own shutdown: left for redelivery
    TRANSIENT = "transient"  # broker trouble or a busy job lock: try again, as often as needed
    FAILED = "failed"  # an unexpected exception: try again a bounded number of times


@dataclass
class Attempt:
    """A message being worked on, or waiting for its next attempt."""

    msg: Message
    attempts: int = 0
    due: float = 0.0
    error: str | None = None


def warm_plan(settings: Settings, registry: TemplateRegistry) -> tuple[dict[str, int], dict[str, list[str]]]:
    """Pool sizes and preload statements per kernel (see ``kernels.warm``): by default, a warm kernel per
    parallel slot for every kernel an enabled template of this runner's environments runs in."""
    preload = preload_by_kernel(settings.environments)
    text = settings.kernels.warm.strip()
    if text not in ("auto", ""):
        return ({} if text == "0" else parse_sizes(text)), preload
    sizes: dict[str, int] = {}
    served = settings.runner.environments
    for instrument in registry.instruments():
        try:
            template = registry.resolve(instrument)
        except TemplateError:
            continue
        if served is not None and template.config.environment not in served:
            continue
        kernel, _ = kernel_for(settings, template)
        if kernel is None:
            continue
        sizes[kernel] = settings.runner.max_parallel
        env_kernel = environment_kernel_name(template.config.environment) if template.config.environment else None
        if kernel == RUNNER_KERNEL and env_kernel in preload:  # the runner's venv carries the same packages
            preload[RUNNER_KERNEL] = list(dict.fromkeys(preload.get(RUNNER_KERNEL, []) + preload[env_kernel]))
    return sizes, preload


class Runner:
    """``nbreduce runner``: :meth:`run` until the stop event is set.

    ``kernels`` and ``defaults`` replace the kernel pool and the defaults topic (tests, embedding).
    """

    def __init__(self, settings: Settings, kernels: KernelProvider | None = None,
                 defaults: DefaultsLookup | None = None):
        self.settings = settings
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.stop_event = threading.Event()
        self._kernels = kernels
        self._defaults = defaults
        self.pool: KernelPool | None = None
        self.health = RunnerHealth(name=self.identity, group=settings.runner.group,
                                   environments=settings.runner.environments,
                                   max_parallel=settings.runner.max_parallel,
                                   interval_seconds=settings.runner.heartbeat_seconds, state="starting")

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, on_ready: Callable[[], None] | None = None) -> None:
        if stop is not None:
            self.stop_event = stop
        with self._parts() as (reducer, publisher):
            work = WorkConsumer(self.settings, self.settings.runner.group, [RUN_COMPLETIONS, REDUCTION_REQUESTS],
                                name=f"runner {self.identity}")
            log.info("runner %s: %d jobs known, group %s", self.identity, len(reducer.status),
                     self.settings.runner.group)
            try:
                self.health.state = "ok"
                self._heartbeat(publisher, work, reducer, force=True)
                if on_ready:
                    on_ready()
                self._consume(work, reducer, publisher)
            finally:
                work.close()

    @contextmanager
    def _parts(self) -> Iterator[tuple[Reducer, Publisher]]:
        """The runner's collaborators, started for the life of :meth:`run`: a publisher, the job states
        (rebuilt from the status topic), instrument scientists' defaults (followed live) and kernels."""
        self.settings.archive.mkdir(parents=True, exist_ok=True)
        archive_permissions(self.settings.archive_permissions).root(self.settings.archive)
        publisher = Publisher(self.settings)
        followers = threading.Event()
        try:
            status = StatusView.rebuild(self.settings)
            defaults = self._defaults
            if defaults is None:
                table = DefaultsTable(self.settings)
                table.start(followers)
                table.caught_up.wait(30)
                defaults = table.merged
            kernels = self._kernels
            if kernels is None:
                sizes, preload = warm_plan(self.settings, TemplateRegistry(self.settings.notebooks))
                self.pool = KernelPool(self.settings, sizes, preload,
                                       fork_servers=self.settings.kernels.fork_servers).start()
                kernels = self.pool
                log.info("warm kernels: %s", sizes or "none (cold start per run)")
            yield Reducer(self.settings, kernels=kernels, defaults=defaults, status=status, publisher=publisher,
                          identity=self.identity, stop=self.stop_event), publisher
        finally:
            followers.set()
            self.health.state = "stopped"
            with contextlib.suppress(Exception):
                publisher.send(HEALTH, self.health, key=self.health.key)
            publisher.close()
            if self.pool is not None:
                self.pool.stop()
                self.pool = None

    # -- the loop -------------------------------------------------------------------------------
    def _consume(self, work: WorkConsumer, reducer: Reducer, publisher: Publisher) -> None:
        capacity = self.settings.runner.max_parallel
        executor = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="reduction")
        running: dict[Future[tuple[Outcome, str | None]], Attempt] = {}
        waiting: list[Attempt] = []
        try:
            while not self.stop_event.is_set():
                self._settle(running, waiting, work)
                now = time.monotonic()
                for attempt in [a for a in waiting if a.due <= now][:capacity - len(running)]:
                    waiting.remove(attempt)
                    running[executor.submit(self._attempt, reducer, attempt)] = attempt
                for msg in work.poll(capacity - len(running) - len(waiting), timeout=0.2):
                    attempt = Attempt(msg)
                    running[executor.submit(self._attempt, reducer, attempt)] = attempt
                work.commit()
                self._heartbeat(publisher, work, reducer)
        finally:
            # Keep polling (all partitions paused) while running reductions finish: a member that stops
            # polling is dropped from the group and its messages would be run again by another runner.
            log.info("runner stopping: waiting for %d running reductions", len(running))
            self.health.state = "stopping"
            executor.shutdown(wait=False, cancel_futures=True)
            while any(not future.done() for future in running):
                work.poll(0, timeout=0.2)
                self._settle(running, [], work)
            self._settle(running, [], work)
            work.commit()

    def _attempt(self, reducer: Reducer, attempt: Attempt) -> tuple[Outcome, str | None]:
        """Worker thread: one attempt at a message (or, after too many failures, giving up on it)."""
        msg = attempt.msg
        try:
            if attempt.attempts >= MAX_ATTEMPTS:
                self._give_up(reducer, attempt)
            else:
                reducer.handle(msg)
            return Outcome.DONE, None
        except Interrupted:
            log.info("interrupted %s[%d]@%d: left for redelivery", msg.topic(), msg.partition(), msg.offset())
            return Outcome.INTERRUPTED, None
        except ReservationBusy as exc:
            log.info("%s; will look again", exc)
            return Outcome.TRANSIENT, str(exc)
        except KafkaException as exc:
            if exc.args and getattr(exc.args[0], "retriable", lambda: True)() is False:
                log.exception("could not process %s[%d]@%d", msg.topic(), msg.partition(), msg.offset())
                return Outcome.FAILED, f"{type(exc).__name__}: {exc}"
            log.warning("broker trouble on %s[%d]@%d (will retry): %s", msg.topic(), msg.partition(), msg.offset(),
                        exc)
            return Outcome.TRANSIENT, str(exc)
        except Exception as exc:
            log.exception("could not process %s[%d]@%d", msg.topic(), msg.partition(), msg.offset())
            return Outcome.FAILED, f"{type(exc).__name__}: {exc}"

    def _settle(self, running: dict[Future[tuple[Outcome, str | None]], Attempt], waiting: list[Attempt],
                work: WorkConsumer) -> None:
        """Account for finished attempts: commit what is done, schedule what is retried."""
        for future in [f for f in running if f.done()]:
            attempt = running.pop(future)
            if future.cancelled():
                continue
            outcome, error = future.result()
            if outcome is Outcome.DONE:
                work.done(attempt.msg)
                self.health.jobs_done += 1
            elif outcome is Outcome.INTERRUPTED or self.stop_event.is_set():
                continue  # not committed: redelivered after the restart
            elif outcome is Outcome.TRANSIENT:
                attempt.due = time.monotonic() + TRANSIENT_DELAY
                waiting.append(attempt)
            else:
                attempt.attempts += 1
                attempt.error = error
                delay = RETRY_DELAYS[min(attempt.attempts - 1, len(RETRY_DELAYS) - 1)]
                attempt.due = time.monotonic() + (0 if attempt.attempts >= MAX_ATTEMPTS else delay)
                waiting.append(attempt)

    def _give_up(self, reducer: Reducer, attempt: Attempt) -> None:
        """After :data:`MAX_ATTEMPTS` failures: dead-letter the message with its error and report the job failed."""
        msg = attempt.msg
        reason = f"failed {attempt.attempts} times, not retried: {attempt.error}"
        job_id, fields = reducer.identify(msg)
        reducer.reject(msg, job_id, TriggerRef(topic=msg.topic(), partition=msg.partition(), offset=msg.offset()),
                       reason, {})
        if fields:
            reducer.publish_status(StatusEvent(job_id=job_id, state=JobState.FAILED, reason=reason,
                                               runner=self.identity, finished_at=utcnow(), **fields))

    # -- health ---------------------------------------------------------------------------------
    _last_beat = 0.0

    def _heartbeat(self, publisher: Publisher, work: WorkConsumer, reducer: Reducer, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_beat < self.settings.runner.heartbeat_seconds:
            return
        self._last_beat = now
        health = self.health
        if health.state in ("ok", "broker unreachable"):
            health.state = "broker unreachable" if work.broker_error else "ok"
        health.timestamp = utcnow()
        health.running = sorted(reducer.active.values())
        health.partitions = [f"{topic}[{partition}]" for topic, partition in work.assignment()]
        health.kernels = self.pool.stats().model_dump() if self.pool is not None else {}
        publisher.send(HEALTH, health, key=health.key)
