"""The portal's run index: grouping jobs into runs, stable order, filters, access (unit level)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from runner.bus.models import JobState, StatusEvent
from runner.hub.access import Access
from runner.portal.index import RunFilter, RunIndex

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def event(job: str, run: int, minutes: int, inst: str = "MARI", rb: str = "1", **kw) -> StatusEvent:
    return StatusEvent(job_id=job, instrument=inst, rb_number=rb, run_number=run,
                       queued_at=T0 + timedelta(minutes=minutes), timestamp=T0 + timedelta(minutes=minutes),
                       **{"state": JobState.SUCCEEDED, **kw})


def keys(page) -> list[str]:
    return [run.label for run in page.runs]


def test_versions_group_into_runs_and_order_is_stable() -> None:
    index = RunIndex()
    index.apply(event("a1", 10, 0, version=1))
    index.apply(event("b1", 11, 1, version=1))
    index.apply(event("a2", 10, 5, state=JobState.RUNNING, version=2))  # rerun of run 10: no reordering
    everyone = Access(admin=True)
    assert keys(index.query(everyone, RunFilter())) == ["11", "10"]
    run = index.run_of("a2")
    assert [j.job_id for j in run.versions()] == ["a1", "a2"]
    assert run.state is JobState.SUCCEEDED and run.latest.job_id == "a1" and run.active.job_id == "a2"
    index.apply(event("a2", 10, 6, state=JobState.FAILED, version=2))
    assert run.latest.job_id == "a1" and run.active is None  # a failed rerun does not hide the result
    assert index.query(everyone, RunFilter(state=JobState.FAILED)).runs == []
    index.apply(event("b2", 11, 7, state=JobState.FAILED, version=2))
    index.apply(event("c1", 12, 8, state=JobState.FAILED, version=1))
    assert keys(index.query(everyone, RunFilter(state=JobState.FAILED))) == ["12"]
    assert len(index) == 3 and len(index.jobs) == 5


def test_a_rejected_request_never_hides_a_version() -> None:
    index = RunIndex()
    index.apply(event("v1", 20, 0, version=1, run_title="vanadium"))
    index.apply(event("r", 20, 5, state=JobState.REJECTED, reason="unknown parameter(s) bins"))
    index.apply(event("q", 20, 6, state=JobState.QUEUED))
    run = index.run_of("r")
    assert run.latest.job_id == "v1" and run.title == "vanadium" and run.state is JobState.SUCCEEDED
    assert [j.job_id for j in run.versions()] == ["v1"] and [j.job_id for j in run.requests()] == ["r", "q"]
    assert run.active.job_id == "q"
    only = RunIndex()
    only.apply(event("r", 21, 0, state=JobState.REJECTED, reason="no valid RB"))
    assert only.run_of("r").latest.job_id == "r" and only.run_of("r").versions() == []


def test_access_and_filters_use_the_smallest_list() -> None:
    index = RunIndex()
    for i in range(30):
        index.apply(event(f"j{i}", 100 + i, i, inst="MARI" if i % 2 else "WISH", rb=str(i % 3),
                          run_title="vanadium" if i % 5 == 0 else "sample"))
    scientist_and_member = Access(instruments=frozenset({"MARI"}), rbs=frozenset({"0"}))
    page = index.query(scientist_and_member, RunFilter(per_page=100))
    expected = [str(100 + i) for i in reversed(range(30)) if i % 2 or i % 3 == 0]
    assert keys(page) == expected and page.total == len(expected)  # no duplicates for RB 0 on MARI
    member = Access(rbs=frozenset({"1"}))
    assert index.query(member, RunFilter(instrument="MARI", per_page=100)).total == 5
    assert index.query(member, RunFilter(rb="2")).total == 0  # filter on an RB that is not theirs
    assert keys(index.query(Access(admin=True), RunFilter(run_from=105, run_to=107))) == ["107", "106", "105"]
    assert index.query(Access(admin=True), RunFilter(q="VANADIUM")).total == 6
    paged = index.query(Access(admin=True), RunFilter(per_page=7, page=5))
    assert paged.pages == 5 and keys(paged) == ["101", "100"]
    assert index.instruments(member) == ["MARI", "WISH"] and index.instruments(Access()) == []


def test_identity_filled_in_later_moves_the_job() -> None:
    index = RunIndex()
    index.apply(event("x", 5, 0, rb=None, state=JobState.QUEUED))
    index.apply(event("x", 5, 1, rb="7", version=1))
    assert list(index.runs) == [("MARI", "7", "5")]
    assert index.query(Access(rbs=frozenset({"7"})), RunFilter()).total == 1
