"""ISIS run control (pl72 run start / 6s4t run stop / wrdn) through the real embedded broker.

Messages are built with the ``ess-streaming-data-types`` serialisers, as the instrument control system
builds them. The helpers at the top are shared with the other trigger tests.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime
from pathlib import Path

import h5py
import pytest
from confluent_kafka.admin import NewTopic
from streaming_data_types import serialise_6s4t, serialise_pl72, serialise_wrdn

from runner.bus.clients import Publisher, admin, read_topic
from runner.bus.models import DeadLetter, RunCompletion
from runner.bus.table import TopicTable
from runner.bus.topics import DEAD_LETTER, RUN_COMPLETIONS, TRIGGER_STATE
from runner.config import Settings
from runner.isis.layout import cycle_dirs, find_data_file, valid_rb
from runner.triggers.base import Trigger, stable_id
from runner.triggers.runinfo import RunInfoTrigger, RunStartState

RB = "1920001"


# -- helpers shared by the trigger tests ---------------------------------------------------------------
def create_topics(settings: Settings, *names: str) -> None:
    client = admin(settings)
    for future in client.create_topics([NewTopic(name, 1, 1) for name in names]).values():
        future.result()


def drive(trigger: Trigger, inputs: int, limit: float = 90.0) -> int:
    """Poll ``trigger`` until it has handled ``inputs`` messages (the limit only stops a hung test)."""
    handled = 0
    deadline = time.monotonic() + limit
    while handled < inputs:
        assert time.monotonic() < deadline, f"{trigger.name} handled {handled} of {inputs} messages"
        handled += trigger.step(1.0)
    return handled


def completions(settings: Settings) -> list[RunCompletion]:
    return [RunCompletion.from_bytes(m.value()) for m in read_topic(settings, RUN_COMPLETIONS)]


def dead_letters(settings: Settings) -> list[DeadLetter]:
    return [DeadLetter.from_bytes(m.value()) for m in read_topic(settings, DEAD_LETTER)]


def write_nexus(path: Path, rb: str | None = RB) -> Path:
    """A minimal ISIS NeXus file: ``raw_data_1/experiment_identifier`` as ISIS writes it (1-element bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with h5py.File(path, "w") as f:
        entry = f.create_group("raw_data_1")
        entry.attrs["NX_class"] = "NXentry"
        if rb is not None:
            entry.create_dataset("experiment_identifier", data=[rb.encode()])
    return path


def data_dir(settings: Settings, instrument: str, cycle: str) -> Path:
    path = settings.data_roots[0] / f"NDX{instrument}" / "Instrument" / "data" / cycle
    path.mkdir(parents=True, exist_ok=True)
    return path


# -- through the broker ------------------------------------------------------------------------------
@pytest.mark.broker
def test_start_then_stop_publishes_one_completion(broker: Settings) -> None:
    create_topics(broker, "MARI_runInfo", "WISH_runInfo")
    data_file = write_nexus(data_dir(broker, "MARI", "cycle_24_1") / "MAR25581.nxs", rb="1234567")
    data_dir(broker, "MARI", "cycle_24_2")  # newer cycle without the file: the file is found where it is
    stop_ms = int(datetime(2026, 3, 1, 12, 0, tzinfo=UTC).timestamp() * 1000)
    producer = Publisher(broker)
    producer.publish("MARI_runInfo", serialise_pl72(
        "job-mari", "MAR25581.nxs", run_name="25581", instrument_name="MARI",
        metadata=f'{{"rb_number": "{RB}", "run_title": "Vanadium 100 meV"}}'))
    producer.publish("WISH_runInfo", serialise_pl72("job-wish", "WISH00038237.nxs", run_name="38237",
                                                    instrument_name="WISH"))
    # the stops keep the library's default run_name: matched by job_id alone; the second one is a duplicate
    producer.publish("MARI_runInfo", serialise_6s4t("job-mari", stop_time=stop_ms))
    producer.publish("MARI_runInfo", serialise_6s4t("job-mari", stop_time=stop_ms))
    producer.publish("WISH_runInfo", serialise_6s4t("job-wish", stop_time=stop_ms))

    trigger = RunInfoTrigger(broker)  # regex subscription: both instruments' topics
    try:
        drive(trigger, 5)
    finally:
        trigger.close()

    messages = list(read_topic(broker, RUN_COMPLETIONS))
    published = [RunCompletion.from_bytes(m.value()) for m in messages]
    assert sorted(c.instrument for c in published) == ["MARI", "WISH"]  # one each: the duplicate stop adds nothing
    # keyed by message id, so one instrument's runs spread over the partitions (and the runners)
    assert sorted(m.key() for m in messages) == sorted(c.message_id.encode() for c in published)
    found = {c.instrument: c for c in map(RunCompletion.from_bytes, (m.value() for m in messages))}
    mari = found["MARI"]
    assert mari.message_id == stable_id("runinfo", "job-mari")
    assert mari.run_number == 25581
    assert mari.rb_number == RB  # the start's metadata wins over the file
    assert mari.run_title == "Vanadium 100 meV"
    assert mari.data == str(data_file)
    assert mari.timestamp == datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
    assert mari.started_by == 0
    wish = found["WISH"]
    assert wish.run_number == 38237 and wish.rb_number is None  # no metadata, no file yet: the runner reports it
    assert wish.data.endswith("NDXWISH/Instrument/data/WISH00038237.nxs")
    assert dead_letters(broker) == []
    state = TopicTable(broker, TRIGGER_STATE, RunStartState, prefix="runinfo:").load().get("job-mari")
    assert state.status == "matched"


@pytest.mark.broker
def test_stop_time_zero_file_rb_and_file_writing_done(broker: Settings) -> None:
    create_topics(broker, "MARI_runInfo")
    write_nexus(data_dir(broker, "MARI", "cycle_24_1") / "MAR25581.nxs", rb="1234567")
    newest = data_dir(broker, "MARI", "cycle_24_3")
    data_dir(broker, "MARI", "cycle_24_2")
    producer = Publisher(broker)
    before = datetime.now(UTC).replace(microsecond=0)
    producer.publish("MARI_runInfo", serialise_pl72("job-a", "MAR25581.nxs", run_name="25581",
                                                    instrument_name="MARI"))
    producer.publish("MARI_runInfo", serialise_6s4t("job-a", stop_time=0))
    # job b: completed by "file writing done" before its stop; the file is not there yet
    producer.publish("MARI_runInfo", serialise_pl72("job-b", "MAR25582.nxs", run_name="25582",
                                                    instrument_name="MARI"))
    producer.publish("MARI_runInfo", serialise_wrdn("filewriter", "job-b", False, "MAR25582.nxs"))
    producer.publish("MARI_runInfo", serialise_6s4t("job-b"))

    trigger = RunInfoTrigger(broker, topics=["MARI_runInfo"])
    try:
        drive(trigger, 5)
    finally:
        trigger.close()

    found = {c.run_number: c for c in completions(broker)}
    assert sorted(found) == [25581, 25582]
    # stop_time 0 = "now": the time the stop was sent, not 1970
    assert found[25581].timestamp >= before
    assert found[25581].rb_number == "1234567"  # no metadata: read from the NeXus file
    assert found[25582].data == str(newest / "MAR25582.nxs")  # not written yet: newest cycle, the runner waits
    assert found[25582].message_id == stable_id("runinfo", "job-b")
    assert dead_letters(broker) == []


@pytest.mark.broker
def test_bad_input_is_dead_lettered_and_the_trigger_keeps_going(broker: Settings) -> None:
    create_topics(broker, "MARI_runInfo")
    start = serialise_pl72("job-ok", "MAR25590.nxs", run_name="25590", instrument_name="MARI")
    bad = {
        "matches no run start": serialise_6s4t("job-never-started", run_name="25580"),
        "not a flatbuffers message": b"\x01",
        "unsupported flatbuffers schema": b"this is not a run start",
        "malformed pl72": start[:100],
        "rejected: no run number": serialise_pl72("job-no-run", "junk.nxs", run_name="test_run",
                                                   instrument_name="MARI"),
    }
    producer = Publisher(broker)
    for value in bad.values():
        producer.publish("MARI_runInfo", value, key=b"control")
    producer.publish("MARI_runInfo", serialise_6s4t("job-no-run"))  # start already dead-lettered: ignored
    producer.publish("MARI_runInfo", start)
    producer.publish("MARI_runInfo", serialise_6s4t("job-ok"))

    trigger = RunInfoTrigger(broker)
    try:
        drive(trigger, len(bad) + 3)
    finally:
        trigger.close()

    assert [c.run_number for c in completions(broker)] == [25590]
    letters = dead_letters(broker)
    assert len(letters) == len(bad)
    for (reason, value), letter in zip(bad.items(), letters, strict=True):
        assert reason in letter.reason
        assert letter.value == value  # byte for byte, for inspection and replay
        assert letter.key == b"control"
        assert letter.source_topic == "MARI_runInfo" and letter.offset is not None
        assert letter.reporter == "runinfo"


@pytest.mark.broker
def test_pending_start_survives_a_trigger_restart(broker: Settings) -> None:
    create_topics(broker, "MARI_runInfo")
    producer = Publisher(broker)
    producer.publish("MARI_runInfo", serialise_pl72("job-r", "MAR25600.nxs", run_name="25600",
                                                    instrument_name="MARI", metadata=f'{{"rb": {RB}}}'))
    first = RunInfoTrigger(broker, topics=["MARI_runInfo"])
    try:
        drive(first, 1)
    finally:
        first.close()
    state = TopicTable(broker, TRIGGER_STATE, RunStartState, prefix="runinfo:").load().get("job-r")
    assert state.status == "pending" and state.run_number == 25600

    producer.publish("MARI_runInfo", serialise_6s4t("job-r"))
    second = RunInfoTrigger(broker, topics=["MARI_runInfo"])  # a fresh process: knows only the state topic
    try:
        assert drive(second, 1) == 1  # the start was committed: only the stop is read again
        assert "job-r" in second.starts
    finally:
        second.close()

    [completion] = completions(broker)
    assert (completion.run_number, completion.rb_number) == (25600, RB)
    assert dead_letters(broker) == []


# -- units ---------------------------------------------------------------------------------------------
def test_cycles_newest_first_across_roots_and_centuries(tmp_path: Path) -> None:
    roots = [tmp_path / "a", tmp_path / "b"]
    for root, cycle in [(roots[0], "cycle_98_4"), (roots[0], "cycle_24_1"), (roots[1], "cycle_24_2"),
                        (roots[1], "cycle_09_5")]:
        (root / "NDXMARI" / "Instrument" / "data" / cycle).mkdir(parents=True)
    assert [p.name for p in cycle_dirs(roots, "MARI")] == ["cycle_24_2", "cycle_24_1", "cycle_09_5", "cycle_98_4"]
    old = write_nexus(roots[0] / "NDXMARI" / "Instrument" / "data" / "cycle_98_4" / "MAR00001.nxs")
    assert find_data_file(roots, "MARI", "MAR00001.nxs") == old
    assert find_data_file(roots, "MARI", "MAR99999.nxs") == roots[1] / "NDXMARI/Instrument/data/cycle_24_2/MAR99999.nxs"
    assert find_data_file(roots, "MARI", "/elsewhere/MAR1.nxs") == Path("/elsewhere/MAR1.nxs")
    assert find_data_file(roots, "WISH", "WISH1.nxs") == roots[0] / "NDXWISH/Instrument/data/WISH1.nxs"


def test_calibration_placeholder_rb_is_not_passed_on() -> None:
    assert valid_rb(1920001, "test") == "1920001"
    assert valid_rb("CAL-RUN", "test") is None
    assert valid_rb("", "test") is None
