"""The chaos suite at CI size: the scenarios of ``make chaos`` (bench/chaos.py) with fewer runs and shorter faults.

Each scenario runs the real platform (durable embedded broker, runners and the lastrun watcher as processes)
and is judged by what is left: every job archived exactly once and shown ``succeeded``, nothing lost, nothing
duplicated, nothing stale, and the scenario's own checks (the runner said the broker was unreachable, the
archive's real cause was shown, files of killed kernels were cleaned up, ...).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.chaos import QUICK, Result, archive_faults, broker_outages, can_mount, fuzz, kill_storm, two_runners

pytestmark = [pytest.mark.broker, pytest.mark.slow]


def verdict(result: Result) -> None:
    details = "\n".join(result.notes + [f"PROBLEM: {p}" for p in result.problems])
    assert result.passed, f"{result.scenario}: {result.figure()}\n{details}"
    assert result.runs > 0


@pytest.mark.timeout(600)
def test_kill_storm_publishes_every_run_exactly_once(tmp_path: Path) -> None:
    verdict(kill_storm(tmp_path, **QUICK["kill-storm"]))


@pytest.mark.timeout(600)
def test_broker_outages_heal_without_restarting_anything(tmp_path: Path) -> None:
    result = broker_outages(tmp_path, **QUICK["broker-outages"])
    verdict(result)
    assert any("broker unreachable" in note for note in result.notes)


@pytest.mark.timeout(600)
def test_two_runners_share_one_instrument_and_survive_a_kill(tmp_path: Path) -> None:
    verdict(two_runners(tmp_path, **QUICK["two-runners"]))


@pytest.mark.timeout(600)
def test_fuzz_set_every_message_accounted_for(tmp_path: Path) -> None:
    verdict(fuzz(tmp_path, **QUICK["fuzz"]))


@pytest.mark.timeout(600)
@pytest.mark.skipif(not can_mount(), reason="an archive on its own file system needs mount (root, CAP_SYS_ADMIN)")
def test_archive_read_only_then_full(tmp_path: Path) -> None:
    verdict(archive_faults(tmp_path, **QUICK["archive-faults"]))
