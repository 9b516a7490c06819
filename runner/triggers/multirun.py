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

from pydantic import Field

from runner.bus.models import InstrumentName, RBNumber, RunCompletion, WireModel, utcnow
from runner.bus.table import TopicTable
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
        #: Declarations of the instruments' instrument.toml, by ``<INSTRUMENT>:<name>``.
        self.configured: dict[str, MultiRunDeclaration] = {}
        #: Single-run completions by ``<INSTRUMENT>:<run>`` (the latest one per run).
        self.completions = TopicTable(settings, RUN_COMPLETIONS, RunCompletion,
                                      key=lambda c: f"{c.instrument}:{c.runs[0]}",
                                      where=lambda c: len(c.runs) == 1 and not c.template)
        #: Declarations made at run time (``nbreduce multirun declare``); a tombstone withdraws one.
        self.declared = TopicTable(settings, TRIGGER_STATE, MultiRunDeclaration, prefix=DECLARATION_PREFIX)
        #: Markers of the multi-run jobs already published, by message id.
        self.fired = TopicTable(settings, TRIGGER_STATE, MultiRunFired, prefix=FIRED_PREFIX)
        self._tables = (self.completions, self.declared, self.fired)
        self._swept = False

    def start(self) -> None:
        registry = TemplateRegistry(self.settings.notebooks)
        for instrument in registry.instruments():
            try:
                config = registry.config(instrument)
            except TemplateError:
                continue
            for spec in config.multi_run:
                declaration = MultiRunDeclaration(instrument=instrument, spec=spec, declared_by=f"{instrument}.toml")
                self.configured[declaration.key.removeprefix(DECLARATION_PREFIX)] = declaration
        for table in self._tables:
            table.open()

    def declarations(self) -> dict[str, MultiRunDeclaration]:
        return {**self.configured, **dict(self.declared.items())}

    def poll_once(self, timeout: float = 1.0) -> int:
        touched: set[str] = set()
        changed = 0
        for table in self._tables:
            for value in table.poll(timeout / len(self._tables)):
                changed += 1
                if isinstance(value, RunCompletion):
                    self.seen(value.instrument, value.runs[0])
                if isinstance(value, RunCompletion | MultiRunDeclaration):
                    touched.add(value.instrument)
        if not all(table.caught_up.is_set() for table in self._tables):
            return changed  # nothing fires before every marker of an earlier life has been read
        if not self._swept:  # first time caught up: everything may have become complete while we were away
            self._swept = True
            touched = {d.instrument for d in self.declarations().values()}
        for instrument in touched:
            self._fire_ready(instrument)
        return changed

    def _fire_ready(self, instrument: str) -> None:
        for ident, declaration in self.declarations().items():
            if declaration.instrument != instrument:
                continue
            try:
                runs = declaration.spec.run_numbers()
            except ValueError as exc:
                self.record_error(str(exc))
                continue
            # the same declaration (same runs) is the same job: a restart or a re-declaration never fires twice
            message_id = stable_id("multirun", ident, *runs)
            if self.fired.get(message_id) is not None:
                continue
            parts = [self.completions.get(f"{instrument}:{run}") for run in runs]
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
            fired = MultiRunFired(instrument=instrument, name=declaration.spec.name, runs=runs, message_id=message_id)
            self.save_state(f"{FIRED_PREFIX}{message_id}", fired)
            self.fired.put(fired, message_id)

    def close(self) -> None:
        for table in self._tables:
            table.close()
        super().close()
