"""ISIS run control on Kafka: ESS flatbuffers run start (``pl72``) and run stop (``6s4t``) on ``<INST>_runInfo``.

A run is complete when its stop arrives; the stop says little (its ``run_name`` is often the library
default), so it is matched to its start by ``job_id`` and everything else comes from the start. Starts
waiting for their stop are kept in the trigger-state topic, so a restart between start and stop loses
nothing. ``wrdn`` (file writing done) completes a run the same way when it comes first.

The trigger subscribes to every ``<INST>_runInfo`` topic by pattern. A pattern only sees topics that exist
at a metadata refresh, so at start it creates the run-control topic of every instrument with a template
(a run start on a topic created later by the instrument was once seen only minutes after it was sent),
and it refreshes metadata every few seconds for instruments added while it runs.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from confluent_kafka import KafkaException, Message
from confluent_kafka.admin import NewTopic
from pydantic import Field, ValidationError
from streaming_data_types.finished_writing_wrdn import WritingFinished, deserialise_wrdn
from streaming_data_types.run_start_pl72 import RunStartInfo, deserialise_pl72
from streaming_data_types.run_stop_6s4t import RunStopInfo, deserialise_6s4t
from streaming_data_types.utils import get_schema

from runner.bus.clients import Publisher, admin
from runner.bus.models import RunCompletion, TriggerRef, WireModel, utcnow
from runner.config import Settings
from runner.isis.layout import experiment_number, find_data_file, instrument_config, valid_rb
from runner.templates.registry import TemplateRegistry
from runner.triggers.base import ConsumerTrigger, describe, message_time, stable_id

log = logging.getLogger(__name__)

#: Every instrument's run-control topic (librdkafka treats a leading ``^`` as a regex subscription).
RUNINFO_PATTERN = "^[A-Za-z0-9]+_runInfo$"
STATE_PREFIX = "runinfo:"
#: Keys of the start's ``metadata`` JSON that may carry the experiment (RB) number or the title.
RB_KEYS = ("rb_number", "rbnumber", "rb", "experiment_identifier", "experiment_id")
TITLE_KEYS = ("run_title", "title")
#: How often the pattern subscription looks for run-control topics created after the start.
METADATA_REFRESH_MS = 5000


def runinfo_topic(instrument: str) -> str:
    return f"{instrument}_runInfo"


def ensure_runinfo_topics(settings: Settings, topics: Sequence[str]) -> list[str]:
    """Create the run-control topics that do not exist yet (one partition, the broker's own retention: they
    belong to the facility); returns the names created."""
    client = admin(settings)
    existing = set(client.list_topics(timeout=settings.broker.timeout_seconds).topics)
    missing = [name for name in topics if name not in existing]
    if not missing:
        return []
    created = []
    futures = client.create_topics([NewTopic(name, num_partitions=1,
                                             replication_factor=settings.broker.replication_factor)
                                    for name in missing], request_timeout=settings.broker.timeout_seconds)
    for name, future in futures.items():
        try:
            future.result()
            created.append(name)
        except KafkaException as exc:  # created meanwhile by the instrument or another trigger: fine
            if "TOPIC_ALREADY_EXISTS" not in str(exc):
                raise
    return created


class RunStartState(WireModel):
    """A run start seen on a runInfo topic (key ``runinfo:<job_id>``); the last state per key wins."""

    kind: Literal["runinfo-start"] = "runinfo-start"
    job_id: str
    #: pending = waiting for its stop; matched = completion published; rejected = start dead-lettered.
    status: Literal["pending", "matched", "rejected"] = "pending"
    instrument: str
    run_number: int | None = None
    filename: str = ""
    rb_number: str | None = None
    run_title: str = ""
    start_time_ms: int = 0
    source: TriggerRef
    reason: str | None = None
    updated: datetime = Field(default_factory=utcnow)


def _metadata(raw: str, job_id: str) -> dict[str, Any]:
    if not raw.strip():
        return {}
    try:
        value = json.loads(raw)
    except ValueError:
        log.warning("run start %s: metadata is not JSON, ignored", job_id)
        return {}
    return {str(k).lower(): v for k, v in value.items()} if isinstance(value, dict) else {}


def _first(meta: dict[str, Any], keys: Sequence[str]) -> Any:
    return next((meta[k] for k in keys if meta.get(k) not in (None, "")), None)


def _run_number(start: RunStartInfo) -> int | None:
    """ISIS puts the run number in ``run_name``; the digits ending the file name are the fallback."""
    if start.run_name.strip().isdigit():
        return int(start.run_name)
    digits = re.search(r"(\d+)$", Path(start.filename).stem)
    return int(digits.group(1)) if digits else None


def _millis(value: int) -> datetime:
    return datetime.fromtimestamp(value / 1000, UTC)


class RunInfoTrigger(ConsumerTrigger):
    """Run start/stop on ``<INST>_runInfo`` topics -> :class:`RunCompletion` when the run stops."""

    kind = "runinfo"

    def __init__(self, settings: Settings, *, topics: Sequence[str] | None = None, group: str | None = None,
                 name: str | None = None, publisher: Publisher | None = None):
        # new instruments' topics are picked up by the pattern at the next metadata refresh
        super().__init__(settings, topics=topics or settings.triggers.runinfo_topics or [RUNINFO_PATTERN], group=group,
                         name=name, publisher=publisher,
                         **{"topic.metadata.refresh.interval.ms": METADATA_REFRESH_MS})
        self.starts: dict[str, RunStartState] = {}

    def known_topics(self) -> list[str]:
        """The run-control topics to exist before subscribing: the configured ones, else every instrument's."""
        named = [t for t in self.topics if not t.startswith("^")]
        if named:
            return named
        return [runinfo_topic(i) for i in TemplateRegistry(self.settings.notebooks).instruments()
                if re.match(RUNINFO_PATTERN, runinfo_topic(i))]

    def start(self) -> None:
        created = ensure_runinfo_topics(self.settings, self.known_topics())
        if created:
            log.info("%s: created run-control topics %s", self.name, ", ".join(created))
        self.starts = self.load_state(STATE_PREFIX, RunStartState)
        log.info("%s: %d run starts waiting for their stop",
                 self.name, sum(s.status == "pending" for s in self.starts.values()))
        super().start()

    def handle(self, msg: Message) -> None:
        value = msg.value() or b""
        try:
            schema = get_schema(value)
        except Exception as exc:
            self.dead_letter_message(msg, f"not a flatbuffers message: {describe(exc)}")
            return
        handlers = {"pl72": (deserialise_pl72, self._on_start), "6s4t": (deserialise_6s4t, self._on_stop),
                    "wrdn": (deserialise_wrdn, self._on_written)}
        if schema not in handlers:
            self.dead_letter_message(msg, f"unsupported flatbuffers schema {schema!r} (expected pl72, 6s4t or wrdn)")
            return
        decode, on_message = handlers[schema]
        try:
            decoded = decode(value)
        except Exception as exc:
            self.dead_letter_message(msg, f"malformed {schema} message: {describe(exc)}")
            return
        on_message(msg, decoded)

    # -- run start ------------------------------------------------------------------------------
    def _on_start(self, msg: Message, start: RunStartInfo) -> None:
        job_id = start.job_id.strip()
        if not job_id:
            self.dead_letter_message(msg, "run start without job_id: its stop could never be matched")
            return
        known = self.starts.get(job_id)
        if known is not None and known.status != "pending":
            log.info("%s: run start %s seen again (already %s), ignored", self.name, job_id, known.status)
            return
        instrument = (start.instrument_name or msg.topic().removesuffix("_runInfo")).strip().upper()
        meta = _metadata(start.metadata, job_id)
        run = _run_number(start)
        filename = start.filename.strip()
        if not filename and run is not None:
            filename = instrument_config(self.settings, instrument).data_file_name(run)
        state = RunStartState(
            job_id=job_id, instrument=instrument, run_number=run, filename=filename,
            rb_number=valid_rb(_first(meta, RB_KEYS), f"run start {job_id} metadata"),
            run_title=str(_first(meta, TITLE_KEYS) or ""), start_time_ms=start.start_time,
            source=TriggerRef(topic=msg.topic(), partition=msg.partition(), offset=msg.offset()),
        )
        reason = self._invalid(state, start)
        if reason:
            self.dead_letter_message(msg, f"run start {job_id} rejected: {reason}")
            state.status, state.reason = "rejected", reason
        self._save(state)

    def _invalid(self, state: RunStartState, start: RunStartInfo) -> str | None:
        """Why no completion could ever be built from this start (checked now, not when the stop comes)."""
        if state.run_number is None:
            return f"no run number in run_name {start.run_name!r} or filename {start.filename!r}"
        try:
            self._completion(state, state.filename or "unknown", utcnow(), state.rb_number)
        except ValidationError as exc:
            return describe(exc)
        return None

    # -- run stop / file written ------------------------------------------------------------------
    def _on_stop(self, msg: Message, stop: RunStopInfo) -> None:
        state = self._waiting(msg, stop.job_id, "run stop")
        if state is not None:
            # stop_time 0 means "now": the time the stop was sent, the same on every redelivery
            when = _millis(stop.stop_time) if stop.stop_time > 0 else message_time(msg) or utcnow()
            self._complete(state, when)

    def _on_written(self, msg: Message, written: WritingFinished) -> None:
        state = self._waiting(msg, written.job_id, "file-writing-done")
        if state is None:
            return
        if written.error_encountered:
            # the run may still be stopped normally; the runner decides then whether the file is usable
            self.dead_letter_message(msg, f"file writer reported an error for job {written.job_id}: {written.message}")
            return
        self._complete(state, message_time(msg) or utcnow(), written.file_name or None)

    def _waiting(self, msg: Message, job_id: str, what: str) -> RunStartState | None:
        """The pending start of ``job_id``; dead-letters ``msg`` when there is none."""
        state = self.starts.get(job_id)
        if state is None:  # the start may have been handled by another group member before a rebalance
            self.starts.update(self.load_state(STATE_PREFIX, RunStartState))
            state = self.starts.get(job_id)
        if state is None:
            self.dead_letter_message(msg, f"{what} for job_id {job_id!r} matches no run start")
            return None
        if state.status != "pending":
            log.info("%s: %s for job %s ignored: start already %s", self.name, what, job_id, state.status)
            return None
        return state

    def _complete(self, state: RunStartState, when: datetime, file_name: str | None = None) -> None:
        path = find_data_file(self.settings.data_roots, state.instrument, file_name or state.filename)
        rb = state.rb_number or experiment_number(path)
        self.emit(self._completion(state, str(path), when, rb))
        # published first: a crash in between re-emits the same message id, never loses the run
        self._save(state.model_copy(update={"status": "matched", "updated": utcnow()}))

    @staticmethod
    def _completion(state: RunStartState, data: str, when: datetime, rb: str | None) -> RunCompletion:
        return RunCompletion(
            message_id=stable_id("runinfo", state.job_id), timestamp=when, instrument=state.instrument,
            run_number=state.run_number, rb_number=rb, data=data, run_title=state.run_title, started_by=0,
        )

    def _save(self, state: RunStartState) -> None:
        self.save_state(STATE_PREFIX + state.job_id, state)
        self.starts[state.job_id] = state
