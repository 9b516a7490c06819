"""``nbreduce watch``: poll each instrument's ``lastrun.txt`` and publish every run that finished since.

Network shares deliver no file events, so the file is polled. Every run between the last one seen and
the current one is published, so downtime of the watcher delays runs but never loses them. The last run
seen per instrument lives in the trigger-state topic (no local database: any host can take over), and a
heartbeat per cycle makes a stalled watcher visible.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Literal

from pydantic import Field, TypeAdapter

from runner.bus.clients import Publisher
from runner.bus.models import InstrumentName, RunCompletion, WireModel, utcnow
from runner.config import Settings
from runner.isis.layout import (
    LastRunError,
    experiment_number,
    find_data_file,
    instrument_config,
    lastrun_file,
    read_lastrun,
)
from runner.templates.registry import TemplateRegistry
from runner.triggers.base import TRANSIENT_ERRORS, Trigger, describe, stable_id, stop_on_signals

log = logging.getLogger(__name__)

STATE_PREFIX = "lastrun:"
_INSTRUMENT = TypeAdapter(InstrumentName)


class LastRunState(WireModel):
    """Last run published for one instrument (key ``lastrun:<INST>``)."""

    kind: Literal["lastrun-state"] = "lastrun-state"
    instrument: str
    last_run: int
    updated: datetime = Field(default_factory=utcnow)


class LastRunWatcher(Trigger):
    """Publishes a :class:`RunCompletion` for every new run in each instrument's ``lastrun.txt``."""

    kind = "lastrun"
    heartbeat_interval = 0.0  # one heartbeat per poll cycle

    def __init__(self, settings: Settings, *, instruments: Iterable[str] | None = None, interval: float | None = None,
                 start_from: Mapping[str, int] | None = None, max_backfill: int | None = None,
                 read_retries: int = 5, retry_delay: float = 0.2, name: str | None = None,
                 publisher: Publisher | None = None):
        """``instruments`` None = every instrument with a template (re-read each cycle).

        ``start_from`` gives the first run to publish for an instrument without saved state; otherwise
        a first start begins at the current run (history is not flooded). ``max_backfill`` stops a
        corrupt ``lastrun.txt`` from publishing millions of runs: larger gaps are reported, not published.
        """
        super().__init__(settings, name=name, publisher=publisher)
        self.instruments = [_INSTRUMENT.validate_python(i.upper()) for i in instruments] if instruments else None
        self.interval = interval if interval is not None else settings.triggers.lastrun_interval_seconds
        self.start_from = {_INSTRUMENT.validate_python(k.upper()): v for k, v in (start_from or {}).items()}
        self.max_backfill = max_backfill if max_backfill is not None else settings.triggers.max_backfill
        self.read_retries = read_retries
        self.retry_delay = retry_delay
        self.last_seen: dict[str, int] = {}

    def start(self) -> None:
        saved = self.load_state(STATE_PREFIX, LastRunState)
        self.last_seen = {inst: state.last_run for inst, state in saved.items()}

    def watched(self) -> list[str]:
        if self.instruments is not None:
            return self.instruments
        names = []
        for name in TemplateRegistry(self.settings.notebooks).instruments():
            try:
                names.append(_INSTRUMENT.validate_python(name))
            except ValueError:
                log.warning("%s: template folder %r is not an instrument name, not watched", self.name, name)
        return names

    def poll_once(self, timeout: float = 0.0) -> int:
        published = 0
        instruments = self.watched()
        if not instruments:  # a watcher watching nothing must not look healthy
            self.record_error(f"no instruments to watch: none given and no templates in {self.settings.notebooks}")
        for instrument in instruments:
            try:
                published += self.poll_instrument(instrument)
            except TRANSIENT_ERRORS:
                raise
            except Exception as exc:  # one instrument's problem must not stop the others
                log.exception("%s: %s failed", self.name, instrument)
                self.record_error(f"{instrument}: {describe(exc)}")
        return published

    def poll_instrument(self, instrument: str) -> int:
        """Publish the runs of ``instrument`` not published yet; returns how many."""
        try:
            current = read_lastrun(lastrun_file(self.settings.data_roots, instrument), self.read_retries,
                                   self.retry_delay)
        except LastRunError as exc:
            self.record_error(f"{instrument}: {exc}")
            return 0
        self.seen(instrument, current)
        last = self.last_seen.get(instrument)
        if last is None:
            if instrument not in self.start_from:
                log.info("%s: %s first seen at run %d, publishing runs after it", self.name, instrument, current)
                self._save(instrument, current)
                return 0
            last = self.start_from[instrument] - 1
        if current <= last:
            if current < last and instrument in self.last_seen:
                self.record_error(f"{instrument}: lastrun.txt says run {current}, before run {last} already "
                                  "published; waiting for a newer run")
            return 0
        if self.max_backfill is not None and current - last > self.max_backfill:
            self.record_error(f"{instrument}: {current - last} runs since run {last} exceed max_backfill="
                              f"{self.max_backfill}; none published: check lastrun.txt or raise the limit")
            return 0
        for run in range(last + 1, current + 1):
            self.emit(self.completion(instrument, run))
            self._save(instrument, run)  # after the publish: a crash in between re-emits the same id
        return current - last

    def completion(self, instrument: str, run: int) -> RunCompletion:
        path = find_data_file(self.settings.data_roots, instrument,
                              instrument_config(self.settings, instrument).data_file_name(run))
        return RunCompletion(message_id=stable_id("lastrun", instrument, run), instrument=instrument,
                             run_number=run, rb_number=experiment_number(path), data=str(path), started_by=0)

    def _save(self, instrument: str, run: int) -> None:
        self.save_state(STATE_PREFIX + instrument, LastRunState(instrument=instrument, last_run=run))
        self.last_seen[instrument] = run


def watch(settings: Settings, instruments: list[str] | None = None, interval: float | None = None,
          stop: threading.Event | None = None, *, start_from: Mapping[str, int] | None = None,
          max_backfill: int | None = None) -> None:
    """``nbreduce watch``: run the lastrun.txt watcher until ``stop`` is set (or SIGINT/SIGTERM)."""
    watcher = LastRunWatcher(settings, instruments=instruments, interval=interval, start_from=start_from,
                             max_backfill=max_backfill)
    with stop_on_signals(stop) as event:
        watcher.run(event)
