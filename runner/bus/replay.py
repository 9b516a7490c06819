"""``nbreduce replay``: re-inject dead letters once the cause is fixed (a template added, a data root set).

The original bytes and key go back to the original nbreduce input topic with the header
``nbreduce-replay-of: <dead letter id>`` (:data:`runner.bus.topics.REPLAY_HEADER`); the runner derives a new
job id from it, because the original job is already final as ``rejected``. Each replay also carries
``nbreduce-replay-id`` (fresh per replay), so two deliberate replays of one letter can be told apart.

A letter of a huge message keeps only its first bytes (records are bounded); its original is replayed from
the source record it names (topic, partition, offset), checked against the letter's SHA-256, or refused
when that record is gone.

A dead letter is replayed at most once: every replay is recorded in the trigger-state topic under
``replay:<dead letter id>`` after the broker acknowledged it, and recorded letters are skipped unless
forced. (A crash between the two leaves the replay unrecorded; replaying again then gives a second job.)
"""

from __future__ import annotations

import getpass
import hashlib
import socket
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Literal

from confluent_kafka import Consumer, KafkaError, KafkaException, Message, TopicPartition
from pydantic import BaseModel, Field, ValidationError

from runner.bus.clients import Publisher, client_config, producer, read_topic
from runner.bus.models import DeadLetter, WireModel, new_id, utcnow
from runner.bus.table import TopicTable
from runner.bus.topics import (
    DEAD_LETTER,
    REDUCTION_REQUESTS,
    REPLAY_HEADER,
    REPLAY_ID_HEADER,
    RUN_COMPLETIONS,
    TRIGGER_STATE,
)
from runner.config import Settings

REPLAYABLE_TOPICS = (RUN_COMPLETIONS, REDUCTION_REQUESTS)
STATE_PREFIX = "replay:"

Status = Literal["replayed", "would-replay", "skipped", "refused", "not-found", "failed"]


class ReplayError(ValueError):
    """The selection is not acceptable (e.g. nothing named and no ``--all``)."""


class ReplayRecord(WireModel):
    """Bookkeeping of one replay, key ``replay:<dead letter id>`` in the trigger-state topic."""

    kind: Literal["replay"] = "replay"
    dead_letter_id: str
    replay_id: str
    replayed_at: datetime = Field(default_factory=utcnow)
    replayed_by: str
    target_topic: str
    partition: int
    offset: int
    #: Why the message was dead-lettered, so the record reads on its own.
    reason: str
    forced: bool = False


class ReplayResult(BaseModel):
    dead_letter_id: str
    status: Status
    source_topic: str | None = None
    reason: str | None = None
    detail: str | None = None
    replay_id: str | None = None
    partition: int | None = None
    offset: int | None = None


def replay_key(dead_letter_id: str) -> str:
    return f"{STATE_PREFIX}{dead_letter_id}"


def replayed(settings: Settings) -> dict[str, ReplayRecord]:
    """Replays recorded so far, by dead letter id (the last record per id wins)."""
    return dict(TopicTable(settings, TRIGGER_STATE, ReplayRecord, prefix=STATE_PREFIX).load().items())


def dead_letters(settings: Settings) -> list[DeadLetter]:
    """Every readable dead letter, oldest first, each id once."""
    letters: dict[str, DeadLetter] = {}
    for msg in read_topic(settings, DEAD_LETTER):
        try:
            letter = DeadLetter.from_bytes(msg.value() or b"")
        except ValidationError:
            continue
        letters.setdefault(letter.dead_letter_id, letter)
    return list(letters.values())


def original(settings: Settings, letter: DeadLetter, timeout: float = 10) -> bytes | None:
    """The whole original of ``letter``: its own bytes, or (a truncated letter) the source record it names when
    that record is still there and matches the letter's SHA-256; None otherwise."""
    if not letter.value_truncated:
        return letter.value
    if letter.partition is None or letter.offset is None:
        return None
    consumer = Consumer({**client_config(settings), "group.id": "nbreduce-replay", "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(letter.source_topic, letter.partition, letter.offset)])
        msg = consumer.poll(timeout)
    finally:
        consumer.close()
    if msg is None or msg.error() is not None or msg.offset() != letter.offset:
        return None
    value = msg.value() or b""
    return value if hashlib.sha256(value).hexdigest() == letter.value_sha256 else None


def _refusal(letter: DeadLetter) -> str | None:
    if letter.source_topic in REPLAYABLE_TOPICS:
        return None
    return (f"source topic {letter.source_topic!r} is not an nbreduce input topic ({', '.join(REPLAYABLE_TOPICS)}): "
            "it belongs to the facility and other systems consume it too, so the message is not re-sent there; "
            "fix the trigger or the message at its source instead")


def replay(settings: Settings, ids: Sequence[str] = (), reason: str | None = None, topic: str | None = None,
           all_letters: bool = False, dry_run: bool = False, force: bool = False,
           replayed_by: str | None = None, timeout: float = 30) -> list[ReplayResult]:
    """Replay the selected dead letters; filters combine (``ids`` and ``reason`` and ``topic``).

    ``all_letters`` must be given to select without any filter, so a bare call never floods the runners.
    """
    if not (ids or reason or topic or all_letters):
        raise ReplayError("name dead letters with --id, --reason or --topic, or pass --all to replay every one")
    with ThreadPoolExecutor(2) as pool:  # two independent topic reads: each costs a broker round trip or more
        letters_read, done_read = pool.submit(dead_letters, settings), pool.submit(replayed, settings)
        letters, done = letters_read.result(), done_read.result()
    known = {letter.dead_letter_id for letter in letters}
    wanted = set(ids)
    selected = [letter for letter in letters
                if (not wanted or letter.dead_letter_id in wanted)
                and (reason is None or reason.lower() in letter.reason.lower())
                and (topic is None or letter.source_topic == topic)]
    results = [ReplayResult(dead_letter_id=i, status="not-found", detail=f"no dead letter with id {i} on {DEAD_LETTER}")
               for i in ids if i not in known]
    user = replayed_by or f"{getpass.getuser()}@{socket.gethostname()}"
    pending: list[tuple[DeadLetter, ReplayResult, str, list[KafkaError | Message]]] = []
    client = None
    for letter in selected:
        result = ReplayResult(dead_letter_id=letter.dead_letter_id, status="would-replay",
                              source_topic=letter.source_topic, reason=letter.reason)
        results.append(result)
        refusal = _refusal(letter)
        previous = done.get(letter.dead_letter_id)
        if refusal:
            result.status, result.detail = "refused", refusal
        elif previous and not force:
            result.status = "skipped"
            result.detail = (f"already replayed {previous.replayed_at:%Y-%m-%d %H:%M:%S} UTC by {previous.replayed_by} "
                             f"to {previous.target_topic}[{previous.partition}]@{previous.offset}; --force to repeat")
        elif (value := original(settings, letter)) is None:
            result.status = "refused"
            result.detail = (f"the letter keeps {len(letter.value):,} of the message's {letter.value_size:,} bytes and "
                             f"the original is no longer at {letter.source_topic}[{letter.partition}]@{letter.offset}")
        elif not dry_run:
            if client is None:  # not `or`: a Producer's truth value is its queue length
                client = producer(settings)
            result.replay_id = replay_id = new_id()
            delivered: list[KafkaError | Message] = []
            client.produce(letter.source_topic, value=value, key=letter.key,
                           headers=[(REPLAY_HEADER, letter.dead_letter_id.encode()),
                                    (REPLAY_ID_HEADER, replay_id.encode())],
                           on_delivery=lambda err, msg, out=delivered: out.append(msg if err is None else err))
            pending.append((letter, result, replay_id, delivered))
    if client is None:
        return results
    client.flush(timeout)
    publisher = Publisher(settings)
    try:
        for letter, result, replay_id, delivered in pending:
            outcome = delivered[0] if delivered else f"no answer in {timeout:.0f}s"
            if not isinstance(outcome, Message):
                result.status, result.detail = "failed", f"not acknowledged by the broker: {outcome}"
                continue
            record = ReplayRecord(dead_letter_id=letter.dead_letter_id, replay_id=replay_id, replayed_by=user,
                                  target_topic=letter.source_topic, partition=outcome.partition(),
                                  offset=outcome.offset(), reason=letter.reason, forced=letter.dead_letter_id in done)
            result.status, result.partition, result.offset = "replayed", record.partition, record.offset
            try:
                publisher.publish(TRIGGER_STATE, record, key=replay_key(letter.dead_letter_id))
            except KafkaException as exc:  # the replay itself is out: say so rather than hide it behind the error
                result.detail = f"replayed but not recorded ({exc}): a second replay would send it again"
    finally:
        publisher.close()
    return results
