"""File waits cost no slot: a run whose data file is not ready is parked on a timer, shown ``waiting``, while the
runs behind it are reduced; it survives a runner restart with the wait it already had, and its offset is never
committed past it before it is done.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.bus.clients import read_topic
from runner.bus.embedded import EmbeddedBroker
from runner.bus.models import JobState, StatusEvent
from runner.bus.status import StatusView
from runner.bus.topics import REDUCTION_STATUS
from runner.config import Settings
from runner.pipeline.submit import submit_request, wait_for_jobs

FIXTURES = Path(__file__).parent / "fixtures" / "notebooks"
RB = "1920014"

pytestmark = pytest.mark.broker


def states(settings: Settings, job: str) -> list[StatusEvent]:
    return [e for m in read_topic(settings, REDUCTION_STATUS) for e in [StatusEvent.from_bytes(m.value())]
            if e.job_id == job]


def wait_state(settings: Settings, job: str, state: JobState, limit: float = 60) -> StatusEvent:
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        shown = StatusView.rebuild(settings).get(job)
        if shown is not None and shown.state is state:
            return shown
        time.sleep(0.3)
    raise AssertionError(f"job {job} never {state.value}: {StatusView.rebuild(settings).get(job)}")


def start_runner(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner.cli", "-v", "runner"], env=env, stdout=log.open("ab"),
                            stderr=subprocess.STDOUT, start_new_session=True)


def test_a_run_waiting_for_its_file_holds_no_slot_and_survives_a_restart(settings: Settings,
                                                                         durable_broker: EmbeddedBroker,
                                                                         tmp_path: Path) -> None:
    # one slot only: if the waiting run held it, nothing behind it could run
    env = {**os.environ, "NBREDUCE_NOTEBOOKS": str(FIXTURES), "NBREDUCE_RUNNER__MAX_PARALLEL": "1",
           "NBREDUCE_RUNNER__FILE_WAIT_SECONDS": "300"}
    settings = settings.model_copy(update={"notebooks": FIXTURES})
    data = settings.data_roots[0]
    data.mkdir(parents=True, exist_ok=True)
    log = tmp_path / "runner.log"
    late = data / "late-ECHO1.txt"
    runner = start_runner(env, log)
    try:
        waiting = submit_request(settings, instrument="ECHO", run_number=1, data=str(late), rb_number=RB)
        shown = wait_state(settings, waiting, JobState.WAITING)
        assert "waiting for data" in (shown.reason or "") and "does not exist yet" in (shown.reason or "")
        behind = set()
        for run in (2, 3, 4):
            path = data / f"ECHO{run}.txt"
            path.write_text("counts")
            behind.add(submit_request(settings, instrument="ECHO", run_number=run, data=str(path), rb_number=RB))
        done = wait_for_jobs(settings, behind, 120)
        assert {e.state for e in done.values()} == {JobState.SUCCEEDED}, done
        assert StatusView.rebuild(settings).get(waiting).state is JobState.WAITING

        # the CLI shows it
        from runner.cli.main import main

        listed = CliRunner().invoke(main, ["runs", "--state", "waiting"], env={"NBREDUCE_NOTEBOOKS": str(FIXTURES)})
        assert listed.exit_code == 0 and "waiting" in listed.output and "does not exist yet" in listed.output

        runner.send_signal(signal.SIGKILL)  # its offset was not committed: redelivered to the next runner
        runner.wait(30)
        runner = start_runner(env, log)
        late.write_text("counts, at last")
        final = wait_for_jobs(settings, {waiting}, 120).get(waiting)
        assert final is not None and final.state is JobState.SUCCEEDED, final
    finally:
        runner.send_signal(signal.SIGTERM)
        runner.wait(60)
    shown = states(settings, waiting)
    assert [e.state for e in shown].count(JobState.QUEUED) == 1  # the redelivered job was not queued again
    assert {e.queued_at for e in shown if e.queued_at} == {shown[0].queued_at}  # one wait, counted from the start
    assert [e.state for e in shown].count(JobState.SUCCEEDED) == 1
    assert [p.name for p in (settings.archive / "ECHO" / f"RB{RB}" / "1").iterdir()] == ["v1"]


def test_the_wait_is_bounded_and_counted_from_when_the_job_was_queued(tmp_path: Path) -> None:
    from pipeline_support import running_platform

    with running_platform(tmp_path / "home", NBREDUCE_RUNNER__FILE_WAIT_SECONDS="3") as settings:
        job = submit_request(settings, instrument="ECHO", run_number=5, data=str(settings.data_roots[0] / "never.txt"),
                             rb_number=RB)
        final = wait_for_jobs(settings, {job}, 60)[job]
        shown = [e.state for e in states(settings, job)]
    assert final.state is JobState.FAILED and "not readable after" in (final.reason or "")
    assert shown == [JobState.QUEUED, JobState.WAITING, JobState.FAILED]
