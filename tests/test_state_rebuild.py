"""Job state lives only in Kafka: after a durable broker restart the fold still gives the last event per job."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import pytest

from runner.bus.clients import Publisher
from runner.bus.embedded import EmbeddedBroker
from runner.bus.models import JobState, StatusEvent, TriggerRef
from runner.bus.status import JobMemo, JobMemos, StatusView
from runner.bus.topics import REDUCTION_STATUS

pytestmark = [pytest.mark.broker, pytest.mark.slow]

T0 = datetime(2026, 3, 1, 9, 0, tzinfo=UTC)


def history(job: int) -> list[StatusEvent]:
    """Queued -> running -> final for one job, in publication order; some arrive out of order."""
    at = T0 + timedelta(minutes=10 * job)
    final = JobState.FAILED if job % 5 == 0 else JobState.SUCCEEDED
    events = [
        StatusEvent(job_id=f"job{job:02d}", state=state, timestamp=at + timedelta(seconds=30 * i),
                    instrument="MARI" if job % 2 else "WISH", run_number=25000 + job, rb_number="1920001",
                    version=1 if state.final else None, finished_at=at + timedelta(seconds=60) if state.final else None)
        for i, state in enumerate([JobState.QUEUED, JobState.RUNNING, final])
    ]
    if job % 3 == 0:  # a slow runner's "running" reaches the broker after the final state
        events = [events[0], events[2], events[1]]
    if job % 4 == 0:  # "queued" has a later timestamp than the final state (clock skew, or a redelivered job
        # re-announcing its archived result): the final state stays, a job never looks queued after it finished
        events[0] = events[0].model_copy(update={"timestamp": at + timedelta(hours=1)})
    return events


def expected(events: list[StatusEvent]) -> StatusEvent:
    """A final state beats any non-final one; otherwise the newest timestamp, the later one on a tie."""
    return max(reversed(events), key=lambda e: (e.state.final, e.timestamp))


def test_status_survives_a_durable_broker_restart(durable_broker: EmbeddedBroker) -> None:
    settings = durable_broker.settings
    jobs = {f"job{j:02d}": history(j) for j in range(1, 25)}
    publisher = Publisher(settings)
    for events in jobs.values():
        for event in events:
            publisher.publish(REDUCTION_STATUS, event, key=event.job_id)
    publisher.close()
    before = StatusView.rebuild(settings)
    assert len(before.jobs) == len(jobs)

    durable_broker.stop()
    durable_broker.start()

    view = StatusView.rebuild(settings)
    assert view.invalid == 0
    assert {job_id: e.model_dump() for job_id, e in view.jobs.items()} == {
        job_id: expected(events).model_dump() for job_id, events in jobs.items()}
    assert view.jobs["job03"].state == JobState.SUCCEEDED  # "running" published after it lost
    assert view.jobs["job04"].state == JobState.SUCCEEDED  # never "queued" again once finished
    assert view.jobs["job05"].state == JobState.FAILED
    memos = JobMemos.rebuild(settings)  # the runner's view folds the same, into memos
    assert memos.jobs == {job_id: JobMemo.of(expected(events)) for job_id, events in jobs.items()}

    # a new process of the same home finds the restarted broker and shows the same state
    out = subprocess.run([sys.executable, "-m", "runner.cli", "runs", "--json", "--limit", "100"],
                         env={**os.environ, "NBREDUCE_HOME": str(settings.home)},
                         capture_output=True, text=True, timeout=120, check=True).stdout
    listed = {row["job_id"]: row for row in json.loads(out)}
    assert {job_id: row["state"] for job_id, row in listed.items()} == {
        job_id: expected(events).state.value for job_id, events in jobs.items()}
    assert listed["job10"]["finished_at"].startswith("2026-03-01T10:41")


def test_the_runner_remembers_a_memo_per_job_folded_like_the_events(settings) -> None:
    """A runner knows every job of the status topic for months: it keeps what it reads of each (state, when, the
    message's digest, the run), folded by the same rule as whole events."""
    memos, view = JobMemos(settings), StatusView(settings)
    jobs = {f"job{j:02d}": history(j) for j in range(1, 25)}
    for events in jobs.values():
        for event in events:
            event = event.model_copy(update={"trigger": TriggerRef(topic="t", partition=0, offset=1, digest="d" * 64),
                                             "scraps": {"counts": list(range(100))}})
            memos.put(event)
            view.put(event)
    assert memos.jobs == {job_id: JobMemo.of(event) for job_id, event in view.jobs.items()}
    assert all(type(memo) is JobMemo for memo in memos.jobs.values())
    memo = memos.get("job04")
    assert memo is not None and memo.state is JobState.SUCCEEDED and memo.digest == "d" * 64
    assert (memo.instrument, memo.run_number) == ("WISH", 25004)
