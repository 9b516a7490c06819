"""The portal's run list: jobs grouped into runs, filtered and paginated in memory.

A *run* is (instrument, RB, run label); each job of it is one version. The index is fed every status
event the portal's follower folds, keeps runs in a fixed order (newest first, by when the run was
first seen, so state changes never reorder pages) and answers a page with one pass of cheap
predicates over precomputed fields — 100,000 runs stay well inside the page-time budget
(bench/bench_portal.py).
"""

from __future__ import annotations

import bisect
import heapq
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

from pydantic import BaseModel, Field

from runner.archive.layout import run_label
from runner.bus.models import JobState, StatusEvent
from runner.hub.access import Access

RunKey = tuple[str, str, str]  # instrument, RB, run label


class RunFilter(BaseModel):
    """Query of the run list; every field optional."""

    instrument: str | None = None
    rb: str | None = None
    state: JobState | None = None
    run_from: int | None = Field(None, ge=0)
    run_to: int | None = Field(None, ge=0)
    q: str | None = Field(None, max_length=200)
    page: int = Field(1, ge=1)
    per_page: int = Field(50, ge=1, le=500)


class Run:
    """One run: its versions (jobs) and the fields the list filters on."""

    __slots__ = ("created", "first", "instrument", "jobs", "key", "label", "last", "latest", "rb", "text")

    def __init__(self, key: RunKey, event: StatusEvent):
        self.key = key
        self.instrument, self.rb, self.label = key
        runs = event.runs
        self.first = min(runs) if runs else 0
        self.last = max(runs) if runs else 0
        self.jobs: dict[str, StatusEvent] = {}
        self.created = _when(event)
        self.latest = event
        self.text = ""

    def add(self, event: StatusEvent) -> None:
        self.jobs[event.job_id] = event
        self.latest = shown_job(self.jobs.values())
        self.created = min(self.created, _when(event))
        self.text = " ".join({(e.run_title or "") + " " + (e.requested_by or "") for e in self.jobs.values()}).lower()

    def versions(self) -> list[StatusEvent]:
        """Jobs that have a version folder, oldest first."""
        return sorted((e for e in self.jobs.values() if e.version is not None), key=_order_in_run)

    def requests(self) -> list[StatusEvent]:
        """Jobs without a version: waiting to run, or refused before they ran (rejected, skipped, failed)."""
        return sorted((e for e in self.jobs.values() if e.version is None), key=_when)

    @property
    def active(self) -> StatusEvent | None:
        """The newest job still queued or running, when it is not the one shown."""
        live = [e for e in self.jobs.values() if not e.state.final and e is not self.latest]
        return max(live, key=_when) if live else None

    @property
    def title(self) -> str:
        return self.latest.run_title or next((e.run_title for e in self.jobs.values() if e.run_title), "")

    @property
    def state(self) -> JobState:
        return self.latest.state


def _when(event: StatusEvent) -> float:
    return (event.queued_at or event.timestamp).timestamp()


def _order_in_run(event: StatusEvent) -> tuple[int, float]:
    return (event.version if event.version is not None else 1 << 40, _when(event))


def shown_job(jobs: Iterable[StatusEvent]) -> StatusEvent:
    """The job a run is shown as: its latest succeeded version; else its latest version (running, failed...);
    else its latest request. A rejected or still-queued rerun never hides a result."""
    jobs = list(jobs)
    succeeded = [e for e in jobs if e.version is not None and e.state is JobState.SUCCEEDED]
    versioned = [e for e in jobs if e.version is not None]
    return max(succeeded or versioned or jobs, key=_order_in_run)


def run_key(event: StatusEvent) -> RunKey:
    runs = event.runs
    return (event.instrument or "", event.rb_number or "", run_label(runs) if runs else f"job-{event.job_id[:12]}")


@dataclass
class Page:
    runs: list[Run]
    total: int
    page: int
    per_page: int
    pages: int = field(init=False)

    def __post_init__(self) -> None:
        self.pages = max(1, -(-self.total // self.per_page))


Entry = tuple[float, RunKey, Run]  # (-created, key, run): ascending = newest first


class RunIndex:
    """Runs by key, jobs by id, and the list order; mutated from one thread (the portal's IOLoop).

    The order is kept three times — all runs, per instrument, per RB — so a query starts from the
    smallest list that can hold its answer, and an unfiltered page is a slice.
    """

    def __init__(self) -> None:
        self.runs: dict[RunKey, Run] = {}
        self.jobs: dict[str, StatusEvent] = {}
        self._job_run: dict[str, RunKey] = {}
        self._order: list[Entry] = []
        self._by_instrument: dict[str, list[Entry]] = {}
        self._by_rb: dict[str, list[Entry]] = {}
        self.updated: datetime | None = None

    def __len__(self) -> int:
        return len(self.runs)

    def _lists(self, key: RunKey) -> tuple[list[Entry], ...]:
        return (self._order, self._by_instrument.setdefault(key[0], []), self._by_rb.setdefault(key[1], []))

    def _insert(self, run: Run) -> None:
        for entries in self._lists(run.key):
            bisect.insort(entries, (-run.created, run.key, run))

    def _remove(self, run: Run, created: float) -> None:
        for entries in self._lists(run.key):
            entries.remove((-created, run.key, run))

    def apply(self, event: StatusEvent) -> Run:
        """Add or replace a job (the caller folds: ``event`` is the job's newest state)."""
        key = run_key(event)
        previous = self._job_run.get(event.job_id)
        if previous is not None and previous != key:  # identity fields filled in later (e.g. RB from NeXus)
            self._remove_job(event.job_id, previous)
        run = self.runs.get(key)
        if run is None:
            run = self.runs[key] = Run(key, event)
            self._insert(run)
        before = run.created
        run.add(event)
        if run.created != before:
            self._remove(run, before)
            self._insert(run)
        self.jobs[event.job_id] = event
        self._job_run[event.job_id] = key
        self.updated = event.timestamp
        return run

    def _remove_job(self, job_id: str, key: RunKey) -> None:
        run = self.runs[key]
        run.jobs.pop(job_id, None)
        if not run.jobs:
            self._remove(run, run.created)
            del self.runs[key]
        else:
            run.latest = shown_job(run.jobs.values())

    def run_of(self, job_id: str) -> Run | None:
        key = self._job_run.get(job_id)
        return self.runs.get(key) if key is not None else None

    def _candidates(self, access: Access, instrument: str | None, rb: str | None) -> tuple[list[Entry], bool]:
        """The smallest ordered list holding every possible match, and whether access must still be checked."""
        if rb is not None:
            return self._by_rb.get(rb, []), not access.admin
        if instrument is not None:
            return self._by_instrument.get(instrument, []), not access.admin
        if access.admin:
            return self._order, False
        lists = [self._by_rb.get(r, []) for r in access.rbs] + \
                [self._by_instrument.get(i, []) for i in access.instruments]
        merged = list(heapq.merge(*lists))
        if access.rbs and access.instruments:  # an RB on the user's own instrument is in two lists
            merged = [entry for i, entry in enumerate(merged) if i == 0 or entry[1] != merged[i - 1][1]]
        return merged, False

    def query(self, access: Access, flt: RunFilter) -> Page:
        """One page of the runs ``access`` may see that match ``flt``, newest first."""
        instrument = flt.instrument.upper() if flt.instrument else None
        rb, state = flt.rb or None, flt.state
        candidates, check_access = self._candidates(access, instrument, rb)
        start = (flt.page - 1) * flt.per_page
        wanted = (instrument is not None and rb is not None) or check_access or state is not None \
            or flt.run_from is not None or flt.run_to is not None or bool(flt.q and flt.q.strip())
        if not wanted:  # nothing left to test: the page is a slice
            return Page([e[2] for e in candidates[start:start + flt.per_page]], len(candidates), flt.page,
                        flt.per_page)
        lo = flt.run_from if flt.run_from is not None else -1
        hi = flt.run_to if flt.run_to is not None else 1 << 62
        text = flt.q.lower().strip() if flt.q and flt.q.strip() else None
        rbs, instruments = access.rbs, access.instruments
        matches = [run for _, key, run in candidates  # one comprehension: the fastest scan in CPython
                   if (instrument is None or key[0] == instrument)
                   and (not check_access or key[1] in rbs or key[0] in instruments)
                   and run.last >= lo and run.first <= hi
                   and (state is None or run.latest.state == state)
                   and (text is None or text in run.text)]
        return Page(matches[start:start + flt.per_page], len(matches), flt.page, flt.per_page)

    def instruments(self, access: Access) -> list[str]:
        """Instruments with runs this user may see (for the filter menu)."""
        present = {name for name, entries in self._by_instrument.items() if entries and name}
        if access.admin:
            return sorted(present)
        mine = {entry[1][0] for rb in access.rbs for entry in self._by_rb.get(rb, [])}
        return sorted(present & (mine | set(access.instruments)))
