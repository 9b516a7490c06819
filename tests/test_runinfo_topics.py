"""Run-control topics are found at once: the runinfo trigger creates every known instrument's ``<INST>_runInfo``
topic when it starts (a run start on a topic the pattern had not seen yet was once picked up minutes late)."""

from __future__ import annotations

import pytest
from streaming_data_types import serialise_6s4t, serialise_pl72
from test_triggers_runinfo import completions, data_dir, drive, write_nexus

from runner.bus.clients import Publisher, admin
from runner.config import Settings
from runner.templates.registry import TemplateRegistry
from runner.triggers.runinfo import RunInfoTrigger


@pytest.mark.broker
def test_the_trigger_creates_every_instruments_run_control_topic_and_sees_a_run_on_it(broker: Settings) -> None:
    instruments = TemplateRegistry(broker.notebooks).instruments()
    assert "MARI" in instruments
    before = set(admin(broker).list_topics(timeout=10).topics)
    assert "MARI_runInfo" not in before
    trigger = RunInfoTrigger(broker)
    try:
        trigger.step(0.5)  # start: topics created before subscribing
        topics = set(admin(broker).list_topics(timeout=10).topics)
        assert {f"{i}_runInfo" for i in instruments} <= topics
        write_nexus(data_dir(broker, "MARI", "cycle_25_1") / "MAR25700.nxs", rb="1234567")
        producer = Publisher(broker)
        producer.publish("MARI_runInfo", serialise_pl72(job_id="job-new-topic", filename="MAR25700.nxs",
                                                        run_name="25700", instrument_name="MARI", start_time=1))
        producer.publish("MARI_runInfo", serialise_6s4t(job_id="job-new-topic", stop_time=2))
        drive(trigger, 2, limit=60)
    finally:
        trigger.close()
    assert [c.run_number for c in completions(broker)] == [25700]
    again = RunInfoTrigger(broker)  # a second start creates nothing and fails on nothing
    try:
        again.step(0.2)
    finally:
        again.close()
