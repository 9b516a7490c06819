"""One message in, one archived notebook out: what a runner does with each run completion or request.

Three steps, so that only the last one holds a reduction slot:

1. :meth:`Reducer.admit` — validate, recognise redeliveries and reused ids, resolve the instrument's
   template, check the data paths (milliseconds; bad input is dead-lettered here);
2. :meth:`Reducer.prepare` — are the data files ready? If not, the job is shown ``waiting`` and the
   caller parks it on a timer (backoff, bounded by ``runner.file_wait_seconds`` counted from when the job
   was first queued, so a restart does not extend it);
3. :meth:`Reducer.reduce` — reserve a version, execute with papermill in the template's environment,
   publish the version to the archive, publish the final status.

The caller (:mod:`runner.pipeline.consumer`) commits the offset only after the last step returned. Job
ids are derived from the request, so a message redelivered after a crash is recognised and never
becomes a second version; a different message that reuses a job's id is dead-lettered, never dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Message
from pydantic import TypeAdapter, ValidationError

from runner.archive.layout import RECORD, STAGING, run_label
from runner.archive.permissions import archive_permissions
from runner.archive.store import Archive, Reservation
from runner.bus.clients import Deliveries, Publisher
from runner.bus.models import (
    MAX_MESSAGE_BYTES,
    DeadLetter,
    JobState,
    RBNumber,
    ReductionRequest,
    RunCompletion,
    StatusEvent,
    TriggerRef,
    utcnow,
)
from runner.bus.status import JobMemos
from runner.bus.topics import DEAD_LETTER, REDUCTION_REQUESTS, REDUCTION_STATUS, REPLAY_HEADER, REPLAY_ID_HEADER
from runner.config import Settings
from runner.isis.nexus import rb_from_nexus
from runner.kernels.environments import kernel_name as environment_kernel_name
from runner.kernels.environments import normalise_hash
from runner.pipeline.datafiles import DataPathError, check_data_paths, is_ready
from runner.pipeline.engine import KernelProvider, kernel_exists
from runner.pipeline.execute import execute
from runner.pipeline.faults import ARCHIVE_ERRNOS, archive_fault
from runner.pipeline.inspection import output_files
from runner.pipeline.parameterize import ParameterError, build_parameters
from runner.pipeline.progress import ProgressSender
from runner.pipeline.provenance import runner_record
from runner.templates.params import describe_errors
from runner.templates.registry import Template, TemplateError, TemplateRegistry

log = logging.getLogger(__name__)

JOB_NAMESPACE = uuid.UUID("6f1c1a52-4d0e-4b8e-9a51-6e6272656475")
#: The runner's own kernel: for templates that name no environment (or name ``python3`` as their kernel).
RUNNER_KERNEL = "python3"
_SAFE_INSTRUMENT = re.compile(r"^[A-Z][A-Z0-9_]{0,31}$")
_RB = TypeAdapter(RBNumber)
#: How a notebook's own error names an archive fault (the template could not write its outputs).
_ARCHIVE_ERROR_TEXT = re.compile(rf"\[Errno ({'|'.join(str(n) for n in sorted(ARCHIVE_ERRNOS))})\]")
#: Longest pause between two looks at a data file that is not ready.
MAX_WAIT_STEP = 5.0

#: Default parameters of (instrument, RB): instrument scientists' defaults (runner.templates.defaults).
DefaultsLookup = Callable[[str, str | None], dict[str, Any]]


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


def request_job_id(request: ReductionRequest) -> str:
    """Requests carry a message id, so their job id is known before they are even published."""
    return job_id_for(REDUCTION_REQUESTS, -1, -1, request.message_id)


def request_digest(request: RunCompletion) -> str:
    """What makes a request this request: its content without the send time (a trigger re-emitting a run after
    a crash stamps a new time) and without the id (which the job id already is)."""
    content = request.model_dump(mode="json", exclude={"timestamp", "message_id"})
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


class Interrupted(Exception):
    """The runner is shutting down: leave the message uncommitted so it is redelivered."""


class Rejected(Exception):
    """The message cannot be processed as it is: dead-letter it with this reason."""


class ArchiveUnavailable(Exception):
    """The archive takes no writes now (full, read-only): the job is retried until it does, never failed for it."""


@dataclass(eq=False)
class Job:
    """One request being processed, with the fields every status event of it repeats."""

    job_id: str
    request: RunCompletion
    trigger: TriggerRef
    msg: Message
    queued_at: datetime = field(default_factory=utcnow)
    fields: dict[str, Any] = field(default_factory=dict)
    template: Template | None = None
    paths: list[Path] = field(default_factory=list)
    #: Shown ``waiting`` already (its data file was not ready), and the next pause between two looks.
    waiting: bool = False
    next_look: float = 0.2
    #: Milliseconds per phase (see :attr:`runner.bus.models.StatusEvent.timings`).
    timings: dict[str, float] = field(default_factory=dict)
    #: When this runner took the message (``time.monotonic``).
    received: float = field(default_factory=time.monotonic)

    def timed(self, phase: str, since: float) -> None:
        """Add the time since ``since`` (monotonic) to ``phase``."""
        self.timings[phase] = round(self.timings.get(phase, 0.0) + (time.monotonic() - since) * 1000, 2)


class Reducer:
    """Turns one message into a reduction; its collaborators are given, never built here."""

    def __init__(self, settings: Settings, *, kernels: KernelProvider, defaults: DefaultsLookup,
                 status: JobMemos, publisher: Publisher, identity: str, stop: threading.Event | None = None):
        self.settings = settings
        self.registry = TemplateRegistry(settings.notebooks)
        self.archive = Archive(settings.archive, archive_permissions(settings.archive_permissions))
        self.kernels = kernels
        self.defaults = defaults
        self.status = status
        self.publisher = publisher
        self.identity = identity
        #: Set when the runner shuts down (an interrupted run is redone after redelivery).
        self.stop = stop or threading.Event()
        #: Jobs being processed now: job id -> "INSTRUMENT run" (for the runner's heartbeat).
        self.active: dict[str, str] = {}
        #: Live progress of running notebooks, sent without waiting for the broker.
        self.progress = ProgressSender(publisher)
        #: The archive's own words while it takes no writes (None once a version was published again).
        self.archive_problem: str | None = None

    # -- identity -------------------------------------------------------------------------------
    def identify(self, msg: Message) -> tuple[str, dict[str, Any]]:
        """The job id of ``msg`` and whatever can safely be said about the run, even when the message is invalid."""
        raw = msg.value() or b""
        headers = {k: v.decode(errors="replace") for k, v in (msg.headers() or []) if v}
        replay = headers.get(REPLAY_ID_HEADER) or headers.get(REPLAY_HEADER)
        if len(raw) > MAX_MESSAGE_BYTES:  # never parsed: its id and identity are not to be trusted
            return job_id_for(msg.topic(), msg.partition(), msg.offset(), None, replay), {}
        return job_id_for(msg.topic(), msg.partition(), msg.offset(), message_id_of(raw), replay), identity_of(raw)

    # -- step 1: admit --------------------------------------------------------------------------
    def admit(self, msg: Message, received: float | None = None, deliveries: Deliveries | None = None) -> Job | None:
        """The job ``msg`` asks for, queued; None when nothing is left to do (rejected, skipped, a redelivery of a
        finished job, a runner group of another environment). With ``deliveries``, dead letters and final states are
        sent without waiting and tracked there (the caller waits for them before committing)."""
        started = time.monotonic()
        topic, raw = msg.topic(), msg.value() or b""
        job_id, identity = self.identify(msg)
        trigger = TriggerRef(topic=topic, partition=msg.partition(), offset=msg.offset(),
                             message_id=message_id_of(raw) if len(raw) <= MAX_MESSAGE_BYTES else None,
                             digest=hashlib.sha256(raw).hexdigest())
        known = self.status.get(job_id)
        problem: str | None = None
        request: RunCompletion | None = None
        if len(raw) > MAX_MESSAGE_BYTES:
            problem, identity = f"message of {len(raw):,} bytes exceeds the limit of {MAX_MESSAGE_BYTES:,} bytes", {}
        else:
            try:
                request = (ReductionRequest if topic == REDUCTION_REQUESTS else RunCompletion).model_validate_json(raw)
            except ValidationError as exc:
                problem = f"invalid message: {describe_errors(exc)}"
            else:
                trigger.digest = request_digest(request)
        recorded = known.digest if known is not None else None
        if recorded is not None and recorded != trigger.digest:
            # not a redelivery: another message reusing the id. The job stays the first message's, whatever this
            # one is, so no state is published for it: it is dead-lettered with why.
            self.reject(msg, job_id, trigger, f"message id {trigger.message_id!r} is already job {job_id} "
                        f"({known.state.value}, {known.instrument} run {_shorten(known.run_number)}) of a different "
                        f"message; not run: send it with a message id of its own{f' ({problem})' if problem else ''}",
                        {}, deliveries)
            return None
        if known is not None and known.state.final:  # the same message again (or one recorded before digests were)
            log.info("job %s already %s: a redelivery, not run again", job_id[:8], known.state.value)
            return None
        if request is None:
            self.reject(msg, job_id, trigger, problem or "invalid message", identity, deliveries)
            return None
        if not serves(self.settings, self.registry, request):
            log.debug("%s: %s runs in another environment's runner group", job_id[:8], request.instrument)
            return None
        job = Job(job_id, request, trigger, msg)
        if received is not None:
            job.received = received
            kind, produced_ms = msg.timestamp()
            if kind and produced_ms > 0:  # the producer's clock -> taken by this runner
                taken_ms = (time.time() - (time.monotonic() - received)) * 1000
                job.timings["queue"] = round(max(0.0, taken_ms - produced_ms), 2)
        if known is not None and known.queued_at is not None:  # a retry or a redelivery: same job, same wait
            job.queued_at = known.queued_at
        job.waiting = known is not None and known.state is JobState.WAITING
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
        if known is None:  # a retried job is already shown queued (or waiting, running): say nothing new yet
            self._status(job, JobState.QUEUED, wait=False)
        try:
            job.template = self.registry.resolve(request.instrument, request.template)
        except TemplateError as exc:
            self._status(job, JobState.SKIPPED, reason=str(exc), finished_at=utcnow(), deliveries=deliveries)
            return None
        try:
            job.paths = check_data_paths(request.data_files, self.settings.data_roots)
        except DataPathError as exc:
            self.reject(msg, job_id, trigger, str(exc), job.fields, deliveries)
            return None
        job.timed("admit", started)
        return job

    # -- step 2: the data files -----------------------------------------------------------------
    def prepare(self, job: Job, deliveries: Deliveries | None = None) -> float | None:
        """0 when the job's data files are ready; else seconds until the next look (the job is shown ``waiting``);
        None when the wait is over (the job is reported failed)."""
        started = time.monotonic()
        pending = [(path, why) for path in job.paths for ready, why in [is_ready(path)] if not ready]
        if not pending:
            return 0.0
        waited = (utcnow() - job.queued_at).total_seconds()
        limit = self.settings.runner.file_wait_seconds
        reasons = "; ".join(f"{path} {why}" for path, why in pending)
        if waited >= limit:
            self._status(job, JobState.FAILED, reason=f"data file not readable after {waited:.0f} s: {reasons}",
                         finished_at=utcnow(), deliveries=deliveries)
            return None
        if not job.waiting:
            job.waiting = True
            self._status(job, JobState.WAITING, reason=f"waiting for data (up to {limit:.0f} s): {reasons}",
                         wait=False)
        delay = min(job.next_look, MAX_WAIT_STEP, limit - waited)
        job.next_look *= 2
        job.timed("admit", started)
        return max(delay, 0.01)

    # -- step 3: the reduction ------------------------------------------------------------------
    def reduce(self, job: Job) -> None:
        """Reserve, execute, archive, announce. Raises :class:`ArchiveUnavailable` (after showing the job
        ``waiting`` with the file system's own words) when the archive takes no writes."""
        request, paths = job.request, job.paths
        assert job.template is not None
        self.active[job.job_id] = f"{request.instrument} {run_label(request.runs)}"
        try:
            rb = request.rb_number or rb_from_nexus(paths[0])
            try:
                rb = _RB.validate_python(rb)
            except ValidationError:
                raise Rejected(f"no valid RB (experiment) number: message has {request.rb_number!r}, NeXus "
                               f"experiment_identifier of {paths[0].name} has {_shorten(rb)!r} "
                               "(expected 1 to 12 digits)") from None
            job.fields["rb_number"] = rb
            notes = [] if len(rb) == 7 else [f"RB {rb} is not a 7-digit experiment number (calibration run?)"]
            published = self.archive.published(job.job_id, request.instrument, rb, request.runs)
            if published is not None:  # crashed after publishing, before committing: re-announce, do not rerun
                self.publish_status(published)
                return
            started = time.monotonic()
            reservation = self.archive.reserve(job.job_id, request.instrument, rb, request.runs)
            job.timed("reserve", started)
            try:
                self._run_reserved(job, job.template, reservation, paths, rb, notes)
            finally:  # whatever happened, the job's lock is not held past this attempt (a retry takes it again)
                if reservation.lock is not None:
                    reservation.lock.close()
        except Rejected as exc:
            self.reject(job.msg, job.job_id, job.trigger, str(exc), job.fields)
        except OSError as exc:
            fault = archive_fault(exc)
            if fault is None:
                raise
            self._archive_unavailable(job, fault)
        finally:
            self.active.pop(job.job_id, None)

    def _archive_unavailable(self, job: Job, fault: OSError | str) -> None:
        self.archive_problem = f"archive not writable ({fault})"
        reason = f"{self.archive_problem}; the run starts again once it is"
        self._status(job, JobState.WAITING, reason=reason, wait=False)
        raise ArchiveUnavailable(reason)

    def _run_reserved(self, job: Job, template: Template, reservation: Reservation, paths: list[Path], rb: str,
                      notes: list[str]) -> None:
        request = job.request
        try:
            parameters = build_parameters(template, request, rb, paths, reservation.final,
                                          self.defaults(request.instrument, rb))
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
        self._status(job, JobState.RUNNING, wait=False, version=reservation.version, notebook=notebook,
                     started_at=utcnow(), parameters=parameters, kernel=kernel, environment=template.config.environment,
                     template_hash=template.content_hash, reason="; ".join(notes) or None)
        provenance = {
            "job_id": job.job_id,
            "template": str(template.path),
            "template_hash": template.content_hash,
            "parameters": parameters,
            "trigger": job.trigger.model_dump(exclude_none=True),
            "runner": runner_record(self.identity),
        }
        progress = self.progress.start(job.job_id, request.instrument, rb)
        try:
            result = execute(template.path, reservation.staged_notebook, reservation.final, parameters, kernel,
                             self.kernels, timeout=template.config.timeout, metadata=provenance, progress=progress)
        finally:
            self.progress.finish(progress)
        job.timings.update(result.timings)
        if self.stop.is_set() and result.state is not JobState.SUCCEEDED:
            raise Interrupted()  # killed by our own shutdown: the run is redone after redelivery
        if result.state is JobState.FAILED and result.error is not None \
                and _ARCHIVE_ERROR_TEXT.search(f"{result.error.ename}: {result.error.evalue}") \
                and (self.archive_problem is not None or self.archive_fault() is not None):
            # the template could not write its outputs while the archive takes no writes (or has not taken one
            # since it last refused): not the run's failure. A few freed bytes can make a probe pass meanwhile.
            self._archive_unavailable(job, self.archive_fault() or f"{result.error.ename}: {result.error.evalue}")
        started = time.monotonic()
        outputs = output_files(reservation.final, exclude={reservation.notebook_name, RECORD})
        if result.reason:
            notes.append(result.reason)
        record = self._event(
            job, result.state, version=reservation.version, notebook=notebook, started_at=result.started_at,
            finished_at=result.finished_at, parameters=parameters, kernel=kernel,
            environment=result.kernel_info.get("environment") or template.config.environment,
            environment_hash=result.kernel_info.get("environment_hash"), template_hash=template.content_hash,
            output_files=[self.archive.relative(p) for p in outputs],
            scraps=result.scraps, error=result.error, warnings=result_warnings(result.scraps, progress.warnings),
            reason="; ".join(notes) or None,
        )
        self.archive.publish(reservation, record)
        self.archive_problem = None
        job.timed("archive", started)
        job.timed("runner", job.received)  # the whole time this runner had the message, up to the announcement
        record.timings = dict(job.timings)
        self.publish_status(record)

    def archive_fault(self) -> OSError | None:
        """Whether the archive takes a write now: the file system's error when it does not (full, read-only)."""
        probe = self.archive.root / STAGING / f".probe-{os.getpid()}-{threading.get_ident()}"
        try:
            probe.parent.mkdir(parents=True, exist_ok=True)
            with open(probe, "wb") as handle:
                handle.write(b"\0" * 4096)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as exc:
            return exc if exc.errno in ARCHIVE_ERRNOS else None
        finally:
            with contextlib.suppress(OSError):
                probe.unlink(missing_ok=True)
        return None

    # -- kernels --------------------------------------------------------------------------------
    def kernel_for(self, template: Template, environment_hash: str | None = None) -> tuple[str | None, str | None]:
        return kernel_for(self.settings, template, environment_hash)

    # -- publishing -----------------------------------------------------------------------------
    def _event(self, job: Job, state: JobState, **fields: Any) -> StatusEvent:
        return StatusEvent(job_id=job.job_id, state=state, trigger=job.trigger, runner=self.identity,
                           **{**job.fields, **fields})

    def _status(self, job: Job, state: JobState, wait: bool = True, deliveries: Deliveries | None = None,
                **fields: Any) -> StatusEvent:
        """Publish a state of ``job``: final states wait for the broker's acknowledgement (the offset is committed
        after them), the others do not (a later state supersedes a lost one)."""
        event = self._event(job, state, **fields)
        if state.final:
            event.timings = dict(job.timings)
        self.publish_status(event, wait=wait, deliveries=deliveries)
        return event

    def publish_status(self, event: StatusEvent, wait: bool = True, deliveries: Deliveries | None = None) -> None:
        """Publish ``event`` and fold it into this runner's view of the jobs: waiting for the acknowledgement, or
        not (``wait=False``: a non-final state), or tracked in ``deliveries`` (folded once acknowledged, so a
        retry after a lost record does not take the job for done)."""
        if deliveries is not None:
            self.publisher.send(REDUCTION_STATUS, event, key=event.job_id,
                                on_delivery=deliveries.track(lambda: self.status.put(event)))
        elif wait:
            self.publisher.publish(REDUCTION_STATUS, event, key=event.job_id)
            self.status.put(event)
        else:
            self.publisher.send(REDUCTION_STATUS, event, key=event.job_id)
            self.status.put(event)
        log.info("%s %s %s run %s: %s%s", event.job_id[:8], event.instrument, event.state.value,
                 _shorten(event.run_number), event.notebook or "",
                 f" ({_shorten(event.reason)})" if event.reason else "")

    def reject(self, msg: Message, job_id: str, trigger: TriggerRef, reason: str, fields: dict[str, Any],
               deliveries: Deliveries | None = None) -> None:
        """Dead-letter ``msg`` with ``reason``; when it names a run, users find the rejection next to their runs."""
        letter = DeadLetter.wrap(reason, msg.topic(), msg.value(), msg.key(), partition=msg.partition(),
                                 offset=msg.offset(), job_id=job_id, reporter=self.identity)
        if deliveries is not None:
            self.publisher.send(DEAD_LETTER, letter, key=msg.key(), on_delivery=deliveries.track())
        else:
            self.publisher.publish(DEAD_LETTER, letter, key=msg.key())
        if fields:
            self.publish_status(StatusEvent(job_id=job_id, state=JobState.REJECTED, trigger=trigger, reason=reason,
                                            runner=self.identity, finished_at=utcnow(), **fields),
                                deliveries=deliveries)
        else:
            log.warning("dead-lettered %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), _shorten(reason))


#: The scrap a template glues to mark its result as suspect (docs/templates.md).
WARNINGS_SCRAP = "nbreduce_warnings"
MAX_WARNINGS = 50


def result_warnings(scraps: dict[str, Any], python_warnings: list[str]) -> list[str]:
    """The template's ``nbreduce_warnings`` (a list of short strings, or one string) then the Python warnings of
    its own cells; anything else glued under that name is reported rather than dropped."""
    glued = scraps.get(WARNINGS_SCRAP)
    if glued is None or glued == [] or glued == "":
        found: list[str] = []
    elif isinstance(glued, str):
        found = [glued]
    elif isinstance(glued, list):
        found = [item if isinstance(item, str) else json.dumps(item) for item in glued]
    else:
        found = [f"{WARNINGS_SCRAP} is not a list of strings: {json.dumps(glued)[:200]}"]
    return [text[:500] for text in dict.fromkeys([*found, *python_warnings])][:MAX_WARNINGS]


def _shorten(value: Any, limit: int = 300) -> Any:
    text = value if isinstance(value, str) else repr(value)
    return value if len(text) <= limit else text[:limit] + "…"


def message_id_of(raw: bytes) -> str | None:
    """The ``message_id`` of a message, valid or not (what its job id is derived from), when it has a usable one."""
    try:
        value = json.loads(raw).get("message_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


def identity_of(raw: bytes) -> dict[str, Any]:
    """Whatever can safely be said about an invalid message, to show its rejection next to the run (a message
    that names nothing identifiable is only dead-lettered)."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(data, dict):
        return {}
    fields: dict[str, Any] = {}
    instrument = data.get("instrument")
    if isinstance(instrument, str) and _SAFE_INSTRUMENT.match(instrument.upper()):
        fields["instrument"] = instrument.upper()
    run = data.get("run_number")
    if isinstance(run, int) and not isinstance(run, bool) and 0 < run < 10**12:
        fields["run_number"] = run
    rb = data.get("rb_number")
    if isinstance(rb, int | str) and str(rb).isdigit() and len(str(rb)) <= 12:
        fields["rb_number"] = str(rb)
    return fields


def _started_by(value: int | str) -> str:
    return {0: "run detection", -1: "manual"}.get(value, str(value)) if isinstance(value, int) else value


def serves(settings: Settings, registry: TemplateRegistry, request: RunCompletion) -> bool:
    """Whether a runner of ``settings``' environments takes the request's template (unknown instruments: yes,
    so that they are reported as skipped)."""
    if settings.runner.environments is None:
        return True
    try:
        environment = registry.config(request.instrument).environment
    except TemplateError:
        return True
    return environment in settings.runner.environments


def kernel_for(settings: Settings, template: Template, environment_hash: str | None = None
               ) -> tuple[str | None, str | None]:
    """The kernel a run uses, and a note for the user; ``(None, reason)`` when it cannot run here.

    A template runs in its environment's kernel or not at all: an environment that is not built on
    this runner (e.g. the conda-only ``mantid`` one) fails the run with that reason, never a silent
    fallback to another kernel. A requested build (rerun "with the original environment") must exist
    exactly. Templates that name no environment, or name ``python3`` as their kernel, run in the
    runner's own interpreter.
    """
    environment = template.config.environment
    if environment_hash:
        if template.config.kernel or not environment:
            return None, f"{template.instrument} runs in kernel {template.kernel_name}, which has no builds"
        exact = environment_kernel_name(environment, normalise_hash(environment_hash))
        if kernel_exists(settings, exact):
            return exact, None
        return None, f"environment {environment} build {environment_hash} is not available on this runner"
    kernel = template.kernel_name or RUNNER_KERNEL
    if kernel == RUNNER_KERNEL or kernel_exists(settings, kernel):
        return kernel, None
    if environment and not template.config.kernel:
        return None, (f"environment {environment} is not built on this runner (kernel {kernel} missing): "
                      f"`nbreduce env build {environment}` on the runner, or a runner of that environment")
    return None, f"kernel {kernel} is not installed on this runner"
