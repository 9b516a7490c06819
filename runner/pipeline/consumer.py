"""The runner: a consumer-group member that turns run completions and requests into archived notebooks.

Per message: validate -> resolve the instrument's template -> check and wait for the data files ->
reserve a version -> execute with papermill -> publish the version to the archive -> publish the
status -> only then commit the offset. Reductions run in worker threads so the polling thread keeps
the group membership alive (partitions are paused while all slots are busy). Job ids are derived
from the request, so a message redelivered after a crash is recognised and never becomes a second
version.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Message, TopicPartition
from pydantic import ValidationError

from runner.archive.store import RECORD, Archive, Reservation, ReservationBusy
from runner.bus.clients import Publisher, follow_topic, group_consumer
from runner.bus.models import (
    DeadLetter,
    JobState,
    ReductionRequest,
    RunCompletion,
    StatusEvent,
    TriggerRef,
    utcnow,
)
from runner.bus.status import StatusView
from runner.bus.topics import (
    DEAD_LETTER,
    PARAMETER_DEFAULTS,
    REDUCTION_REQUESTS,
    REDUCTION_STATUS,
    REPLAY_HEADER,
    REPLAY_ID_HEADER,
    RUN_COMPLETIONS,
)
from runner.config import Settings
from runner.isis.nexus import rb_from_nexus
from runner.kernels.environments import kernel_name as environment_kernel_name
from runner.kernels.environments import normalise_hash, preload_by_kernel
from runner.kernels.pool import KernelPool, parse_sizes
from runner.pipeline.datafiles import DataNotReady, DataPathError, check_data_paths, wait_until_ready
from runner.pipeline.engine import KernelProvider, kernel_exists
from runner.pipeline.execute import execute
from runner.pipeline.inspection import output_files, scraps_summary
from runner.pipeline.parameterize import ParameterError, build_parameters
from runner.pipeline.provenance import runner_record
from runner.templates.defaults import ParameterDefaults, fold_defaults, merged_defaults
from runner.templates.registry import Template, TemplateError, TemplateRegistry

log = logging.getLogger(__name__)

JOB_NAMESPACE = uuid.UUID("6f1c1a52-4d0e-4b8e-9a51-6e6272656475")
FALLBACK_KERNEL = "python3"
_SAFE_INSTRUMENT = r"^[A-Z][A-Z0-9_]{0,31}$"


def job_id_for(topic: str, partition: int, offset: int, message_id: str | None, replay: str | None = None) -> str:
    """Deterministic: the same request (or the same Kafka record, for legacy messages without an id) -> same job.

    A replayed dead letter (``replay``: its replay id) is a new job — the original one is final as
    ``rejected`` — and the same job for every redelivery of that replay.
    """
    if replay:
        source = f"replay/{replay}"
    else:
        source = f"{topic}/{message_id}" if message_id else f"{topic}/{partition}/{offset}"
    return uuid.uuid5(JOB_NAMESPACE, source).hex


class Interrupted(Exception):
    """The runner is shutting down: leave the message uncommitted so it is redelivered."""


class Rejected(Exception):
    """The message cannot be processed as it is: dead-letter it with this reason."""


@dataclass
class Job:
    """One request being processed, with the fields every status event of it repeats."""

    job_id: str
    request: RunCompletion
    trigger: TriggerRef
    queued_at: datetime = field(default_factory=utcnow)
    fields: dict[str, Any] = field(default_factory=dict)


class Runner:
    """``nbreduce runner``: run with :meth:`run` until the stop event is set."""

    def __init__(self, settings: Settings, kernels: KernelProvider | None = None,
                 defaults: Callable[[str, str], dict[str, Any]] | None = None):
        self.settings = settings
        self.registry = TemplateRegistry(settings.notebooks)
        self.archive = Archive(settings.archive)
        self.kernels = kernels
        self.defaults = defaults
        self._parameter_defaults: dict[str, ParameterDefaults] = {}
        self.view = StatusView()
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.stop_event = threading.Event()
        self._publisher: Publisher | None = None

    # -- main loop ------------------------------------------------------------------------------
    def run(self, stop: threading.Event | None = None, on_ready: Callable[[], None] | None = None) -> None:
        if stop is not None:
            self.stop_event = stop
        self.settings.archive.mkdir(parents=True, exist_ok=True)
        self._publisher = Publisher(self.settings)
        self.view = StatusView.rebuild(self.settings)
        followers = threading.Event()
        if self.defaults is None:  # instrument scientists' defaults, followed live from their topic
            loaded = threading.Event()
            threading.Thread(target=follow_topic, name="defaults-follower", daemon=True, args=(
                self.settings, PARAMETER_DEFAULTS, followers,
                lambda m: fold_defaults([(m.key(), m.value())], self._parameter_defaults), loaded)).start()
            self.defaults = lambda instrument, rb: merged_defaults(self._parameter_defaults, instrument, rb)
            loaded.wait(30)
        pool = None
        if self.kernels is None:
            sizes, preload = self.warm_plan()
            pool = KernelPool(self.settings, sizes, preload, fork_servers=self.settings.fork_servers).start()
            self.kernels = pool
            log.info("warm kernels: %s", sizes or "none (cold start per run)")
        log.info("runner %s: %d jobs known from %s", self.identity, len(self.view.jobs), REDUCTION_STATUS)
        consumer = group_consumer(self.settings, self.settings.runner_group)
        tracker = OffsetTracker()
        done: queue.SimpleQueue[tuple[Message, bool]] = queue.SimpleQueue()
        capacity = self.settings.max_parallel
        paused = False

        def on_assign(c, partitions: list[TopicPartition]) -> None:
            log.info("assigned %s", [(p.topic, p.partition) for p in partitions])

        def on_revoke(c, partitions: list[TopicPartition]) -> None:
            offsets = tracker.committable([(p.topic, p.partition) for p in partitions])
            if offsets:
                try:
                    c.commit(offsets=offsets, asynchronous=False)
                except Exception as exc:
                    log.warning("commit on revoke failed: %s", exc)
            tracker.forget([(p.topic, p.partition) for p in partitions])

        consumer.subscribe([RUN_COMPLETIONS, REDUCTION_REQUESTS], on_assign=on_assign, on_revoke=on_revoke)
        executor = ThreadPoolExecutor(max_workers=capacity, thread_name_prefix="reduction")
        retry_at: list[tuple[float, Message]] = []
        futures: set[Future] = set()
        if on_ready:
            on_ready()
        try:
            while not self.stop_event.is_set():
                self._drain(done, tracker, consumer, retry_at)
                now = time.monotonic()
                for due in [r for r in retry_at if r[0] <= now]:
                    retry_at.remove(due)
                    futures.add(executor.submit(self._work, due[1], done))
                busy = tracker.in_flight() >= capacity
                if busy != paused:
                    assignment = consumer.assignment()
                    (consumer.pause if busy else consumer.resume)(assignment)
                    paused = busy
                messages = consumer.consume(max(1, capacity - tracker.in_flight()), timeout=0.2)
                for msg in messages:
                    if msg.error() is not None:
                        log.warning("consumer: %s", msg.error())
                        continue
                    tracker.start(msg)
                    futures.add(executor.submit(self._work, msg, done))
                futures = {f for f in futures if not f.done()}
        finally:
            # Keep polling (all partitions paused) while running reductions finish: a member that stops
            # polling is dropped from the group and its messages would be run again by another runner.
            log.info("runner stopping: waiting for %d running reductions", tracker.in_flight())
            with contextlib.suppress(Exception):
                consumer.pause(consumer.assignment())
            executor.shutdown(wait=False, cancel_futures=True)
            while any(not f.done() for f in futures):  # cancelled or interrupted jobs are not waited for
                consumer.consume(1, timeout=0.2)
                self._drain(done, tracker, consumer, [])
            self._drain(done, tracker, consumer, [])
            consumer.close()
            self._publisher.close()
            followers.set()
            if pool is not None:
                pool.stop()
                self.kernels = None

    def _drain(self, done: queue.SimpleQueue, tracker: OffsetTracker, consumer, retry_at: list) -> None:
        finished = False
        while True:
            try:
                msg, ok = done.get_nowait()
            except queue.Empty:
                break
            if ok:
                tracker.finish(msg)
                finished = True
            elif not self.stop_event.is_set():
                retry_at.append((time.monotonic() + 5.0, msg))  # broker trouble: try the message again
        if finished:
            offsets = tracker.committable()
            if offsets:
                try:
                    consumer.commit(offsets=offsets, asynchronous=False)
                    tracker.committed(offsets)
                except Exception as exc:
                    log.warning("commit failed (will retry): %s", exc)

    def _work(self, msg: Message, done: queue.SimpleQueue) -> None:
        """Worker thread: process one message; report whether its offset may be committed."""
        try:
            self.handle(msg)
            done.put((msg, True))
        except Interrupted:
            log.info("interrupted %s[%d]@%d: left for redelivery", msg.topic(), msg.partition(), msg.offset())
        except ReservationBusy as exc:
            log.info("%s; will look again", exc)
            done.put((msg, False))
        except Exception:
            log.exception("could not process %s[%d]@%d; retrying", msg.topic(), msg.partition(), msg.offset())
            done.put((msg, False))

    # -- one message ----------------------------------------------------------------------------
    def handle(self, msg: Message) -> None:
        topic, raw = msg.topic(), msg.value() or b""
        model = ReductionRequest if topic == REDUCTION_REQUESTS else RunCompletion
        message_id = _message_id(raw)
        headers = {k: v.decode(errors="replace") for k, v in (msg.headers() or []) if v}
        replay = headers.get(REPLAY_ID_HEADER) or headers.get(REPLAY_HEADER)
        job_id = job_id_for(topic, msg.partition(), msg.offset(), message_id, replay)
        trigger = TriggerRef(topic=topic, partition=msg.partition(), offset=msg.offset(), message_id=message_id)
        try:
            request = model.model_validate_json(raw)
        except ValidationError as exc:
            self._reject(msg, job_id, trigger, f"invalid message: {_validation_reason(exc)}", _identity(raw))
            return
        if not self.serves(request):
            log.debug("%s: %s runs in another environment's runner group", job_id[:8], request.instrument)
            return
        known = self.view.get(job_id)
        if known is not None and known.state.final:
            log.info("job %s already %s: not run again", job_id, known.state.value)
            return
        job = Job(job_id, request, trigger)
        job.fields = {
            "instrument": request.instrument,
            "run_number": request.run_number,
            "rb_number": request.rb_number,
            "run_title": request.run_title,
            "requested_by": getattr(request, "requested_by", None) or _started_by(request.started_by),
            "rerun_of": getattr(request, "rerun_of", None),
            "template": request.template,
            "data": request.data_files,
            "queued_at": job.queued_at,
        }
        try:
            self._process(job)
        except Rejected as exc:
            self._reject(msg, job_id, trigger, str(exc), job.fields)

    def _process(self, job: Job) -> None:
        request = job.request
        self._status(job, JobState.QUEUED)
        try:
            template = self.registry.resolve(request.instrument, request.template)
        except TemplateError as exc:
            self._status(job, JobState.SKIPPED, reason=str(exc), finished_at=utcnow())
            return
        try:
            paths = check_data_paths(request.data_files, self.settings.data_roots)
        except DataPathError as exc:
            raise Rejected(str(exc)) from None
        try:
            wait_until_ready(paths, self.settings.file_wait_seconds, self.stop_event)
        except DataNotReady as exc:
            if self.stop_event.is_set():
                raise Interrupted() from None
            self._status(job, JobState.FAILED, reason=str(exc), finished_at=utcnow())
            return
        rb = request.rb_number or rb_from_nexus(paths[0])
        if rb is None or not rb.isdigit():
            raise Rejected(f"no valid RB (experiment) number: message has {request.rb_number!r}, "
                           f"NeXus experiment_identifier of {paths[0].name} has {rb!r}")
        job.fields["rb_number"] = rb
        notes = [] if len(rb) == 7 else [f"RB {rb} is not a 7-digit experiment number (calibration run?)"]
        published = self.archive.published(job.job_id, request.instrument, rb, request.runs)
        if published is not None:  # crashed after publishing, before committing: re-announce, do not rerun
            self._publish_status(published)
            return
        reservation = self.archive.reserve(job.job_id, request.instrument, rb, request.runs)
        try:
            self._run_reserved(job, template, reservation, paths, rb, notes)
        finally:  # whatever happened, the job's lock is not held past this attempt (a retry takes it again)
            if reservation.lock is not None:
                reservation.lock.close()

    def _run_reserved(self, job: Job, template: Template, reservation: Reservation, paths: list[Path], rb: str,
                      notes: list[str]) -> None:
        request = job.request
        defaults = self.defaults(request.instrument, rb) if self.defaults else {}
        try:
            parameters = build_parameters(template, request, rb, paths, reservation.final, defaults)
        except ParameterError as exc:
            self.archive.release(reservation)
            raise Rejected(str(exc)) from None
        kernel, note = self.kernel_for(template, getattr(request, "environment_hash", None))
        if kernel is None:
            self.archive.release(reservation)
            self._status(job, JobState.FAILED, reason=note, finished_at=utcnow())
            return
        if note:
            notes.append(note)
        notebook = self.archive.relative(reservation.notebook)
        started = utcnow()
        self._status(job, JobState.RUNNING, version=reservation.version, notebook=notebook, started_at=started,
                     parameters=parameters, kernel=kernel, environment=template.config.environment,
                     template_hash=template.content_hash, reason="; ".join(notes) or None)
        provenance = {
            "job_id": job.job_id,
            "template": str(template.path),
            "template_hash": template.content_hash,
            "parameters": parameters,
            "trigger": job.trigger.model_dump(),
            "runner": runner_record(self.identity),
        }
        result = execute(template.path, reservation.staged_notebook, reservation.final, parameters, kernel,
                         self.kernels, timeout=template.config.timeout, metadata=provenance)
        if self.stop_event.is_set() and result.state is not JobState.SUCCEEDED:
            raise Interrupted()  # killed by our own shutdown: the run is redone after redelivery
        outputs = output_files(reservation.final, exclude={reservation.notebook_name, RECORD})
        if result.reason:
            notes.append(result.reason)
        record = self._event(
            job, result.state, version=reservation.version, notebook=notebook, started_at=result.started_at,
            finished_at=result.finished_at, parameters=parameters, kernel=kernel,
            environment=result.kernel_info.get("environment") or template.config.environment,
            environment_hash=result.kernel_info.get("environment_hash"), template_hash=template.content_hash,
            output_files=[self.archive.relative(p) for p in outputs],
            scraps=scraps_summary(reservation.staged_notebook), error=result.error, reason="; ".join(notes) or None,
        )
        self.archive.publish(reservation, record)
        self._publish_status(record)

    def serves(self, request: RunCompletion) -> bool:
        """Whether this runner's environments include the request's template (unknown instruments: yes,
        so that they are reported as skipped)."""
        if self.settings.runner_environments is None:
            return True
        try:
            environment = self.registry.config(request.instrument).environment
        except TemplateError:
            return True
        return environment in self.settings.runner_environments

    # -- kernels --------------------------------------------------------------------------------
    def kernel_for(self, template: Template, environment_hash: str | None = None) -> tuple[str | None, str | None]:
        """The kernel a run uses, and a note for the user; ``(None, reason)`` when it cannot run.

        A requested build (rerun "with the original environment") must exist exactly; otherwise the
        environment's current build, or the runner's own ``python3`` while the environment is not built.
        """
        environment = template.config.environment
        if environment_hash:
            if template.config.kernel or not environment:
                return None, f"{template.instrument} runs in kernel {template.kernel_name}, which has no builds"
            exact = environment_kernel_name(environment, normalise_hash(environment_hash))
            if kernel_exists(self.settings, exact):
                return exact, None
            return None, f"environment {environment} build {environment_hash} is not available on this runner"
        kernel = template.kernel_name
        if kernel is not None and kernel_exists(self.settings, kernel):
            return kernel, None
        if kernel is not None:
            return FALLBACK_KERNEL, f"kernel {kernel} is not built (`nbreduce env build`); ran in {FALLBACK_KERNEL}"
        return FALLBACK_KERNEL, None

    def warm_plan(self) -> tuple[dict[str, int], dict[str, list[str]]]:
        """Pool sizes and preload statements per kernel (see ``Settings.warm_kernels``)."""
        preload = preload_by_kernel()
        if self.settings.warm_kernels.strip() not in ("auto", ""):
            text = self.settings.warm_kernels.strip()
            return ({} if text == "0" else parse_sizes(text)), preload
        sizes: dict[str, int] = {}
        for instrument in self.registry.instruments():
            try:
                template = self.registry.resolve(instrument)
            except TemplateError:
                continue
            kernel, _ = self.kernel_for(template)
            if kernel is None:
                continue
            sizes[kernel] = self.settings.max_parallel
            env_kernel = environment_kernel_name(template.config.environment) if template.config.environment else None
            if kernel == FALLBACK_KERNEL and env_kernel in preload:  # the runner's venv carries the same packages
                preload.setdefault(FALLBACK_KERNEL, [])
                preload[FALLBACK_KERNEL] = list(dict.fromkeys(preload[FALLBACK_KERNEL] + preload[env_kernel]))
        return sizes, preload

    # -- publishing -----------------------------------------------------------------------------
    def _event(self, job: Job, state: JobState, **fields: Any) -> StatusEvent:
        return StatusEvent(job_id=job.job_id, state=state, trigger=job.trigger, runner=self.identity,
                           **{**job.fields, **fields})

    def _status(self, job: Job, state: JobState, **fields: Any) -> StatusEvent:
        event = self._event(job, state, **fields)
        self._publish_status(event)
        return event

    def _publish_status(self, event: StatusEvent) -> None:
        assert self._publisher is not None
        self._publisher.publish(REDUCTION_STATUS, event, key=event.job_id)
        self.view.apply(event)
        log.info("%s %s %s run %s: %s%s", event.job_id[:8], event.instrument, event.state.value, event.run_number,
                 event.notebook or "", f" ({event.reason})" if event.reason else "")

    def _reject(self, msg: Message, job_id: str, trigger: TriggerRef, reason: str, fields: dict[str, Any]) -> None:
        assert self._publisher is not None
        letter = DeadLetter.wrap(reason, msg.topic(), msg.value(), msg.key(), partition=msg.partition(),
                                 offset=msg.offset(), job_id=job_id, reporter=self.identity)
        self._publisher.publish(DEAD_LETTER, letter, key=msg.key())
        if fields:  # identifiable: users find the rejection next to their runs
            self._publish_status(StatusEvent(job_id=job_id, state=JobState.REJECTED, trigger=trigger, reason=reason,
                                             runner=self.identity, finished_at=utcnow(), **fields))
        else:
            log.warning("dead-lettered %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), reason)


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

    def committable(self, keys: list[tuple[str, int]] | None = None) -> list[TopicPartition]:
        offsets = []
        for key in keys if keys is not None else list(self._highest):
            if key not in self._highest:
                continue
            pending = self._inflight.get(key)
            position = min(pending) if pending else self._highest[key] + 1
            if position > self._committed.get(key, -1):
                offsets.append(TopicPartition(key[0], key[1], position))
        return offsets

    def committed(self, offsets: list[TopicPartition]) -> None:
        for tp in offsets:
            self._committed[(tp.topic, tp.partition)] = tp.offset

    def forget(self, keys: list[tuple[str, int]]) -> None:
        for key in keys:
            self._inflight.pop(key, None)
            self._highest.pop(key, None)
            self._committed.pop(key, None)


def _message_id(raw: bytes) -> str | None:
    try:
        value = json.loads(raw).get("message_id")
    except (ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


def _identity(raw: bytes) -> dict[str, Any]:
    """Whatever can safely be said about an invalid message, to show its rejection next to the run."""
    import re

    try:
        data = json.loads(raw)
    except ValueError:
        return {}
    if not isinstance(data, dict):
        return {}
    fields: dict[str, Any] = {}
    instrument = data.get("instrument")
    if isinstance(instrument, str) and re.match(_SAFE_INSTRUMENT, instrument.upper()):
        fields["instrument"] = instrument.upper()
    run = data.get("run_number")
    if isinstance(run, int) and not isinstance(run, bool) and run > 0:
        fields["run_number"] = run
    rb = data.get("rb_number")
    if isinstance(rb, int | str) and str(rb).isdigit():
        fields["rb_number"] = str(rb)
    return fields


def _validation_reason(exc: ValidationError) -> str:
    parts = []
    for error in exc.errors()[:5]:
        where = ".".join(str(p) for p in error.get("loc", ())) or "message"
        parts.append(f"{where}: {error.get('msg')}")
    return "; ".join(parts)


def _started_by(value: int | str) -> str:
    return {0: "run detection", -1: "manual"}.get(value, str(value)) if isinstance(value, int) else value

