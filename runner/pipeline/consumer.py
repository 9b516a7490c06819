"""The runner: a consumer-group member that hands each run completion and request to the :class:`Reducer`.

The polling thread only takes messages, schedules work and commits; the work runs in two small thread
pools, so the group membership never depends on how long a reduction takes:

* **checks** (a few threads): :meth:`Reducer.admit` and :meth:`Reducer.prepare` — validation, rejections,
  redeliveries, data-file readiness. Milliseconds each: 1,000 malformed messages are dead-lettered in
  seconds, whatever the reductions are doing.
* **reductions** (``runner.max_parallel`` threads, the *slots*): :meth:`Reducer.reduce`.

A run whose data file is not ready is *parked*: it holds no thread and no slot, only a timer (backoff,
bounded by the wait), while the messages behind it flow. Its offset stays uncommitted (offsets are
committed only past finished work), so a parked run survives a restart: it is redelivered and parked
again with the wait it already had (the wait counts from when the job was first queued).

Retries: broker trouble, a full or read-only archive and a job held by another runner are retried until
they pass (the message is fine); any other exception is retried a bounded number of times with backoff,
then the message is dead-lettered with the exception and reported ``failed``, and its partition moves on.
Partitions are paused only when a bounded number of runs wait for a slot (or are being checked, or are parked), so
the messages behind busy slots keep flowing; when a partition is revoked, its unstarted work is dropped (the new
owner gets it). Two messages of one job (a redelivery, a reused id) are never worked on at once: the later one
waits for the first. On shutdown, running reductions finish and are committed while the loop keeps polling.
"""

from __future__ import annotations

import contextlib
import heapq
import itertools
import logging
import os
import queue
import socket
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from enum import Enum

from confluent_kafka import Message

from runner.archive.permissions import archive_permissions
from runner.archive.store import ReservationBusy
from runner.bus.clients import Deliveries, Publisher, broker_trouble
from runner.bus.health import RunnerHealth
from runner.bus.models import JobState, StatusEvent, TriggerRef, utcnow
from runner.bus.status import JobMemos
from runner.bus.topics import HEALTH, REDUCTION_REQUESTS, RUN_COMPLETIONS
from runner.bus.work import PartitionKey, WorkConsumer
from runner.config import Settings
from runner.kernels.environments import kernel_name as environment_kernel_name
from runner.kernels.environments import preload_by_kernel
from runner.kernels.pool import KernelPool, parse_sizes
from runner.pipeline.engine import KernelProvider
from runner.pipeline.faults import archive_fault
from runner.pipeline.reduce import (
    RUNNER_KERNEL,
    ArchiveUnavailable,
    DefaultsLookup,
    Interrupted,
    Job,
    Reducer,
    kernel_for,
)
from runner.templates.defaults import DefaultsTable
from runner.templates.registry import TemplateError, TemplateRegistry

log = logging.getLogger(__name__)

#: Attempts of a message whose reduction raised an unexpected exception, and the pauses between them.
MAX_ATTEMPTS = 4
RETRY_DELAYS = (2.0, 10.0, 30.0)
#: Pause before a message held back by broker trouble (or another runner's lock, or a full archive) is tried again.
TRANSIENT_DELAY = 5.0
#: Threads that admit messages and look at data files (cheap work: never a reduction).
CHECK_THREADS = 2
#: Messages taken and not finished outside the reduction slots (being checked, or their dead letters and final
#: states not yet acknowledged), and parked runs, before partitions are paused: rejections are pipelined, so a
#: slow broker acknowledgement (Tansu on S3 takes a second or more) does not throttle them.
MAX_CHECKS = 500
MAX_PARKED = 1000
#: Admitted runs waiting for a reduction slot before partitions are paused: the messages behind them (rejections,
#: redeliveries, parked runs) keep flowing while every slot is busy.
MAX_QUEUED = 64


class Outcome(Enum):
    DONE = "done"  # finished: the offset may be committed
    PARKED = "parked"  # the data file is not ready: look again later, holding nothing
    REDUCE = "reduce"  # admitted and ready: handed to a reduction slot
    INTERRUPTED = "interrupted"  # our own shutdown, or the partition went to another runner: left for redelivery
    TRANSIENT = "transient"  # broker trouble, a full archive, a busy job lock: try again, as often as needed
    FAILED = "failed"  # an unexpected exception: try again a bounded number of times


@dataclass(eq=False)
class Attempt:
    """A message being worked on, parked, or waiting for its next attempt."""

    msg: Message
    #: The job the message is (several messages of one job are never worked on at once).
    job_id: str = ""
    attempts: int = 0
    due: float = 0.0
    error: str | None = None
    #: The admitted job, once admitted (a retry after an unexpected failure admits it again).
    job: Job | None = None
    #: Its partition went to another runner: whatever has not started is dropped.
    revoked: bool = False
    received: float = field(default_factory=time.monotonic)

    @property
    def partition(self) -> PartitionKey:
        return self.msg.topic(), self.msg.partition()


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

    ``kernels`` and ``defaults`` replace the kernel pool and the defaults topic (tests, embedding);
    ``identity`` names the runner (default ``host:pid``; in-process runners of one test need their own).
    """

    def __init__(self, settings: Settings, kernels: KernelProvider | None = None,
                 defaults: DefaultsLookup | None = None, identity: str | None = None):
        self.settings = settings
        self.identity = identity or f"{socket.gethostname()}:{os.getpid()}"
        self.stop_event = threading.Event()
        self._kernels = kernels
        self._defaults = defaults
        self.pool: KernelPool | None = None
        self.health = RunnerHealth(name=self.identity, group=settings.runner.group,
                                   environments=settings.runner.environments,
                                   max_parallel=settings.runner.max_parallel,
                                   interval_seconds=settings.runner.heartbeat_seconds, state="starting")
        #: Outcomes of the worker threads, handed to the polling thread.
        self._outcomes: queue.SimpleQueue[tuple[Attempt, Outcome, str | None]] = queue.SimpleQueue()
        #: Attempts in the check threads (touched by the polling thread only) and in reduction slots (queued or
        #: running; check threads add to it, under the lock), each with its future.
        self._checking: dict[Attempt, Future[None]] = {}
        self._reducing: dict[Attempt, Future[None]] = {}
        self._lock = threading.Lock()
        #: The attempt working on each job id, and the later messages of that job waiting for it, in offset order
        #: (polling thread only): a redelivery or a message reusing an id must see the first one's outcome.
        self._claims: dict[str, Attempt] = {}
        self._blocked: dict[str, deque[Attempt]] = {}

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, on_ready: Callable[[], None] | None = None) -> None:
        """Serve until stopped. A broker that is away at start is waited for (with backoff), not a crash."""
        if stop is not None:
            self.stop_event = stop
        delay = 1.0
        while not self.stop_event.is_set():
            try:
                with self._parts() as (reducer, publisher):
                    self._serve(reducer, publisher, on_ready)
                return
            except Exception as exc:
                if not broker_trouble(exc):
                    raise
                log.warning("runner %s: broker unreachable at start (%s); retrying in %.0f s", self.identity, exc,
                            delay)
                self.stop_event.wait(delay)
                delay = min(delay * 2, 30.0)

    def _serve(self, reducer: Reducer, publisher: Publisher, on_ready: Callable[[], None] | None) -> None:
        revoked: list[PartitionKey] = []
        work = WorkConsumer(self.settings, self.settings.runner.group, [RUN_COMPLETIONS, REDUCTION_REQUESTS],
                            name=f"runner {self.identity}", on_revoke=revoked.extend)
        log.info("runner %s: %d jobs known, group %s", self.identity, len(reducer.status), self.settings.runner.group)
        try:
            self.health.state = "ok"
            self._heartbeat(publisher, work, reducer, force=True)
            if on_ready:
                on_ready()
            self._consume(work, reducer, publisher, revoked)
        finally:
            work.close()

    @contextmanager
    def _parts(self) -> Iterator[tuple[Reducer, Publisher]]:
        """The runner's collaborators, started for the life of :meth:`run`: a publisher, the job states
        (rebuilt from the status topic, then followed: another runner's results are known here too),
        instrument scientists' defaults (followed live) and kernels."""
        self.settings.archive.mkdir(parents=True, exist_ok=True)
        archive_permissions(self.settings.archive_permissions).root(self.settings.archive)
        publisher = Publisher(self.settings)
        followers = threading.Event()
        try:
            status = JobMemos.rebuild(self.settings)
            status.start(followers)
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
    def _consume(self, work: WorkConsumer, reducer: Reducer, publisher: Publisher,
                 revoked: list[PartitionKey]) -> None:
        capacity = self.settings.runner.max_parallel
        checks = ThreadPoolExecutor(max_workers=CHECK_THREADS, thread_name_prefix="check")
        slots = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="reduction")
        checking, reducing = self._checking, self._reducing
        #: Parked runs and retries, by when they are due: (due, tie-breaker, attempt).
        timers: list[tuple[float, int, Attempt]] = []
        order = itertools.count()

        def check(attempt: Attempt) -> None:
            checking[attempt] = checks.submit(self._check, reducer, attempt, slots)

        def take(msg: Message) -> None:
            attempt = Attempt(msg, job_id=reducer.identify(msg)[0])
            holder = self._claims.setdefault(attempt.job_id, attempt)
            if holder is attempt:
                check(attempt)
            else:  # the same job is being worked on: after it, in order
                self._blocked.setdefault(attempt.job_id, deque()).append(attempt)

        try:
            while not self.stop_event.is_set():
                if revoked:  # the consumer's rebalance callback ran in our poll: drop what is no longer ours
                    for attempt in self._drop(set(revoked), timers):
                        check(attempt)
                    revoked.clear()
                for attempt in self._settle(work, checking, timers, order):
                    check(attempt)  # a message of a job that was being worked on: its turn now
                now = time.monotonic()
                while timers and timers[0][0] <= now and len(checking) < MAX_CHECKS:
                    _, _, attempt = heapq.heappop(timers)
                    if not attempt.revoked:
                        check(attempt)
                room = 0
                if len(reducing) < capacity + MAX_QUEUED and len(timers) < MAX_PARKED:
                    room = MAX_CHECKS - len(checking) - sum(len(b) for b in self._blocked.values())
                # a new message wakes the poll at once; only a parked run or a retry falling due needs a deadline
                # (finished work is only committed, whenever the loop comes round: no need to spin for it)
                wait = min(0.2, max(0.0, timers[0][0] - time.monotonic())) if timers else 0.2
                for msg in work.poll(room, timeout=wait if not checking else min(wait, 0.05)):
                    take(msg)
                work.commit()
                publisher.poll(0)
                self._heartbeat(publisher, work, reducer)
        finally:
            # Keep polling (all partitions paused) while running reductions finish: a member that stops
            # polling is dropped from the group and its messages would be run again by another runner.
            log.info("runner stopping: waiting for %d reductions", len(reducing))
            self.health.state = "stopping"
            checks.shutdown(wait=False, cancel_futures=True)
            slots.shutdown(wait=False, cancel_futures=True)
            while True:
                with self._lock:  # work that never started will not report: it is redelivered
                    for pending in (checking, reducing):
                        for attempt in [a for a, f in pending.items() if f.cancelled()]:
                            pending.pop(attempt)
                    if not (checking or reducing):
                        break
                work.poll(0, timeout=0.2)
                self._settle(work, checking, [], order)
            work.commit()
            self._claims.clear()
            self._blocked.clear()

    def _check(self, reducer: Reducer, attempt: Attempt, slots: ThreadPoolExecutor) -> None:
        """Check thread: admit the message (first time), look at its data files; hand a ready job to a slot.

        A message finished here (rejected, skipped, a redelivery) is reported done only once its dead letter and
        final state are acknowledged: they are sent without waiting, so rejections do not queue behind round trips.
        """
        deliveries = Deliveries()
        outcome, detail = self._guarded(reducer, attempt, lambda: self._admit(reducer, attempt, deliveries))
        if outcome is Outcome.DONE:
            deliveries.then(lambda err: self._outcomes.put(
                (attempt, Outcome.DONE, None) if err is None else (attempt, Outcome.TRANSIENT, str(err))))
            return
        if outcome is Outcome.REDUCE:
            if attempt.revoked or self.stop_event.is_set():
                outcome = Outcome.INTERRUPTED
            else:
                with self._lock:  # in ``reducing`` before the check reports: the loop always sees it somewhere
                    try:
                        self._reducing[attempt] = slots.submit(self._reduce, reducer, attempt)
                    except RuntimeError:  # shutting down
                        outcome = Outcome.INTERRUPTED
        self._outcomes.put((attempt, outcome, detail))

    def _admit(self, reducer: Reducer, attempt: Attempt, deliveries: Deliveries) -> tuple[Outcome, str | None]:
        if attempt.job is None:
            attempt.job = reducer.admit(attempt.msg, attempt.received, deliveries)
            if attempt.job is None:
                return Outcome.DONE, None
        delay = reducer.prepare(attempt.job, deliveries)
        if delay is None:
            return Outcome.DONE, None
        if delay > 0:
            attempt.due = time.monotonic() + delay
            return Outcome.PARKED, None
        return Outcome.REDUCE, None

    def _reduce(self, reducer: Reducer, attempt: Attempt) -> None:
        """Reduction slot: one reduction, unless its partition went away or the runner stops meanwhile."""
        if attempt.revoked or self.stop_event.is_set():
            self._outcomes.put((attempt, Outcome.INTERRUPTED, None))
            return
        job = attempt.job
        assert job is not None

        def reduce() -> tuple[Outcome, str | None]:
            reducer.reduce(job)
            return Outcome.DONE, None

        outcome, detail = self._guarded(reducer, attempt, reduce)
        self._outcomes.put((attempt, outcome, detail))

    def _guarded(self, reducer: Reducer, attempt: Attempt, work: Callable[[], tuple[Outcome, str | None]]
                 ) -> tuple[Outcome, str | None]:
        """Run ``work`` (or, after too many failures, give up on the message) and classify what went wrong."""
        msg = attempt.msg
        where = f"{msg.topic()}[{msg.partition()}]@{msg.offset()}"
        try:
            if attempt.attempts >= MAX_ATTEMPTS:
                self._give_up(reducer, attempt)
                return Outcome.DONE, None
            return work()
        except Interrupted:
            log.info("interrupted %s: left for redelivery", where)
            return Outcome.INTERRUPTED, None
        except ReservationBusy as exc:
            log.info("%s; will look again", exc)
            return Outcome.TRANSIENT, str(exc)
        except ArchiveUnavailable as exc:
            log.warning("%s: %s", where, exc)
            return Outcome.TRANSIENT, str(exc)
        except Exception as exc:
            if broker_trouble(exc):
                log.warning("broker trouble on %s (will retry): %s", where, exc)
                return Outcome.TRANSIENT, str(exc)
            if (fault := archive_fault(exc)) is not None:
                reducer.archive_problem = f"archive not writable ({fault})"
                log.warning("%s: archive not writable (will retry): %s", where, fault)
                return Outcome.TRANSIENT, str(fault)
            log.exception("could not process %s", where)
            return Outcome.FAILED, f"{type(exc).__name__}: {exc}"

    def _settle(self, work: WorkConsumer, checking: dict[Attempt, Future[None]],
                timers: list[tuple[float, int, Attempt]], order: Iterator[int]) -> list[Attempt]:
        """Account for what the worker threads finished: commit what is done, park, schedule retries. Returns the
        messages whose job is free now (a later message of a job that was being worked on)."""
        unblocked: list[Attempt] = []
        while True:
            try:
                attempt, outcome, error = self._outcomes.get_nowait()
            except queue.Empty:
                return unblocked
            checking.pop(attempt, None)
            if outcome is Outcome.REDUCE:
                continue  # now in a slot (already in ``reducing``)
            with self._lock:
                self._reducing.pop(attempt, None)
            if outcome is Outcome.DONE:
                work.done(attempt.msg)
                if attempt.job is not None:
                    self.health.jobs_done += 1
                unblocked += self._release(attempt)
                continue
            if outcome is Outcome.INTERRUPTED or attempt.revoked or self.stop_event.is_set():
                unblocked += self._release(attempt)
                continue  # not committed: redelivered (to us after a restart, or to the partition's new owner)
            if outcome is Outcome.PARKED:
                pass  # ``due`` set by the check
            elif outcome is Outcome.TRANSIENT:
                attempt.due = time.monotonic() + TRANSIENT_DELAY
            else:
                attempt.attempts += 1
                attempt.error = error
                attempt.job = None  # admitted again: whatever failed may have been in the admission
                delay = RETRY_DELAYS[min(attempt.attempts - 1, len(RETRY_DELAYS) - 1)]
                attempt.due = time.monotonic() + (0 if attempt.attempts >= MAX_ATTEMPTS else delay)
            heapq.heappush(timers, (attempt.due, next(order), attempt))

    def _release(self, attempt: Attempt) -> list[Attempt]:
        """``attempt`` is over: its job is free for the next message of it (returned, claimed, to be checked)."""
        if self._claims.get(attempt.job_id) is not attempt:
            return []
        del self._claims[attempt.job_id]
        waiting = self._blocked.get(attempt.job_id)
        while waiting:
            following = waiting.popleft()
            if not following.revoked:
                self._claims[attempt.job_id] = following
                if not waiting:
                    del self._blocked[attempt.job_id]
                return [following]
        self._blocked.pop(attempt.job_id, None)
        return []

    def _drop(self, partitions: set[PartitionKey], timers: list[tuple[float, int, Attempt]]) -> list[Attempt]:
        """Partitions went to another runner: their parked, waiting and unstarted work is theirs now. Returns the
        messages (of other partitions) whose job this frees."""
        with self._lock:
            attempts = [*self._checking, *self._reducing, *(a for _, _, a in timers),
                        *(a for waiting in self._blocked.values() for a in waiting)]
        for attempt in attempts:
            if attempt.partition in partitions:
                attempt.revoked = True
        dropped = [entry[2] for entry in timers if entry[2].revoked]  # parked, or waiting for a retry
        timers[:] = [entry for entry in timers if not entry[2].revoked]
        heapq.heapify(timers)
        return [following for attempt in dropped for following in self._release(attempt)]

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
        problem = work.broker_error or publisher.broker_error
        if health.state in ("ok", "broker unreachable", "archive unwritable"):
            health.state = ("broker unreachable" if problem else
                            "archive unwritable" if reducer.archive_problem else "ok")
        health.problem = problem or reducer.archive_problem
        health.timestamp = utcnow()
        health.running = sorted(reducer.active.values())
        health.partitions = [f"{topic}[{partition}]" for topic, partition in work.assignment()]
        health.kernels = self.pool.stats().model_dump() if self.pool is not None else {}
        publisher.send(HEALTH, health, key=health.key)

