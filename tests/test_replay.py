"""Dead-letter replay against the real embedded broker: original bytes, replay header, once only."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from runner.bus.clients import Publisher, read_topic
from runner.bus.models import DeadLetter
from runner.bus.replay import ReplayError, replay, replayed
from runner.bus.topics import DEAD_LETTER, REDUCTION_REQUESTS, REPLAY_HEADER, REPLAY_ID_HEADER, RUN_COMPLETIONS
from runner.cli.replay import replay_command
from runner.config import Settings

pytestmark = pytest.mark.broker

#: Bytes as a facility producer sent them: spacing, key order and non-ASCII must come back unchanged.
ORIGINAL = b'{"instrument": "mari",  "run_number": 25581, "data": "/archive/MAR25581.nxs", "run_title": "V \xc3\x85"}'


def dead_letter(settings: Settings, reason: str, topic: str = RUN_COMPLETIONS, value: bytes = ORIGINAL,
                key: bytes | None = b"MARI") -> DeadLetter:
    letter = DeadLetter.wrap(reason, topic, value, key, partition=3, offset=17, reporter="test")
    publisher = Publisher(settings)
    publisher.publish(DEAD_LETTER, letter, key=key)
    publisher.close()
    return letter


def test_replayed_once_with_header_and_identical_bytes(broker: Settings) -> None:
    letter = dead_letter(broker, "no template for instrument MARI")
    dead_letter(broker, "invalid RB number", topic=REDUCTION_REQUESTS)  # not selected below

    [result] = replay(broker, [letter.dead_letter_id], replayed_by="tester")
    assert result.status == "replayed", result.detail
    [msg] = list(read_topic(broker, RUN_COMPLETIONS))
    assert msg.value() == ORIGINAL and msg.key() == b"MARI"
    headers = dict(msg.headers() or [])
    assert headers[REPLAY_HEADER] == letter.dead_letter_id.encode()
    assert headers[REPLAY_ID_HEADER] == result.replay_id.encode()
    assert (msg.partition(), msg.offset()) == (result.partition, result.offset)
    record = replayed(broker)[letter.dead_letter_id]
    assert (record.replayed_by, record.target_topic, record.offset, record.forced) == (
        "tester", RUN_COMPLETIONS, msg.offset(), False)
    assert record.reason == "no template for instrument MARI"

    # once only: the same selection again is skipped and sends nothing
    [again] = replay(broker, reason="NO TEMPLATE")
    assert again.status == "skipped" and "already replayed" in again.detail and "tester" in again.detail
    assert len(list(read_topic(broker, RUN_COMPLETIONS))) == 1

    # --force sends it again as a distinct replay
    [forced] = replay(broker, [letter.dead_letter_id], force=True)
    assert forced.status == "replayed" and forced.replay_id != result.replay_id
    assert [m.value() for m in read_topic(broker, RUN_COMPLETIONS)] == [ORIGINAL, ORIGINAL]
    assert replayed(broker)[letter.dead_letter_id].forced


def test_refuses_foreign_topics_and_selects_carefully(broker: Settings) -> None:
    foreign = dead_letter(broker, "not a flatbuffers message", topic="MARI_runInfo", value=b"\x00\x01garbage")
    keyless = dead_letter(broker, "no data root configured for /data", topic=REDUCTION_REQUESTS, key=None)

    with pytest.raises(ReplayError, match="--all"):
        replay(broker)
    [missing] = replay(broker, ["missing"])
    assert missing.status == "not-found"
    results = {r.dead_letter_id: r for r in replay(broker, all_letters=True, dry_run=True)}
    assert results[foreign.dead_letter_id].status == "refused"
    assert "not an nbreduce input topic" in results[foreign.dead_letter_id].detail
    assert results[keyless.dead_letter_id].status == "would-replay"
    assert list(read_topic(broker, REDUCTION_REQUESTS)) == [] and replayed(broker) == {}  # dry run: nothing sent

    cli = CliRunner().invoke(replay_command, ["--id", foreign.dead_letter_id])
    assert cli.exit_code == 1 and "refused" in cli.output and "MARI_runInfo" in cli.output
    assert list(read_topic(broker, "MARI_runInfo")) == [] and replayed(broker) == {}

    cli = CliRunner().invoke(replay_command, ["--topic", REDUCTION_REQUESTS, "--json"])
    assert cli.exit_code == 0, cli.output
    [result] = json.loads(cli.output)
    assert result["status"] == "replayed" and result["dead_letter_id"] == keyless.dead_letter_id
    [msg] = list(read_topic(broker, REDUCTION_REQUESTS))
    assert msg.key() is None and msg.value() == ORIGINAL
    assert dict(msg.headers())[REPLAY_HEADER] == keyless.dead_letter_id.encode()
