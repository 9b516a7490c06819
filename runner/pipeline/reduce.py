"""One message in, one archived notebook out: what a runner does with each run completion or request.

validate -> resolve the instrument's template -> check and wait for the data files -> reserve a
version -> execute with papermill in the template's environment -> publish the version to the
archive -> publish the status. The caller (:mod:`runner.pipeline.consumer`) commits the offset only
after :meth:`Reducer.handle` returned. Job ids are derived from the request, so a message redelivered
after a crash is recognised and never becomes a second version.
"""

from __future__ import annotations

import json
import logging
import re
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from confluent_kafka import Message
from pydantic import ValidationError

from runner.archive.layout import RECORD, run_label
from runner.archive.permissions import archive_permissions
from runner.archive.store import Archive, Reservation
from runner.bus.clients import Publisher
from runner.bus.models import DeadLetter, JobState, ReductionRequest, RunCompletion, StatusEvent, TriggerRef, utcnow
from runner.bus.status import StatusView
from runner.bus.topics import DEAD_LETTER, REDUCTION_REQUESTS, REDUCTION_STATUS, REPLAY_HEADER, REPLAY_ID_HEADER
from runner.config import Settings
from runner.isis.nexus import rb_from_nexus
from runner.kernels.environments import kernel_name as environment_kernel_name
from runner.kernels.environments import normalise_hash
from runner.pipeline.datafiles import DataNotReady, DataPathError, check_data_paths, wait_until_ready
from runner.pipeline.engine import KernelProvider, kernel_exists
from runner.pipeline.execute import execute
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


class Reducer:
    """Turns one message into a reduction; its collaborators are given, never built here."""

    def __init__(self, settings: Settings, *, kernels: KernelProvider, defaults: DefaultsLookup,
                 status: StatusView, publisher: Publisher, identity: str, stop: threading.Event | None = None):
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

    # -- one message ----------------------------------------------------------------------------
    def identify(self, msg: Message) -> tuple[str, dict[str, Any]]:
        """The job id of ``msg`` and whatever can safely be said about the run, even when the message is invalid."""
        raw = msg.value() or b""
        headers = {k: v.decode(errors="replace") for k, v in (msg.headers() or []) if v}
        replay = headers.get(REPLAY_ID_HEADER) or headers.get(REPLAY_HEADER)
        return job_id_for(msg.topic(), msg.partition(), msg.offset(), _message_id(raw), replay), _identity(raw)

    def handle(self, msg: Message) -> None:
        topic, raw = msg.topic(), msg.value() or b""
        model = ReductionRequest if topic == REDUCTION_REQUESTS else RunCompletion
        job_id, identity = self.identify(msg)
        trigger = TriggerRef(topic=topic, partition=msg.partition(), offset=msg.offset(), message_id=_message_id(raw))
        try:
            request = model.model_validate_json(raw)
        except ValidationError as exc:
            self.reject(msg, job_id, trigger, f"invalid message: {describe_errors(exc)}", identity)
            return
        if not serves(self.settings, self.registry, request):
            log.debug("%s: %s runs in another environment's runner group", job_id[:8], request.instrument)
            return
        known = self.status.get(job_id)
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
        self.active[job_id] = f"{request.instrument} {run_label(request.runs)}"
        try:
            self._process(job, announced=known is not None)
        except Rejected as exc:
            self.reject(msg, job_id, trigger, str(exc), job.fields)
        finally:
            self.active.pop(job_id, None)

    def _process(self, job: Job, announced: bool) -> None:
        request = job.request
        if not announced:  # a retried job is already shown queued (or running): say nothing new yet
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
            wait_until_ready(paths, self.settings.runner.file_wait_seconds, self.stop)
        except DataNotReady as exc:
            if self.stop.is_set():
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
            self.publish_status(published)
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
        progress = self.progress.start(job.job_id, request.instrument, rb)
        try:
            result = execute(template.path, reservation.staged_notebook, reservation.final, parameters, kernel,
                             self.kernels, timeout=template.config.timeout, metadata=provenance, progress=progress)
        finally:
            self.progress.finish(progress)
        if self.stop.is_set() and result.state is not JobState.SUCCEEDED:
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
            scraps=result.scraps, error=result.error, warnings=result_warnings(result.scraps, progress.warnings),
            reason="; ".join(notes) or None,
        )
        self.archive.publish(reservation, record)
        self.publish_status(record)

    # -- kernels --------------------------------------------------------------------------------
    def kernel_for(self, template: Template, environment_hash: str | None = None) -> tuple[str | None, str | None]:
        return kernel_for(self.settings, template, environment_hash)

    # -- publishing -----------------------------------------------------------------------------
    def _event(self, job: Job, state: JobState, **fields: Any) -> StatusEvent:
        return StatusEvent(job_id=job.job_id, state=state, trigger=job.trigger, runner=self.identity,
                           **{**job.fields, **fields})

    def _status(self, job: Job, state: JobState, **fields: Any) -> StatusEvent:
        event = self._event(job, state, **fields)
        self.publish_status(event)
        return event

    def publish_status(self, event: StatusEvent) -> None:
        self.publisher.publish(REDUCTION_STATUS, event, key=event.job_id)
        self.status.put(event)
        log.info("%s %s %s run %s: %s%s", event.job_id[:8], event.instrument, event.state.value, event.run_number,
                 event.notebook or "", f" ({event.reason})" if event.reason else "")

    def reject(self, msg: Message, job_id: str, trigger: TriggerRef, reason: str, fields: dict[str, Any]) -> None:
        """Dead-letter ``msg`` with ``reason``; when it names a run, users find the rejection next to their runs."""
        letter = DeadLetter.wrap(reason, msg.topic(), msg.value(), msg.key(), partition=msg.partition(),
                                 offset=msg.offset(), job_id=job_id, reporter=self.identity)
        self.publisher.publish(DEAD_LETTER, letter, key=msg.key())
        if fields:
            self.publish_status(StatusEvent(job_id=job_id, state=JobState.REJECTED, trigger=trigger, reason=reason,
                                            runner=self.identity, finished_at=utcnow(), **fields))
        else:
            log.warning("dead-lettered %s[%d]@%d: %s", msg.topic(), msg.partition(), msg.offset(), reason)


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


def _message_id(raw: bytes) -> str | None:
    try:
        value = json.loads(raw).get("message_id")
    except (ValueError, AttributeError, RecursionError):
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 128 else None


def _identity(raw: bytes) -> dict[str, Any]:
    """Whatever can safely be said about an invalid message, to show its rejection next to the run."""
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
