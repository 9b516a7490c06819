"""Pydantic models of every message nbreduce puts on the wire (JSON, with a schema version).

Field names of :class:`RunCompletion` follow the ISIS autoreduction ``data_ready`` message so the
existing producer can switch to nbreduce unchanged; its extra legacy fields are accepted and ignored.
Identifiers that become path components (instrument, run number, RB) are validated strictly here,
so nothing downstream can be tricked into writing outside the archive.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    StringConstraints,
    field_validator,
    model_validator,
)

SCHEMA_VERSION = 1

#: The largest incoming message (run completion, request) nbreduce accepts; larger ones are dead-lettered
#: at once. A run completion is a few hundred bytes; a multi-run job of a thousand files stays far below.
MAX_MESSAGE_BYTES = 256 * 1024
#: The largest record nbreduce writes: brokers refuse records over 1 MB by default (Kafka, Redpanda), so
#: every outgoing record is bounded well below that (:meth:`WireModel.bounded`).
MAX_RECORD_BYTES = 512 * 1024
#: How much of a rejected message's original bytes a dead letter keeps (the rest by reference: source
#: topic, partition, offset, size and SHA-256).
MAX_ORIGINAL_BYTES = 128 * 1024

#: Instrument names become folder names: upper-case letters, digits, underscore only.
InstrumentName = Annotated[
    str,
    BeforeValidator(lambda v: v.strip().upper() if isinstance(v, str) else v),  # "mari" is MARI
    StringConstraints(pattern=r"^[A-Z][A-Z0-9_]{0,31}$"),
]
#: Experiment (RB) numbers: digits only (ISIS uses 7; calibration placeholders are reported by the runner).
RBNumber = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[0-9]{1,12}$")]
RunNumber = Annotated[int, Field(gt=0, lt=10**12)]
#: A data path: at most PATH_MAX (4096) characters.
DataPath = Annotated[str, StringConstraints(max_length=4096)]
#: Sizes of what one message may name: runs and files of a multi-run job, parameter overrides.
MAX_RUNS = 1000
MAX_ARGUMENTS = 200
#: A template of an instrument folder: ``notebooks/<INSTRUMENT>/<name>.ipynb`` (default ``reduce``).
TemplateName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


def _sane_value(value: Any, depth: int = 0) -> None:
    """Template parameter values are JSON scalars and short lists: refuse what no template could take (deep
    nesting, numbers beyond 64 bits or not finite, huge strings and lists), before anything computes on it."""
    if depth > 8:
        raise ValueError("nested more than 8 levels deep")
    if isinstance(value, bool) or value is None:
        return
    if isinstance(value, int):
        if not -(2**63) <= value < 2**63:
            raise ValueError("integer outside the 64-bit range")
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("number is not finite")
    elif isinstance(value, str):
        if len(value) > 10_000:
            raise ValueError("text longer than 10,000 characters")
    elif isinstance(value, list):
        if len(value) > 10_000:
            raise ValueError("list longer than 10,000 items")
        for item in value:
            _sane_value(item, depth + 1)
    elif isinstance(value, dict):
        if len(value) > MAX_ARGUMENTS:
            raise ValueError(f"more than {MAX_ARGUMENTS} entries")
        for key, item in value.items():
            _sane_value(key, depth + 1)
            _sane_value(item, depth + 1)


def _sane_arguments(value: dict[str, Any]) -> dict[str, Any]:
    if len(value) > MAX_ARGUMENTS:
        raise ValueError(f"more than {MAX_ARGUMENTS} parameter overrides")
    for name, item in value.items():
        if len(name) > 64:
            raise ValueError(f"parameter name longer than 64 characters: {name[:64]!r}…")
        try:
            _sane_value(item)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
    return value


def truncate_text(text: str, keep: int) -> str:
    """``text`` cut to ``keep`` characters with a marker saying how much was cut (never silently)."""
    if len(text) <= keep:
        return text
    return f"{text[:keep]}… [{len(text) - keep} characters truncated by nbreduce]"


class WireModel(BaseModel):
    """Base of all wire messages: JSON in, JSON out, tolerant of fields added by newer writers."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    schema_version: int = SCHEMA_VERSION

    #: Fields never shortened by :meth:`bounded` (their values would be corrupted, e.g. base64).
    _unbounded: ClassVar[frozenset[str]] = frozenset()

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    def bounded(self, limit: int = MAX_RECORD_BYTES) -> WireModel:
        """This message, or a copy whose longest texts and lists are cut (with a marker) until it encodes to
        at most ``limit`` bytes: a record the broker refuses would block the work that wanted to publish it.
        Raises ``ValueError`` when even that cannot make it fit."""
        raw = self.to_bytes()
        if len(raw) <= limit:
            return self
        data = json.loads(raw)
        size = len(raw)
        for _ in range(200):
            if size <= limit:
                return type(self).model_validate(data)
            found = _largest(data, self._unbounded)
            if found is None:
                break
            parent, key, value, _ = found
            excess = size - limit
            if isinstance(value, str):
                # just enough when that leaves a readable head, else a head of at most 1,000 characters
                enough = len(value) - excess - 200
                parent[key] = truncate_text(value, enough if enough >= 1000 else min(1000, len(value) // 2))
            else:
                keep = len(value) // 2
                cut = value[:keep]
                if all(isinstance(v, str) for v in value):
                    cut.append(f"… [{len(value) - keep} more truncated by nbreduce]")
                parent[key] = cut
            size = len(json.dumps(data, ensure_ascii=False, separators=(",", ":")).encode())
        raise ValueError(f"{type(self).__name__} of {len(raw)} bytes cannot be bounded to {limit} bytes")

    @classmethod
    def from_bytes(cls, raw: bytes | str):
        return cls.model_validate_json(raw)


def _largest(data: Any, skip: frozenset[str]) -> tuple[Any, Any, Any, int] | None:
    """The longest text (or list) in a JSON tree, as ``(parent, key, value, encoded size)``; None when nothing
    is left worth cutting."""
    best: tuple[Any, Any, Any, int] | None = None

    def visit(parent: Any, key: Any, value: Any, top: bool) -> None:
        nonlocal best
        if isinstance(value, dict):
            for k, v in value.items():
                if not (top and k in skip):
                    visit(value, k, v, False)
        elif isinstance(value, list):
            size = len(json.dumps(value, ensure_ascii=False))
            if len(value) > 1 and (best is None or size > best[3]) and size > 256:
                best = (parent, key, value, size)
            for i, v in enumerate(value):
                visit(value, i, v, False)
        elif isinstance(value, str) and len(value) > 256:
            size = len(json.dumps(value, ensure_ascii=False))
            if best is None or size > best[3]:
                best = (parent, key, value, size)

    visit(None, None, data, True)
    return best


class RunCompletion(WireModel):
    """A finished run (or set of runs) that should be reduced; ``data_ready``-compatible.

    Every field has a length limit: a message is a few hundred bytes, and what it carries ends up in
    status events, file names and the executed notebook.
    """

    kind: Literal["run-completion"] = "run-completion"
    message_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] | None = None
    timestamp: datetime = Field(default_factory=utcnow)
    instrument: InstrumentName
    run_number: RunNumber | Annotated[list[RunNumber], Field(max_length=MAX_RUNS)]
    rb_number: RBNumber | None = None
    data: DataPath | Annotated[list[DataPath], Field(max_length=MAX_RUNS)]
    run_title: Annotated[str, StringConstraints(max_length=1000)] = ""
    facility: Annotated[str, StringConstraints(max_length=64)] = "ISIS"
    #: ISIS convention: 0 = run detection, -1 = manual; a user name for manual submissions.
    started_by: int | Annotated[str, StringConstraints(max_length=128)] = 0
    #: Parameter overrides for the template (legacy ``standard_vars``/``advanced_vars`` are flattened).
    reduction_arguments: Annotated[dict[str, Any], AfterValidator(_sane_arguments)] = Field(default_factory=dict)
    #: Which template of the instrument runs (multi-run jobs name theirs, e.g. ``sum``); default ``reduce``.
    template: TemplateName | None = None

    @model_validator(mode="before")
    @classmethod
    def _nulls_mean_defaults(cls, data: Any) -> Any:
        """The legacy writer sends every field, null when unset: null means "the default" here."""
        if not isinstance(data, dict):
            return data
        fields = cls.model_fields
        return {k: v for k, v in data.items()
                if v is not None or k not in fields or fields[k].is_required() or fields[k].default is None}

    @field_validator("rb_number", mode="before")
    @classmethod
    def _rb_as_text(cls, value: Any) -> Any:
        return str(value) if isinstance(value, int) and not isinstance(value, bool) else value

    @field_validator("run_number")
    @classmethod
    def _runs_not_empty(cls, value: int | list[int]) -> int | list[int]:
        if isinstance(value, list) and not value:
            raise ValueError("run_number list is empty")
        return value

    @field_validator("data")
    @classmethod
    def _data_not_empty(cls, value: str | list[str]) -> str | list[str]:
        paths = [value] if isinstance(value, str) else value
        if not paths or any(not p.strip() for p in paths):
            raise ValueError("data must name at least one file")
        return value

    @field_validator("reduction_arguments", mode="before")
    @classmethod
    def _flatten_legacy_arguments(cls, value: Any) -> Any:
        """Legacy messages nest overrides as ``{standard_vars: {...}, advanced_vars: {...}, variable_help}``."""
        if isinstance(value, dict) and ({"standard_vars", "advanced_vars"} & value.keys()):
            flat: dict[str, Any] = {}
            flat.update(value.get("standard_vars") or {})
            flat.update(value.get("advanced_vars") or {})
            return flat
        return value if value is not None else {}

    @property
    def runs(self) -> list[int]:
        return list(self.run_number) if isinstance(self.run_number, list) else [self.run_number]

    @property
    def data_files(self) -> list[str]:
        return list(self.data) if isinstance(self.data, list) else [self.data]


class ReductionRequest(RunCompletion):
    """A manual submission or a rerun (``nbreduce submit``, the portal's rerun form)."""

    kind: Literal["reduction-request"] = "reduction-request"  # type: ignore[assignment]
    message_id: Annotated[str, StringConstraints(min_length=1, max_length=128)] = Field(  # type: ignore[assignment]
        default_factory=new_id)
    started_by: int | Annotated[str, StringConstraints(max_length=128)] = -1
    requested_by: Annotated[str, StringConstraints(max_length=128)] = "unknown"
    #: Job id this request reruns, so the portal can show the version history.
    rerun_of: Annotated[str, StringConstraints(max_length=64)] | None = None
    #: Ask for a specific environment build (content hash) instead of the current one.
    environment_hash: Annotated[str, StringConstraints(max_length=80)] | None = None


class JobState(StrEnum):
    QUEUED = "queued"
    #: The run's data file is not ready yet (or the archive cannot be written): parked, retried on a timer.
    WAITING = "waiting"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    REJECTED = "rejected"

    @property
    def final(self) -> bool:
        return self not in (JobState.QUEUED, JobState.WAITING, JobState.RUNNING)


class ErrorInfo(BaseModel):
    """The exception that stopped a notebook, as papermill recorded it."""

    ename: str
    evalue: str = ""
    cell_index: int | None = None
    cell_source: str | None = None
    traceback: str | None = None


class TriggerRef(BaseModel):
    """Where the job's request came from, so it can be found and replayed."""

    topic: str
    partition: int
    offset: int
    message_id: str | None = None
    #: SHA-256 of the request (its content without the send time; the raw bytes when it is not valid): a
    #: message reusing a job's id is a redelivery only when this matches.
    digest: str | None = None


class StatusEvent(WireModel):
    """State of one job, keyed by ``job_id`` on the status topic; the last event per key wins."""

    kind: Literal["status"] = "status"
    job_id: str
    state: JobState
    timestamp: datetime = Field(default_factory=utcnow)
    instrument: str | None = None
    run_number: int | list[int] | None = None
    rb_number: str | None = None
    run_title: str | None = None
    template: str | None = None
    version: int | None = None
    requested_by: str | None = None
    rerun_of: str | None = None
    trigger: TriggerRef | None = None
    data: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=dict)
    queued_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    #: Paths relative to the archive root.
    notebook: str | None = None
    output_files: list[str] = Field(default_factory=list)
    scraps: dict[str, Any] = Field(default_factory=dict)
    #: Why the result is suspect: the template's ``nbreduce_warnings`` scrap and the Python warnings its own
    #: cells raised (docs/templates.md). A succeeded job with warnings is shown "succeeded with warnings".
    warnings: list[str] = Field(default_factory=list)
    reason: str | None = None
    error: ErrorInfo | None = None
    kernel: str | None = None
    environment: str | None = None
    environment_hash: str | None = None
    template_hash: str | None = None
    runner: str | None = None
    #: Where the platform's time went, in milliseconds (queue, admit, kernel, execute, cells, scraps, notebook,
    #: archive, ...): ``make bench`` reports the overhead from these.
    timings: dict[str, float] = Field(default_factory=dict)

    @property
    def runs(self) -> list[int]:
        if self.run_number is None:
            return []
        return list(self.run_number) if isinstance(self.run_number, list) else [self.run_number]

    @property
    def outcome(self) -> str:
        """The state as users read it: ``succeeded with warnings`` for a suspect success, else the state."""
        if self.state is JobState.SUCCEEDED and self.warnings:
            return "succeeded with warnings"
        return self.state.value


class LogLine(BaseModel):
    """One line a running notebook printed."""

    stream: Literal["stdout", "stderr"] = "stdout"
    text: str


class ProgressEvent(WireModel):
    """Where a running reduction is, keyed by ``job_id`` on the progress topic (at most about one a second).

    ``lines`` are the log lines printed since the previous event of the job; ``log_offset`` is the number of
    lines before them, so a reader appends and notices a gap (lines dropped when a cell prints faster than
    they are sent). The last event of a job has ``done`` set.
    """

    kind: Literal["progress"] = "progress"
    job_id: str
    timestamp: datetime = Field(default_factory=utcnow)
    instrument: str | None = None
    rb_number: str | None = None
    started_at: datetime | None = None
    elapsed_seconds: float = 0.0
    #: 1-based number of the code cell running (or last run), of ``cells`` code cells.
    cell: int = 0
    cells: int = 0
    #: The running cell's heading (the markdown heading above it) or its first line.
    cell_label: str = ""
    log_offset: int = 0
    lines: list[LogLine] = Field(default_factory=list)
    done: bool = False

    @property
    def fraction(self) -> float:
        """Share of the code cells finished or running (0..1)."""
        if self.done:
            return 1.0
        return min(1.0, max(0.0, (self.cell - 0.5) / self.cells)) if self.cells else 0.0


class DeadLetter(WireModel):
    """A message nbreduce could not accept, kept byte for byte with the reason, for inspection and replay."""

    kind: Literal["dead-letter"] = "dead-letter"
    dead_letter_id: str = Field(default_factory=new_id)
    timestamp: datetime = Field(default_factory=utcnow)
    reason: str
    source_topic: str
    partition: int | None = None
    offset: int | None = None
    key_b64: str | None = None
    #: The original bytes (base64), or their first :data:`MAX_ORIGINAL_BYTES` when ``value_truncated``.
    value_b64: str
    #: Size and SHA-256 of the whole original: a truncated letter refers to the record at ``source_topic``
    #: ``partition`` ``offset`` (``nbreduce replay`` fetches it from there and checks it).
    value_size: int | None = None
    value_sha256: str | None = None
    value_truncated: bool = False
    job_id: str | None = None
    reporter: str | None = None

    _unbounded: ClassVar[frozenset[str]] = frozenset({"value_b64", "key_b64", "value_sha256"})

    @classmethod
    def wrap(cls, reason: str, topic: str, value: bytes | None, key: bytes | None = None, **kw: Any):
        """A letter for ``value``; originals over :data:`MAX_ORIGINAL_BYTES` are kept by reference and truncated,
        keys over 1 KiB truncated: a letter must never be a record the broker refuses."""
        value = value or b""
        return cls(
            reason=truncate_text(reason, 4000),
            source_topic=topic,
            value_b64=base64.b64encode(value[:MAX_ORIGINAL_BYTES]).decode(),
            value_size=len(value),
            value_sha256=hashlib.sha256(value).hexdigest(),
            value_truncated=len(value) > MAX_ORIGINAL_BYTES,
            key_b64=base64.b64encode(key[:1024]).decode() if key is not None else None,
            **kw,
        )

    @property
    def value(self) -> bytes:
        return base64.b64decode(self.value_b64)

    @property
    def key(self) -> bytes | None:
        return base64.b64decode(self.key_b64) if self.key_b64 is not None else None

