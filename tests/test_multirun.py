"""Multi-run jobs on the real broker: a declared set fires once all its runs completed, exactly once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_support import running_platform

from runner.bus.clients import Publisher, read_topic
from runner.bus.models import JobState, RunCompletion, StatusEvent
from runner.config import Settings
from runner.pipeline.consumer import RUN_COMPLETIONS, job_id_for
from runner.pipeline.submit import wait_for_jobs
from runner.templates.registry import MultiRunSpec
from runner.triggers.base import stable_id
from runner.triggers.multirun import MultiRunDeclaration, MultiRunTrigger, declare


@pytest.fixture
def platform(tmp_path: Path) -> Iterator[Settings]:
    with running_platform(tmp_path / "home") as settings:
        yield settings


def completion(settings: Settings, run: int) -> None:
    path = settings.data_roots[0] / f"ECHO{run}.txt"
    path.write_text("x" * run)
    message = RunCompletion(message_id=f"single-{run}", instrument="ECHO", run_number=run, data=str(path),
                            rb_number="1920077")
    Publisher(settings).publish(RUN_COMPLETIONS, message, key="ECHO")


def drive(trigger: MultiRunTrigger, rounds: int = 8) -> None:
    for _ in range(rounds):
        trigger.step(0.5)


def test_declared_set_fires_once_with_every_run_and_file(platform: Settings) -> None:
    completion(platform, 21)  # completed before the job was declared: still counts
    declare(platform, MultiRunDeclaration(instrument="ECHO", rb_number="1920077", declared_by="carol",
                                          spec=MultiRunSpec(name="sum-21", template="sum", range=(21, 23),
                                                            parameters={"weight": 0.5})))
    trigger = MultiRunTrigger(platform)
    try:
        completion(platform, 22)
        drive(trigger)
        fired = [m for m in read_topic(platform, RUN_COMPLETIONS)
                 if RunCompletion.from_bytes(m.value()).template == "sum"]
        assert fired == []  # run 23 is missing
        completion(platform, 23)
        drive(trigger)
    finally:
        trigger.close()
    # a restarted trigger replays everything and does not fire again
    again = MultiRunTrigger(platform)
    try:
        drive(again)
    finally:
        again.close()
    jobs = [RunCompletion.from_bytes(m.value()) for m in read_topic(platform, RUN_COMPLETIONS)]
    fired = [j for j in jobs if j.template == "sum"]
    assert len(fired) == 1
    job = fired[0]
    assert job.run_number == [21, 22, 23] and job.rb_number == "1920077"
    assert [Path(p).name for p in job.data_files] == ["ECHO21.txt", "ECHO22.txt", "ECHO23.txt"]
    assert job.message_id == stable_id("multirun", "ECHO:sum-21", 21, 22, 23)

    job_id = job_id_for(RUN_COMPLETIONS, -1, -1, job.message_id)
    final = wait_for_jobs(platform, {job_id}, 120)[job_id]
    assert final.state is JobState.SUCCEEDED, final.reason
    assert final.template == "sum" and final.runs == [21, 22, 23]
    assert final.scraps["runs"] == [21, 22, 23] and final.scraps["files"] == 3 and final.scraps["weight"] == 0.5
    assert final.notebook.startswith("ECHO/RB1920077/21-23/v1/")
    assert (platform.archive / "ECHO" / "RB1920077" / "21-23" / "v1" / "sum.txt").read_text() == "[21, 22, 23] 33.0"


def test_instrument_toml_declaration_and_other_experiments(tmp_path: Path) -> None:
    """Static declarations come from instrument.toml; completions of another RB do not count."""
    notebooks = tmp_path / "notebooks"
    import shutil

    from pipeline_support import FIXTURE_NOTEBOOKS

    shutil.copytree(FIXTURE_NOTEBOOKS / "ECHO", notebooks / "ECHO")
    toml = notebooks / "ECHO" / "instrument.toml"
    toml.write_text(toml.read_text().replace("[parameters]", '[[multi_run]]\nname = "pair"\ntemplate = "sum"\n'
                                             'runs = [31, 32]\n\n[parameters]'))
    stop = threading.Event()
    with running_platform(tmp_path / "home", NBREDUCE_NOTEBOOKS=str(notebooks)) as settings:
        completion(settings, 31)
        completion(settings, 32)
        trigger = MultiRunTrigger(settings)
        try:
            drive(trigger)
        finally:
            trigger.close()
            stop.set()
        fired = [RunCompletion.from_bytes(m.value()) for m in read_topic(settings, RUN_COMPLETIONS)]
        fired = [j for j in fired if j.template == "sum"]
        assert [j.run_number for j in fired] == [[31, 32]]
        job_id = job_id_for(RUN_COMPLETIONS, -1, -1, fired[0].message_id)
        final: StatusEvent = wait_for_jobs(settings, {job_id}, 120)[job_id]
        assert final.state is JobState.SUCCEEDED, final.reason
