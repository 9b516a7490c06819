"""The legacy ISIS autoreduction ``data_ready`` message, accepted as its writers produce it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from test_triggers_runinfo import completions, create_topics, dead_letters, drive

from runner.bus.clients import Publisher
from runner.bus.models import RunCompletion
from runner.bus.topics import DEAD_LETTER, RUN_COMPLETIONS
from runner.bus.work import WorkConsumer
from runner.config import Settings
from runner.triggers import make_trigger, trigger_class
from runner.triggers.base import stable_id
from runner.triggers.legacy import LegacyDataReadyBridge

#: Every field of the legacy message, set, as a manual batch submission sends it.
FULL = {
    "description": "Sum of two vanadium runs",
    "facility": "ISIS",
    "run_number": [25581, 25582],
    "run_title": "Vanadium 100 meV",
    "instrument": "MARI",
    "rb_number": 1920001,
    "started_by": -1,
    "data": ["/archive/NDXMARI/Instrument/data/cycle_19_4/MAR25581.nxs",
             "/archive/NDXMARI/Instrument/data/cycle_19_4/MAR25582.nxs"],
    "overwrite": True,
    "run_version": "0",
    "job_id": "17",
    "reduction_script": "from mantid.simpleapi import *\n",
    "reduction_arguments": {
        "standard_vars": {"ei": [30, 100], "sum_runs": True},
        "advanced_vars": {"mask_file": "mask_24_1.xml"},
        "variable_help": {"standard_vars": {"ei": "Incident energies (meV)"}, "advanced_vars": {}},
    },
    "reduction_log": "",
    "admin_log": "",
    "message": "",
    "retry_in": 0,
    "reduction_data": "/instrument/MARI/RBNumber/RB1920001/autoreduced/25581-25582",
    "software": {"name": "Mantid", "version": "6.4.0"},
    "flat_output": False,
}
#: What run detection sends: the writer serialises every field, the unset ones as null.
RUN_DETECTION = {key: None for key in FULL} | {
    "description": "", "facility": "ISIS", "run_number": 25583, "instrument": "MARI", "rb_number": "1920001",
    "started_by": 0, "data": "/archive/NDXMARI/Instrument/data/cycle_19_4/MAR25583.nxs",
    "reduction_arguments": {}, "reduction_log": "", "admin_log": "", "software": {}, "flat_output": False,
}


def test_model_accepts_a_full_legacy_message() -> None:
    completion = RunCompletion.model_validate_json(json.dumps(FULL))
    assert completion.runs == [25581, 25582] and completion.rb_number == "1920001"
    assert completion.started_by == -1 and completion.run_title == "Vanadium 100 meV"
    assert completion.reduction_arguments == {"ei": [30, 100], "sum_runs": True, "mask_file": "mask_24_1.xml"}


def test_model_accepts_nulls_as_legacy_writers_send_them() -> None:
    """The legacy writer sends every field, null when unset: null means the field's default."""
    completion = RunCompletion.model_validate_json(json.dumps(RUN_DETECTION))
    assert (completion.instrument, completion.runs, completion.rb_number) == ("MARI", [25583], "1920001")
    assert completion.data_files == [RUN_DETECTION["data"]] and completion.started_by == 0
    assert completion.run_title == "" and completion.template is None and completion.message_id is None
    assert completion.reduction_arguments == {}


@pytest.mark.broker
def test_data_ready_messages_become_run_completions(broker: Settings) -> None:
    create_topics(broker, "data_ready")
    producer = Publisher(broker)
    inputs: list[dict[str, Any] | bytes] = [
        RUN_DETECTION,
        FULL,
        RUN_DETECTION | {"run_number": 0},  # legacy validation: run_number > 0
        b"{not json",
        [RUN_DETECTION],
        RUN_DETECTION | {"message_id": "resubmitted-42", "timestamp": "2026-01-02T03:04:05Z"},
    ]
    for value in inputs:
        producer.publish("data_ready", value if isinstance(value, bytes) else json.dumps(value).encode())

    bridge = LegacyDataReadyBridge(broker)
    try:
        drive(bridge, len(inputs))
    finally:
        bridge.close()

    published = completions(broker)  # keyed by message id: spread over partitions, read back in any order
    by_source = {stable_id("legacy", "data_ready", 0, 0): 0, stable_id("legacy", "data_ready", 0, 1): 1,
                 "resubmitted-42": 2}
    detected, batch, resubmitted = sorted(published, key=lambda c: by_source[c.message_id])
    assert detected.message_id == stable_id("legacy", "data_ready", 0, 0)  # the source offset: stable on replay
    assert (detected.instrument, detected.run_number, detected.rb_number) == ("MARI", 25583, "1920001")
    assert detected.run_title == "" and detected.started_by == 0
    assert detected.timestamp.year >= 2026  # when the legacy message was sent
    assert batch.message_id == stable_id("legacy", "data_ready", 0, 1)
    assert batch.data_files == FULL["data"] and batch.reduction_arguments["mask_file"] == "mask_24_1.xml"
    assert resubmitted.message_id == "resubmitted-42"
    assert resubmitted.timestamp == datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    reasons = [letter.reason for letter in dead_letters(broker)]
    assert len(reasons) == 3
    assert "run_number" in reasons[0] and "not JSON" in reasons[1] and "not an object" in reasons[2]


# -- units: publish failures never skip input ----------------------------------------------------------
class FlakyPublisher:
    """Publisher stand-in whose first ``failures`` publishes fail as a broker outage would."""

    def __init__(self, failures: int):
        self.failures = failures
        self.sent: list[tuple[str, Any]] = []

    def publish(self, topic: str, message: Any, key: Any = None, timeout: float = 30) -> None:
        if self.failures:
            self.failures -= 1
            raise KafkaException(KafkaError(KafkaError._MSG_TIMED_OUT, "broker away"))
        self.sent.append((topic, message))

    def close(self) -> None:
        pass


class ReplayingConsumer:
    """Consumer stand-in serving a fixed log from its current position, honouring ``seek``."""

    def __init__(self, log: list[Message]):
        self.log = log
        self.position = 0
        self.commits: list[int] = []

    def poll(self, timeout: float) -> Message | None:
        batch = self.consume(1, timeout)
        return batch[0] if batch else None

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        batch = self.log[self.position:self.position + num_messages]
        self.position += len(batch)
        return batch

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        pass

    def assignment(self) -> list[TopicPartition]:
        return [TopicPartition("data_ready", 0)]

    def seek(self, partition: TopicPartition) -> None:
        self.position = partition.offset

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits += [tp.offset for tp in offsets]

    def close(self) -> None:
        pass


def with_log(bridge: LegacyDataReadyBridge, log: list[Message]) -> ReplayingConsumer:
    """Feed ``bridge`` from ``log`` through the real work consumer (rewind and commit logic included)."""
    consumer = ReplayingConsumer(log)
    bridge._work = WorkConsumer(bridge.settings, "test", ["data_ready"], consumer=consumer)  # type: ignore[arg-type]
    return consumer


def test_a_publish_failure_rewinds_instead_of_skipping(settings: Settings) -> None:
    log = [Message(topic="data_ready", partition=0, offset=i, value=json.dumps(RUN_DETECTION | {"run_number": 10 + i})
                   .encode(), timestamp=(1, 1_700_000_000_000)) for i in range(3)]
    publisher = FlakyPublisher(failures=1)
    bridge = make_trigger(settings, "legacy", publisher=publisher)  # type: ignore[arg-type]
    consumer = with_log(bridge, log)  # type: ignore[arg-type]

    with pytest.raises(KafkaException):
        bridge.poll_once()
    assert consumer.position == 0 and consumer.commits == []
    assert bridge.poll_once() == 3
    assert [m.run_number for _, m in publisher.sent] == [10, 11, 12]
    assert {topic for topic, _ in publisher.sent} == {RUN_COMPLETIONS}
    assert consumer.commits == [3]  # committed once, past the last message handled


def test_a_bug_on_one_message_dead_letters_it(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    publisher = FlakyPublisher(failures=0)
    bridge = LegacyDataReadyBridge(settings, publisher=publisher)  # type: ignore[arg-type]
    with_log(bridge, [Message(topic="data_ready", partition=0, offset=7, value=b"{}")])
    monkeypatch.setattr(bridge, "convert", lambda msg: 1 / 0)
    assert bridge.poll_once() == 1
    [(topic, letter)] = publisher.sent
    assert topic == DEAD_LETTER and "ZeroDivisionError" in letter.reason and letter.offset == 7


def test_triggers_are_pluggable_by_name_or_import_path() -> None:
    assert trigger_class("legacy") is LegacyDataReadyBridge
    assert trigger_class("runner.triggers.legacy:LegacyDataReadyBridge") is LegacyDataReadyBridge
    with pytest.raises(ValueError, match="unknown trigger"):
        trigger_class("runner.bus.models:RunCompletion")  # not a Trigger
