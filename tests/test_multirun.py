"""Multi-run jobs on the real broker: a declared set fires once all its runs completed, exactly once."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pipeline_support import running_platform

from runner.bus.clients import Publisher, read_topic
from runner.bus.models import JobState, RunCompletion, StatusEvent
from runner.bus.topics import RUN_COMPLETIONS, TRIGGER_STATE
from runner.config import Settings
from runner.pipeline.reduce import job_id_for
from runner.pipeline.submit import wait_for_jobs
from runner.templates.registry import MultiRunSpec
from runner.triggers.base import stable_id
from runner.triggers.multirun import DECLARATION_PREFIX, MultiRunDeclaration, MultiRunFired, MultiRunTrigger, declare


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


# -- units: when a multi-run job fires, and when it must not ----------------------------------------------
class RecordingPublisher:
    """Publisher stand-in: what the trigger would send."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, Any, Any]] = []

    def publish(self, topic: str, message: Any, key: Any = None, timeout: float = 30) -> None:
        self.sent.append((topic, message, key))

    def close(self) -> None:
        pass


def trigger_with(settings: Settings, completions: list[RunCompletion], declarations: list[MultiRunDeclaration],
                 fired: list[str] = ()) -> tuple[MultiRunTrigger, RecordingPublisher]:
    """A trigger whose tables already hold these records, as if it had read them from its topics."""
    publisher = RecordingPublisher()
    trigger = MultiRunTrigger(settings, publisher=publisher)  # type: ignore[arg-type]
    for completion in completions:
        trigger.completions.put(completion)
    for declaration in declarations:
        trigger.declared.put(declaration, declaration.key.removeprefix(DECLARATION_PREFIX))
    for message_id in fired:
        trigger.fired.put(MultiRunFired(instrument="ECHO", name="x", runs=[1], message_id=message_id), message_id)
    return trigger, publisher


def run_done(run: int, rb: str = "1920077", **extra: Any) -> RunCompletion:
    return RunCompletion(instrument="ECHO", run_number=run, rb_number=rb, data=f"/data/ECHO{run}.txt", **extra)


def declared(runs: list[int], rb: str | None = None, name: str = "sum-a") -> MultiRunDeclaration:
    return MultiRunDeclaration(instrument="ECHO", rb_number=rb, spec=MultiRunSpec(name=name, template="sum", runs=runs))


def fired_jobs(publisher: RecordingPublisher) -> list[RunCompletion]:
    return [m for topic, m, _ in publisher.sent if topic == RUN_COMPLETIONS]


def test_fires_only_when_every_run_is_in_and_only_once(settings: Settings) -> None:
    trigger, publisher = trigger_with(settings, [run_done(21), run_done(22)], [declared([21, 22, 23])])
    trigger._fire_ready("ECHO")
    assert fired_jobs(publisher) == []  # 23 missing
    trigger.completions.put(run_done(23))
    trigger._fire_ready("ECHO")
    trigger._fire_ready("ECHO")
    [job] = fired_jobs(publisher)
    assert job.runs == [21, 22, 23] and job.template == "sum" and job.rb_number == "1920077"
    assert job.data_files == ["/data/ECHO21.txt", "/data/ECHO22.txt", "/data/ECHO23.txt"]
    marker = [m for topic, m, key in publisher.sent if topic == TRIGGER_STATE]
    assert [m.message_id for m in marker] == [job.message_id]


def test_a_restart_with_the_fired_marker_does_not_fire_again(settings: Settings) -> None:
    first, publisher = trigger_with(settings, [run_done(21), run_done(22)], [declared([21, 22])])
    first._fire_ready("ECHO")
    [job] = fired_jobs(publisher)
    again, republished = trigger_with(settings, [run_done(21), run_done(22)], [declared([21, 22])],
                                      fired=[job.message_id])
    again._fire_ready("ECHO")
    assert fired_jobs(republished) == []


def test_runs_of_other_experiments_and_multi_run_inputs_do_not_count(settings: Settings) -> None:
    trigger, publisher = trigger_with(settings, [run_done(21), run_done(22, rb="1930001")],
                                      [declared([21, 22], rb="1920077")])
    trigger._fire_ready("ECHO")
    assert fired_jobs(publisher) == [] and trigger.health.errors == 1  # reported, not fired
    # a multi-run job's own completion (template set, several runs) is never an input of another
    trigger, publisher = trigger_with(settings, [run_done(31), run_done(32, template="sum")], [declared([31, 32])])
    trigger._fire_ready("ECHO")
    assert fired_jobs(publisher) == []


def test_a_withdrawn_declaration_does_not_fire(settings: Settings) -> None:
    trigger, publisher = trigger_with(settings, [run_done(41), run_done(42)], [declared([41, 42])])
    trigger.declared.apply(f"{DECLARATION_PREFIX}ECHO:sum-a".encode(), None)  # tombstone
    trigger._fire_ready("ECHO")
    assert fired_jobs(publisher) == []


def test_the_same_runs_redeclared_are_the_same_job(settings: Settings) -> None:
    trigger, publisher = trigger_with(settings, [run_done(51), run_done(52)],
                                      [declared([51, 52]), declared([52, 51], name="sum-a")])
    trigger._fire_ready("ECHO")
    assert len(fired_jobs(publisher)) == 1
