"""Multi-run jobs: fire a template once every run of a declared set or range has completed (sum, stitch).

Declarations come from ``instrument.toml`` (``[[multi_run]]``) or at run time from
``nbreduce multirun declare`` (a :class:`MultiRunDeclaration` on the trigger-state topic). The trigger
keeps no state of its own: at start it replays the run-completion topic (completions within its
retention) and the trigger-state topic (declarations and "fired" markers), then follows both. So a
declaration made after some of its runs completed still sees them, and a restart never fires twice.
Run it as a single instance.
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, ClassVar, Literal

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, Message, TopicPartition
from pydantic import Field, ValidationError

from runner.bus.clients import client_config
from runner.bus.models import InstrumentName, RBNumber, RunCompletion, WireModel, utcnow
from runner.bus.topics import RUN_COMPLETIONS, TRIGGER_STATE
from runner.config import Settings
from runner.templates.registry import MultiRunSpec, TemplateError, TemplateRegistry
from runner.triggers.base import Trigger, stable_id

log = logging.getLogger(__name__)

DECLARATION_PREFIX = "multirun:"
FIRED_PREFIX = "multirun-fired:"


class MultiRunDeclaration(WireModel):
    """A multi-run job declared at run time (key ``multirun:<INSTRUMENT>:<name>``)."""

    kind: Literal["multirun-declaration"] = "multirun-declaration"
    instrument: InstrumentName
    spec: MultiRunSpec
    #: Only completions of this experiment count (a run number alone is ambiguous across cycles).
    rb_number: RBNumber | None = None
    declared_by: str = "unknown"
    timestamp: datetime = Field(default_factory=utcnow)

    @property
    def key(self) -> str:
        return f"{DECLARATION_PREFIX}{self.instrument}:{self.spec.name}"


class MultiRunFired(WireModel):
    """Marker that a multi-run job was published (key ``multirun-fired:<message id>``)."""

    kind: Literal["multirun-fired"] = "multirun-fired"
    instrument: str
    name: str
    runs: list[int]
    message_id: str
    timestamp: datetime = Field(default_factory=utcnow)


def declare(settings: Settings, declaration: MultiRunDeclaration) -> None:
    from runner.bus.clients import Publisher

    publisher = Publisher(settings)
    try:
        publisher.publish(TRIGGER_STATE, declaration, key=declaration.key)
    finally:
        publisher.close()


class MultiRunTrigger(Trigger):
    """Watches run completions and fires each declared multi-run job once all of its runs are in."""

    kind: ClassVar[str] = "multirun"

    def __init__(self, settings: Settings, *, name: str | None = None, **kwargs: Any):
        super().__init__(settings, name=name, **kwargs)
        self.declarations: dict[str, MultiRunDeclaration] = {}
        #: message ids of multi-run jobs already published
        self.fired: set[str] = set()
        #: (instrument, run) -> latest single-run completion seen
        self.completions: dict[tuple[str, int], RunCompletion] = {}
        self._consumer: Consumer | None = None

    def start(self) -> None:
        registry = TemplateRegistry(self.settings.notebooks)
        for instrument in registry.instruments():
            try:
                config = registry.config(instrument)
            except TemplateError:
                continue
            for spec in config.multi_run:
                declaration = MultiRunDeclaration(instrument=instrument, spec=spec, declared_by=f"{instrument}.toml")
                self.declarations[declaration.key] = declaration
        self._consumer = Consumer({**client_config(self.settings), "group.id": "nbreduce-multirun",
                                   "enable.auto.commit": False})
        partitions = []
        for topic in (RUN_COMPLETIONS, TRIGGER_STATE):
            metadata = self._consumer.list_topics(topic, timeout=30).topics[topic]
            partitions += [TopicPartition(topic, p, OFFSET_BEGINNING) for p in metadata.partitions]
        self._consumer.assign(partitions)

    def poll_once(self, timeout: float = 1.0) -> int:
        assert self._consumer is not None
        messages = self._consumer.consume(1000, timeout)
        touched: set[str] = set()
        for msg in messages:
            if msg.error() is not None:
                if msg.error().code() != KafkaError._PARTITION_EOF:
                    self.record_error(f"consumer: {msg.error()}")
                continue
            touched |= self._apply(msg)
        for instrument in touched:
            self._fire_ready(instrument)
        return len(messages)

    def _apply(self, msg: Message) -> set[str]:
        """Fold one message; returns the instruments whose declarations may have become complete."""
        key = (msg.key() or b"").decode(errors="replace")
        if msg.topic() == TRIGGER_STATE:
            if key.startswith(FIRED_PREFIX):
                self.fired.add(key[len(FIRED_PREFIX):])
            elif key.startswith(DECLARATION_PREFIX) and msg.value() is None:
                self.declarations.pop(key, None)
            elif key.startswith(DECLARATION_PREFIX):
                try:
                    declaration = MultiRunDeclaration.from_bytes(msg.value())
                except ValidationError as exc:
                    self.record_error(f"unreadable multi-run declaration {key}: {exc.errors()[:1]}")
                    return set()
                self.declarations[declaration.key] = declaration
                return {declaration.instrument}
            return set()
        try:
            completion = RunCompletion.from_bytes(msg.value())
        except ValidationError:
            return set()  # the runner dead-letters invalid completions
        if len(completion.runs) != 1 or completion.template:
            return set()  # multi-run jobs (ours included) are not inputs
        self.completions[(completion.instrument, completion.runs[0])] = completion
        self.seen(completion.instrument, completion.runs[0])
        return {completion.instrument}

    def _fire_ready(self, instrument: str) -> None:
        for key, declaration in list(self.declarations.items()):
            ident = key[len(DECLARATION_PREFIX):]
            if declaration.instrument != instrument:
                continue
            try:
                runs = declaration.spec.run_numbers()
            except ValueError as exc:
                self.record_error(str(exc))
                continue
            # the same declaration (same runs) is the same job: a restart or a re-declaration never fires twice
            message_id = stable_id("multirun", ident, *runs)
            if message_id in self.fired:
                continue
            parts = [self.completions.get((instrument, run)) for run in runs]
            if any(p is None for p in parts):
                continue
            members: list[RunCompletion] = [p for p in parts if p is not None]
            rbs = {m.rb_number for m in members}
            if declaration.rb_number is not None:
                rbs = {declaration.rb_number}
                if any(m.rb_number not in (None, declaration.rb_number) for m in members):
                    self.record_error(f"multi-run {ident}: runs belong to other experiments than "
                                      f"RB{declaration.rb_number}; not fired")
                    continue
            rb = rbs.pop() if len(rbs) == 1 else None
            completion = RunCompletion(
                message_id=message_id, instrument=instrument, run_number=runs, rb_number=rb,
                data=[m.data_files[0] for m in members], template=declaration.spec.template,
                run_title=f"{declaration.spec.name}: runs {runs[0]}-{runs[-1]} ({len(runs)})",
                started_by=declaration.declared_by, reduction_arguments=declaration.spec.parameters,
            )
            self.emit(completion)
            self.save_state(f"{FIRED_PREFIX}{message_id}", MultiRunFired(
                instrument=instrument, name=declaration.spec.name, runs=runs, message_id=message_id))
            self.fired.add(message_id)

    def close(self) -> None:
        if self._consumer is not None:
            self._consumer.close()
            self._consumer = None
        super().close()
