"""Pydantic models of every message nbreduce puts on the wire (JSON, with a schema version).

Field names of :class:`RunCompletion` follow the ISIS autoreduction ``data_ready`` message so the
existing producer can switch to nbreduce unchanged; its extra legacy fields are accepted and ignored.
Identifiers that become path components (instrument, run number, RB) are validated strictly here,
so nothing downstream can be tricked into writing outside the archive.
"""

from __future__ import annotations

import base64
import uuid
from datetime import UTC, datetime
from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StringConstraints, field_validator, model_validator

SCHEMA_VERSION = 1

#: Instrument names become folder names: upper-case letters, digits, underscore only.
InstrumentName = Annotated[
    str,
    BeforeValidator(lambda v: v.strip().upper() if isinstance(v, str) else v),  # "mari" is MARI
    StringConstraints(pattern=r"^[A-Z][A-Z0-9_]{0,31}$"),
]
#: Experiment (RB) numbers: digits only (ISIS uses 7; calibration placeholders are reported by the runner).
RBNumber = Annotated[str, StringConstraints(strip_whitespace=True, pattern=r"^[0-9]{1,12}$")]
RunNumber = Annotated[int, Field(gt=0, lt=10**12)]
#: A template of an instrument folder: ``notebooks/<INSTRUMENT>/<name>.ipynb`` (default ``reduce``).
TemplateName = Annotated[str, StringConstraints(pattern=r"^[a-z][a-z0-9_-]{0,63}$")]


def utcnow() -> datetime:
    return datetime.now(UTC)


def new_id() -> str:
    return uuid.uuid4().hex


class WireModel(BaseModel):
    """Base of all wire messages: JSON in, JSON out, tolerant of fields added by newer writers."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)

    schema_version: int = SCHEMA_VERSION

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=True).encode()

    @classmethod
    def from_bytes(cls, raw: bytes | str):
        return cls.model_validate_json(raw)


class RunCompletion(WireModel):
    """A finished run (or set of runs) that should be reduced; ``data_ready``-compatible."""

    kind: Literal["run-completion"] = "run-completion"
    message_id: str | None = None
    timestamp: datetime = Field(default_factory=utcnow)
    instrument: InstrumentName
    run_number: RunNumber | list[RunNumber]
    rb_number: RBNumber | None = None
    data: str | list[str]
    run_title: str = ""
    facility: str = "ISIS"
    #: ISIS convention: 0 = run detection, -1 = manual; a user name for manual submissions.
    started_by: int | str = 0
    #: Parameter overrides for the template (legacy ``standard_vars``/``advanced_vars`` are flattened).
    reduction_arguments: dict[str, Any] = Field(default_factory=dict)
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
    message_id: str = Field(default_factory=new_id)
    started_by: int | str = -1
    requested_by: str = "unknown"
    #: Job id this request reruns, so the portal can show the version history.
    rerun_of: str | None = None
    #: Ask for a specific environment build (content hash) instead of the current one.
    environment_hash: str | None = None


class JobState(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    SKIPPED = "skipped"
    REJECTED = "rejected"

    @property
    def final(self) -> bool:
        return self not in (JobState.QUEUED, JobState.RUNNING)


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
    value_b64: str
    job_id: str | None = None
    reporter: str | None = None

    @classmethod
    def wrap(cls, reason: str, topic: str, value: bytes | None, key: bytes | None = None, **kw: Any):
        return cls(
            reason=reason,
            source_topic=topic,
            value_b64=base64.b64encode(value or b"").decode(),
            key_b64=base64.b64encode(key).decode() if key is not None else None,
            **kw,
        )

    @property
    def value(self) -> bytes:
        return base64.b64decode(self.value_b64)

    @property
    def key(self) -> bytes | None:
        return base64.b64decode(self.key_b64) if self.key_b64 is not None else None

