"""``nbreduce watch``: lastrun.txt polling with backfill, state and heartbeat in the real broker."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import nbformat
import pytest
from test_triggers_runinfo import RB, completions, data_dir, write_nexus

from runner import sim
from runner.bus.clients import read_topic
from runner.bus.topics import HEALTH
from runner.config import Settings
from runner.isis.layout import instrument_config
from runner.triggers import TriggerHealth, trigger_health
from runner.triggers.base import stable_id
from runner.triggers.lastrun import LastRunError, LastRunWatcher, read_lastrun, watch


def set_lastrun(settings: Settings, instrument: str, text: str) -> Path:
    path = settings.data_roots[0] / f"NDX{instrument}" / "Instrument" / "logs" / "lastrun.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


@pytest.fixture
def templated(broker: Settings, tmp_path: Path) -> Settings:
    """Settings whose template registry has MARI (files ``MAR<5 digits>.nxs``)."""
    notebooks = tmp_path / "notebooks"
    (notebooks / "MARI").mkdir(parents=True)
    nbformat.write(nbformat.v4.new_notebook(), notebooks / "MARI" / "reduce.ipynb")
    (notebooks / "MARI" / "instrument.toml").write_text('file_prefix = "MAR"\nrun_digits = 5\n')
    return broker.model_copy(update={"notebooks": notebooks})


@pytest.mark.broker
def test_backfill_after_a_gap_publishes_each_run_once(templated: Settings) -> None:
    cycle = data_dir(templated, "MARI", "cycle_24_1")
    write_nexus(cycle / "MAR00103.nxs", rb=RB)
    set_lastrun(templated, "MARI", "MAR 100 0\n")
    watcher = LastRunWatcher(templated)  # instruments from the template registry
    assert watcher.step() == 0  # first start: begins at the current run, history is not flooded

    set_lastrun(templated, "MARI", "MAR 105 0\n")
    assert watcher.step() == 5
    assert watcher.step() == 0
    watcher.close()
    restarted = LastRunWatcher(templated)  # state comes back from the broker, nothing is republished
    assert restarted.step() == 0
    set_lastrun(templated, "MARI", "MAR 106 0\n")
    assert restarted.step() == 1
    restarted.close()

    published = completions(templated)
    assert sorted(c.run_number for c in published) == [101, 102, 103, 104, 105, 106]  # keyed apart: any order
    by_run = {c.run_number: c for c in published}
    assert by_run[103].data == str(cycle / "MAR00103.nxs") and by_run[103].rb_number == RB
    assert by_run[104].data == str(cycle / "MAR00104.nxs") and by_run[104].rb_number is None  # not written yet
    assert by_run[101].message_id == stable_id("lastrun", "MARI", 101)
    assert {c.instrument for c in published} == {"MARI"} and {c.started_by for c in published} == {0}


@pytest.mark.broker
def test_runs_written_by_the_simulator_are_picked_up(templated: Settings) -> None:
    config = instrument_config(templated, "MARI")
    root = templated.data_roots[0]
    sim.write_run(root, config, 200, RB, events=100, title="first", cycle="25_3", seed=1)
    watcher = LastRunWatcher(templated)
    assert watcher.step() == 0
    path = sim.write_run(root, config, 201, "2612345", events=100, title="second", cycle="25_3", seed=1)
    assert watcher.step() == 1
    watcher.close()
    [completion] = completions(templated)
    assert (completion.run_number, completion.data, completion.rb_number) == (201, str(path), "2612345")


@pytest.mark.broker
def test_unreadable_lastrun_is_reported_and_retried_next_cycle(broker: Settings) -> None:
    watcher = LastRunWatcher(broker, instruments=["mari", "WISH"], start_from={"MARI": 41}, read_retries=1,
                             retry_delay=0, max_backfill=10)
    set_lastrun(broker, "MARI", "MAR 4")  # caught half-written
    assert watcher.step() == 0  # WISH has no lastrun.txt at all: also reported, nothing crashes
    assert watcher.health.errors == 2 and "WISH" in (watcher.health.last_error or "")

    set_lastrun(broker, "MARI", "MAR 42 0")
    assert watcher.step() == 2  # start_from: runs 41 and 42
    set_lastrun(broker, "MARI", "MAR 40 0")  # backwards: reported, nothing published
    set_lastrun(broker, "WISH", "WISH 5000 0")
    assert watcher.step() == 0
    set_lastrun(broker, "MARI", "MAR 99 0")  # a gap above max_backfill is reported, not published
    assert watcher.step() == 0
    assert "max_backfill" in (watcher.health.last_error or "")
    watcher.close()
    assert sorted(c.run_number for c in completions(broker)) == [41, 42]


@pytest.mark.broker
def test_a_heartbeat_is_written_each_cycle(broker: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    set_lastrun(broker, "MARI", "MAR 7 0")
    watcher = LastRunWatcher(broker, instruments=["MARI"], interval=0.01)
    stop = threading.Event()
    cycles = 0
    poll = watcher.poll_once

    def third_cycle_stops(timeout: float = 0.0) -> int:
        nonlocal cycles
        cycles += 1
        if cycles == 3:
            stop.set()
        return poll(timeout)

    monkeypatch.setattr(watcher, "poll_once", third_cycle_stops)
    watcher.run(stop)
    beats = [TriggerHealth.from_bytes(m.value()) for m in read_topic(broker, HEALTH)
             if m.key() == b"trigger:lastrun"]
    assert len(beats) == 4  # one per cycle, one on the way out
    assert beats[-1].last_run_seen == {"MARI": 7} and beats[-1].errors == 0
    assert trigger_health(broker) == [beats[-1]]


@pytest.mark.broker
def test_watch_shows_its_health_while_it_waits(broker: Settings) -> None:
    set_lastrun(broker, "MARI", "MAR 7 0")
    stop = threading.Event()
    thread = threading.Thread(target=watch, args=(broker, ["MARI"], 600.0, stop))
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not trigger_health(broker):
            assert time.monotonic() < deadline, "no heartbeat from the watcher"
    finally:
        stop.set()
        thread.join()
    [health] = trigger_health(broker)
    assert health.name == "lastrun" and health.last_run_seen == {"MARI": 7}


# -- units ---------------------------------------------------------------------------------------------
def test_read_errors_are_retried(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "lastrun.txt"
    path.write_text("MAR 25581 0\n")
    real_read = Path.read_text
    failures = iter([OSError("stale file handle"), None])

    def flaky_read(self: Path, *args: object, **kwargs: object) -> str:
        problem = next(failures, None)
        if problem is not None:
            raise problem
        return real_read(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", flaky_read)
    pauses: list[float] = []
    assert read_lastrun(path, retries=3, delay=0.5, sleep=pauses.append) == 25581
    assert pauses == [0.5]


@pytest.mark.parametrize("text", ["", "MAR 2558", "MAR x 0", "MAR 0 0", "MAR 1 2 3", "MAR \xe9 0"])
def test_half_written_or_garbled_lastrun_is_an_error(tmp_path: Path, text: str) -> None:
    path = tmp_path / "lastrun.txt"
    path.write_text(text, encoding="latin-1")
    pauses: list[float] = []
    with pytest.raises(LastRunError):
        read_lastrun(path, retries=2, delay=0.1, sleep=pauses.append)
    assert pauses == [0.1, 0.1]
