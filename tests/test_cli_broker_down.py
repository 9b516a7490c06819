"""The command line with the broker away: one clear line and a non-zero exit, never a traceback (measured: 22 s
then exit 1, or a traceback after 30-45 s). How long it takes is measured by the chaos suite, not asserted here."""

from __future__ import annotations

import os
import subprocess
import sys

import psutil
import pytest

from runner.bus.embedded import EmbeddedBroker
from runner.config import Settings

COMMANDS = [["runs"], ["dead-letters"], ["runners"], ["triggers"],
            ["submit", "-i", "MARI", "--run", "1", "--file", "/data/MAR1.nxs"]]


def nbreduce(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "runner.cli", *args], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "NBREDUCE_HOME": str(settings.home), **env})


def one_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    return lines[0]


@pytest.mark.broker
@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: a[0])
def test_a_killed_embedded_broker_is_said_in_one_line(settings: Settings, args: list[str]) -> None:
    broker = EmbeddedBroker(settings)
    state = broker.start(memory=True)
    try:
        psutil.Process(state["pids"]["tansu"]).kill()  # its state file stays, as after a crash
        line = one_line(nbreduce(settings, *args))
        assert "is not running" in line and "nbreduce broker start" in line
    finally:
        broker.stop()


@pytest.mark.parametrize("args", COMMANDS, ids=lambda a: a[0])
def test_an_unreachable_broker_gives_up_within_the_timeout_in_one_line(settings: Settings, args: list[str]) -> None:
    line = one_line(nbreduce(settings, *args, NBREDUCE_BROKER__BOOTSTRAP_SERVERS="127.0.0.1:9",
                             NBREDUCE_BROKER__TIMEOUT_SECONDS="1"))
    assert "broker 127.0.0.1:9 did not answer within 1 s" in line


def test_no_broker_at_all_is_said_in_one_line(settings: Settings) -> None:
    line = one_line(nbreduce(settings, "runs"))
    assert "no broker" in line
