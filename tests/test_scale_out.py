"""Scale-out that really spreads work: run completions and requests are keyed by message id, so two runners of
one group share one instrument's runs (keyed by instrument, one runner got them all and the other sat idle)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from runner.bus.clients import read_topic
from runner.bus.embedded import EmbeddedBroker
from runner.bus.topics import REDUCTION_REQUESTS
from runner.config import Settings
from runner.pipeline.consumer import Runner
from runner.pipeline.submit import submit_request, wait_for_jobs

FIXTURES = Path(__file__).parent / "fixtures" / "notebooks"


def wait_until_both_hold_partitions(settings: Settings, names: set[str], limit: float = 60) -> None:
    """The group has rebalanced: each runner's heartbeat names partitions, together all of them."""
    from runner.bus.health import RunnerHealth, health_table

    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        beats = {b.name: b for b in health_table(settings, RunnerHealth).load().snapshot() if b.name in names}
        if beats.keys() == names and all(b.partitions for b in beats.values()) \
                and len({p for b in beats.values() for p in b.partitions}) == 12:
            return
        time.sleep(0.3)
    raise AssertionError("the two runners did not share the partitions")


@pytest.mark.broker
def test_two_runners_in_one_group_share_one_instruments_runs(tmp_path: Path) -> None:
    home = tmp_path / "home"
    data = home / "data"
    data.mkdir(parents=True)
    settings = Settings.from_env({"NBREDUCE_HOME": str(home), "NBREDUCE_NOTEBOOKS": str(FIXTURES),
                                  "NBREDUCE_DATA_ROOTS": str(data), "NBREDUCE_RUNNER__MAX_PARALLEL": "1",
                                  "NBREDUCE_KERNELS__WARM": "0", "NBREDUCE_RUNNER__HEARTBEAT_SECONDS": "0.5"})
    broker = EmbeddedBroker(settings)
    broker.start(memory=True)
    stop = threading.Event()
    ready = {name: threading.Event() for name in ("runner-a", "runner-b")}
    threads = [threading.Thread(target=Runner(settings, identity=name).run, args=(stop, ready[name].set), daemon=True)
               for name in ready]
    try:
        for thread in threads:
            thread.start()
        assert all(event.wait(60) for event in ready.values())
        wait_until_both_hold_partitions(settings, set(ready))
        jobs = set()
        for run in range(1, 13):
            path = data / f"ECHO{run}.txt"
            path.write_text("counts")
            jobs.add(submit_request(settings, instrument="ECHO", run_number=run, data=str(path), rb_number="1920015"))
        done = wait_for_jobs(settings, jobs, 240)
        keys = [m.key() for m in read_topic(settings, REDUCTION_REQUESTS)]
    finally:
        stop.set()
        for thread in threads:
            thread.join(60)
        broker.stop()
    assert len(done) == 12 and {e.instrument for e in done.values()} == {"ECHO"}
    by_runner = {name: sum(1 for e in done.values() if e.runner == name) for name in ready}
    assert by_runner["runner-a"] > 0 and by_runner["runner-b"] > 0, by_runner
    assert len(set(keys)) == 12 and b"ECHO" not in keys  # keyed by message id, not by instrument
