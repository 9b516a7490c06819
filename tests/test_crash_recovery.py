"""Kill the runner process mid-reduction, restart it: the run is published exactly once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from runner.bus.clients import read_topic
from runner.bus.embedded import EmbeddedBroker
from runner.bus.models import JobState, StatusEvent
from runner.bus.topics import REDUCTION_STATUS
from runner.pipeline.submit import submit_request, wait_for_jobs

FIXTURES = Path(__file__).parent / "fixtures" / "notebooks"


def start_runner(env: dict[str, str], log: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "runner.cli", "-v", "runner"], env=env,
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def status_events(settings, job_id: str) -> list[StatusEvent]:
    return [e for e in (StatusEvent.from_bytes(m.value()) for m in read_topic(settings, REDUCTION_STATUS))
            if e.job_id == job_id]


def test_runner_killed_mid_reduction_publishes_the_run_exactly_once(settings, durable_broker: EmbeddedBroker,
                                                                     tmp_path: Path) -> None:
    env = {**os.environ, "NBREDUCE_NOTEBOOKS": str(FIXTURES)}
    settings = settings.model_copy(update={"notebooks": FIXTURES})
    settings.data_roots[0].mkdir(parents=True, exist_ok=True)
    data = settings.data_roots[0] / "SLEEPY1.txt"
    data.write_text("counts")
    log = tmp_path / "runner.log"
    first = start_runner(env, log)
    try:
        job = submit_request(settings, instrument="SLEEPY", run_number=11, data=str(data), rb_number="1920011",
                             reduction_arguments={"sleep_seconds": 6})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if any(e.state is JobState.RUNNING for e in status_events(settings, job)):
                break
            time.sleep(0.3)
        else:
            raise AssertionError("job never started running:\n" + log.read_text())
        time.sleep(1.5)  # well inside the reduction
        os.killpg(first.pid, signal.SIGKILL)  # the runner and its kernel, as a node failure would
        first.wait(10)
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)

    # the broker restarts too: state must come back from durable storage
    durable_broker.stop()
    durable_broker.start()
    second = start_runner(env, log)
    try:
        final = wait_for_jobs(settings, {job}, 120).get(job)
        assert final is not None, log.read_text()
        assert final.state is JobState.SUCCEEDED, final.reason
    finally:
        second.send_signal(signal.SIGTERM)
        second.wait(30)
    run_dir = settings.archive / "SLEEPY" / "RB1920011" / "11"
    assert [p.name for p in run_dir.iterdir()] == ["v1"]
    assert (run_dir / "v1" / "done.txt").read_text() == "ok"
    events = status_events(settings, job)
    assert [e.state for e in events].count(JobState.SUCCEEDED) == 1
    assert {e.version for e in events if e.version is not None} == {1}
    assert second.returncode == 0, log.read_text()
