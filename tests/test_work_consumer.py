"""The consumption layer: offset tracking, pause state across rebalances, rewinds, and topic tables.

Units use a stand-in for librdkafka's consumer (the real one needs a broker); the last tests run
the same classes against the real embedded broker.
"""

from __future__ import annotations

import threading
from typing import Any

import pytest
from confluent_kafka import Message, TopicPartition

from runner.bus.clients import Publisher
from runner.bus.models import JobState, StatusEvent
from runner.bus.status import StatusView, supersedes
from runner.bus.table import TopicTable
from runner.bus.topics import REDUCTION_REQUESTS, RUN_COMPLETIONS, TRIGGER_STATE
from runner.bus.work import OffsetTracker, WorkConsumer
from runner.config import Settings
from runner.triggers.lastrun import LastRunState


def message(offset: int, partition: int = 0, topic: str = "t", value: bytes = b"x") -> Message:
    return Message(topic=topic, partition=partition, offset=offset, value=value)


# -- offset tracker ---------------------------------------------------------------------------------------
def test_committable_stops_at_the_lowest_message_in_flight() -> None:
    tracker = OffsetTracker()
    for offset in (10, 11, 12):
        tracker.start(message(offset))
    assert tracker.committable() == [TopicPartition("t", 0, 10)]  # nothing finished yet: the position stays
    tracker.finish(message(11))
    assert tracker.committable() == [TopicPartition("t", 0, 10)]  # 10 still running: 11 must not be skipped
    tracker.finish(message(10))
    assert tracker.committable() == [TopicPartition("t", 0, 12)]
    tracker.finish(message(12))
    assert tracker.committable() == [TopicPartition("t", 0, 13)] and tracker.in_flight() == 0


def test_partitions_are_tracked_apart_and_commits_are_not_repeated() -> None:
    tracker = OffsetTracker()
    tracker.start(message(5, partition=0))
    tracker.start(message(7, partition=1))
    tracker.finish(message(5, partition=0))
    assert tracker.committable() == [TopicPartition("t", 0, 6), TopicPartition("t", 1, 7)]
    assert tracker.committable([("t", 1)]) == [TopicPartition("t", 1, 7)]
    tracker.committed([TopicPartition("t", 0, 6), TopicPartition("t", 1, 7)])
    assert tracker.committable() == []  # nothing new to commit
    tracker.finish(message(7, partition=1))
    assert tracker.committable() == [TopicPartition("t", 1, 8)]


def test_a_forgotten_partition_is_never_committed() -> None:
    tracker = OffsetTracker()
    tracker.start(message(3))
    tracker.forget([("t", 0)])
    tracker.finish(message(3))  # the work finished after the partition went to another runner
    assert tracker.committable() == [] and tracker.in_flight() == 0


# -- work consumer ----------------------------------------------------------------------------------------
class FakeConsumer:
    """librdkafka stand-in: a log per partition, pause flags that survive re-assignment like librdkafka's."""

    def __init__(self, log: list[Message]):
        self.log = log
        self.position = 0
        self.assigned: list[TopicPartition] = []
        self.paused: set[tuple[str, int]] = set()
        self.commits: list[list[tuple[str, int, int]]] = []
        self.callbacks: dict[str, Any] = {}

    def subscribe(self, topics: list[str], **callbacks: Any) -> None:
        self.callbacks = callbacks

    def assignment(self) -> list[TopicPartition]:
        return list(self.assigned)

    def pause(self, partitions: list[TopicPartition]) -> None:
        self.paused |= {(p.topic, p.partition) for p in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self.paused -= {(p.topic, p.partition) for p in partitions}

    def poll(self, timeout: float) -> Message | None:
        batch = self.consume(1, timeout)
        return batch[0] if batch else None

    def consume(self, num_messages: int, timeout: float) -> list[Message]:
        batch = []
        while self.position < len(self.log) and len(batch) < num_messages:
            msg = self.log[self.position]
            if (msg.topic(), msg.partition()) in self.paused:
                break
            batch.append(msg)
            self.position += 1
        return batch

    def commit(self, offsets: list[TopicPartition], asynchronous: bool) -> None:
        self.commits.append([(tp.topic, tp.partition, tp.offset) for tp in offsets])

    def seek(self, partition: TopicPartition) -> None:
        self.position = next(i for i, m in enumerate(self.log) if m.offset() == partition.offset)

    def close(self) -> None:
        pass

    # what the group coordinator does
    def rebalance(self, partitions: list[TopicPartition]) -> None:
        self.callbacks["on_revoke"](self, self.assigned)
        self.assigned = partitions  # librdkafka keeps the pause flags of these partitions as they were
        self.callbacks["on_assign"](self, partitions)


@pytest.fixture
def work(settings: Settings) -> tuple[WorkConsumer, FakeConsumer]:
    fake = FakeConsumer([message(i, topic=RUN_COMPLETIONS) for i in range(6)])
    fake.assigned = [TopicPartition(RUN_COMPLETIONS, 0)]
    return WorkConsumer(settings, "g", [RUN_COMPLETIONS], consumer=fake), fake  # type: ignore[arg-type]


def test_takes_at_most_what_the_caller_can_take_and_pauses_when_full(work) -> None:
    consumer, fake = work
    assert [m.offset() for m in consumer.poll(2)] == [0, 1]
    assert consumer.poll(0) == [] and fake.paused == {(RUN_COMPLETIONS, 0)}
    consumer.done(fake.log[1])
    assert consumer.commit() and fake.commits == [[(RUN_COMPLETIONS, 0, 0)]]  # 0 still running: position 0
    consumer.done(fake.log[0])
    consumer.commit()
    assert fake.commits[-1] == [(RUN_COMPLETIONS, 0, 2)]
    assert [m.offset() for m in consumer.poll(3)] == [2, 3, 4] and fake.paused == set()


def test_a_rebalance_while_full_keeps_the_wanted_pause_state(work) -> None:
    """The broker-outage bug: busy -> paused -> revoke/assign -> the partition must fetch again once free."""
    consumer, fake = work
    consumer.poll(2)
    consumer.poll(0)  # all slots busy: paused
    consumer.done(fake.log[0])
    fake.rebalance([TopicPartition(RUN_COMPLETIONS, 0)])
    assert fake.commits == [[(RUN_COMPLETIONS, 0, 1)]]  # finished work committed on revoke
    assert fake.paused == {(RUN_COMPLETIONS, 0)}  # still full: still paused
    consumer.done(fake.log[1])  # the work of a revoked partition finishes later: never committed by us
    assert consumer.commit() and len(fake.commits) == 1
    assert [m.offset() for m in consumer.poll(2)] == [2, 3]  # free again: resumed and fetching
    fake.paused = {(RUN_COMPLETIONS, 0)}  # librdkafka remembered an old pause across the re-assignment
    fake.rebalance([TopicPartition(RUN_COMPLETIONS, 0)])
    assert fake.paused == set(), "a partition assigned while the runner has free slots must be resumed"


def test_rewind_offers_unhandled_messages_again(work) -> None:
    consumer, _ = work
    batch = consumer.poll(4)
    consumer.done(batch[0])
    consumer.rewind(batch[1:])
    assert [m.offset() for m in consumer.poll(4)] == [1, 2, 3, 4]


# -- topic tables -----------------------------------------------------------------------------------------
def status(job: str, state: JobState, minute: int) -> StatusEvent:
    from datetime import UTC, datetime

    return StatusEvent(job_id=job, state=state, timestamp=datetime(2026, 1, 1, 12, minute, tzinfo=UTC))


def test_status_order_a_final_state_is_never_replaced_by_a_non_final_one(settings: Settings) -> None:
    view = StatusView(settings)
    view.put(status("a", JobState.SUCCEEDED, 5))
    assert view.put(status("a", JobState.QUEUED, 9)) is None  # a redelivery's "queued", newer by the clock
    assert view.get("a").state is JobState.SUCCEEDED
    view.put(status("b", JobState.RUNNING, 5))
    assert view.put(status("b", JobState.QUEUED, 4)) is None  # older, both non-final: the later event stays
    assert view.put(status("b", JobState.FAILED, 1)) is not None  # final beats non-final whatever the clock
    assert supersedes(status("c", JobState.FAILED, 2), status("c", JobState.SUCCEEDED, 1))  # final vs final: later


def test_tables_fold_keys_prefixes_and_tombstones(settings: Settings) -> None:
    table = TopicTable(settings, TRIGGER_STATE, LastRunState, prefix="lastrun:")
    state = LastRunState(instrument="MARI", last_run=7).to_bytes()
    assert table.apply(b"lastrun:MARI", state) is not None
    assert table.apply(b"health:lastrun", state) is None  # another table's key
    assert table.apply(b"lastrun:WISH", b"not json") is None and table.invalid == 1
    assert table.get("MARI").last_run == 7
    table.apply(b"lastrun:MARI", None)  # tombstone
    assert table.get("MARI") is None and len(table) == 0


@pytest.mark.broker
def test_table_follows_live_and_knows_when_it_caught_up(broker: Settings) -> None:
    publisher = Publisher(broker)
    publisher.publish(TRIGGER_STATE, LastRunState(instrument="MARI", last_run=1), key="lastrun:MARI")
    table = TopicTable(broker, TRIGGER_STATE, LastRunState, prefix="lastrun:")
    stop = threading.Event()
    seen: list[int] = []
    table.start(stop, on_change=lambda s: seen.append(s.last_run))
    try:
        assert table.caught_up.wait(30)
        publisher.publish(TRIGGER_STATE, LastRunState(instrument="MARI", last_run=2), key="lastrun:MARI")
        publisher.publish(TRIGGER_STATE, None, key="lastrun:MARI")
        for _ in range(300):
            if seen == [1, 2] and table.get("MARI") is None:
                break
            stop.wait(0.1)
        assert seen == [1, 2] and table.get("MARI") is None
    finally:
        stop.set()
        publisher.close()


@pytest.mark.broker
def test_work_consumer_commits_only_finished_work_on_the_real_broker(broker: Settings) -> None:
    publisher = Publisher(broker)
    for _ in range(3):
        publisher.publish(REDUCTION_REQUESTS, b"{}", key="one-partition")  # values do not matter here
    publisher.close()
    consumer = WorkConsumer(broker, "test-work", [REDUCTION_REQUESTS])
    taken: list[Message] = []
    for _ in range(100):
        taken += consumer.poll(3 - len(taken), timeout=0.5)
        if len(taken) == 3:
            break
    assert len(taken) == 3
    consumer.done(taken[0])
    assert consumer.commit()
    consumer.close()
    again = WorkConsumer(broker, "test-work", [REDUCTION_REQUESTS])  # a new member starts at the commit
    redelivered: list[Message] = []
    for _ in range(100):
        redelivered += again.poll(3, timeout=0.5)
        if len(redelivered) >= 2:
            break
    again.close()
    assert [m.offset() for m in taken] == [0, 1, 2]
    assert [m.offset() for m in redelivered] == [1, 2]  # the first was done and committed, the others were not
