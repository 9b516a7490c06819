"""End to end on the real embedded broker: run completion / request -> runner -> archive -> status.

One runner serves the module (a group join costs ~3 s); the scenarios run against it concurrently.
"""

from __future__ import annotations

import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path

import nbformat
import psutil
import pytest
from pipeline_support import running_platform

from runner.bus.clients import Publisher, read_topic
from runner.bus.models import DeadLetter, JobState, RunCompletion, StatusEvent
from runner.bus.topics import DEAD_LETTER, REDUCTION_STATUS, RUN_COMPLETIONS
from runner.config import Settings
from runner.pipeline.reduce import job_id_for
from runner.pipeline.submit import submit_request, wait_for_jobs


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with running_platform(tmp_path_factory.mktemp("pipeline"), NBREDUCE_RUNNER__FILE_WAIT_SECONDS="6",
                          NBREDUCE_RUNNER__MAX_PARALLEL="3") as settings:
        yield settings


def data_file(settings: Settings, name: str, content: bytes = b"counts") -> Path:
    path = settings.data_roots[0] / name
    path.write_bytes(content)
    return path


def complete(settings: Settings, **fields) -> str:
    """Publish a run completion and return its job id."""
    message = RunCompletion(message_id=os.urandom(8).hex(), **fields)
    Publisher(settings).publish(RUN_COMPLETIONS, message, key=message.instrument)
    return job_id_for(RUN_COMPLETIONS, -1, -1, message.message_id)


def events_of(settings: Settings, job_id: str) -> list[StatusEvent]:
    return [e for e in (StatusEvent.from_bytes(m.value()) for m in read_topic(settings, REDUCTION_STATUS))
            if e.job_id == job_id]


def test_happy_path_request_to_read_only_archive(platform: Settings) -> None:
    path = data_file(platform, "ECHO00000001.nxs.txt")
    job = submit_request(platform, instrument="ECHO", run_number=1, data=str(path), rb_number="1920001",
                         reduction_arguments={"scale": 2.5}, requested_by="alice")
    final = wait_for_jobs(platform, {job}, 120)[job]
    assert final.state is JobState.SUCCEEDED, final.reason
    assert final.version == 1 and final.requested_by == "alice"
    version_dir = platform.archive / "ECHO" / "RB1920001" / "1" / "v1"
    assert final.notebook == "ECHO/RB1920001/1/v1/ECHO_1.ipynb"
    # parameters: template default < instrument.toml < override; identity injected
    assert final.parameters["scale"] == 2.5 and final.parameters["label"] == "from-toml"
    assert final.parameters["output_dir"] == str(version_dir)
    # scraps read with scrapbook; the kernel ran in the version folder
    assert {k: final.scraps[k] for k in ("run", "scale", "label", "cwd")} == {
        "run": 1, "scale": 2.5, "label": "from-toml", "cwd": str(version_dir)}
    assert final.output_files == ["ECHO/RB1920001/1/v1/result.txt"]
    assert (version_dir / "result.txt").read_text() == "1 2.5"
    # read-only files and folder; record written
    for p in [version_dir, *version_dir.iterdir()]:
        assert not p.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH), p
    record = StatusEvent.model_validate_json((version_dir / "job.json").read_text())
    assert record.job_id == job and record.state is JobState.SUCCEEDED
    nb = nbformat.read(version_dir / "ECHO_1.ipynb", as_version=4)
    assert nb.metadata.nbreduce.job_id == job
    assert nb.metadata.kernelspec.name == final.kernel
    assert [e.state for e in events_of(platform, job)] == [JobState.QUEUED, JobState.RUNNING, JobState.SUCCEEDED]


def test_second_request_for_same_run_is_a_new_version(platform: Settings) -> None:
    path = data_file(platform, "ECHO00000002.txt")
    first = submit_request(platform, instrument="ECHO", run_number=2, data=str(path), rb_number="1920001")
    wait_for_jobs(platform, {first}, 120)
    second = submit_request(platform, instrument="ECHO", run_number=2, data=str(path), rb_number="1920001",
                            reduction_arguments={"label": "rerun"}, rerun_of=first)
    final = wait_for_jobs(platform, {second}, 120)[second]
    assert final.version == 2 and final.rerun_of == first
    run_dir = platform.archive / "ECHO" / "RB1920001" / "2"
    assert sorted(p.name for p in run_dir.iterdir()) == ["v1", "v2"]
    assert (run_dir / "v1" / "job.json").exists()


def test_failing_notebook_is_kept_with_its_traceback(platform: Settings) -> None:
    path = data_file(platform, "FAIL1.txt")
    job = complete(platform, instrument="FAIL", run_number=7, data=str(path), rb_number="1920002")
    final = wait_for_jobs(platform, {job}, 120)[job]
    assert final.state is JobState.FAILED
    assert final.error is not None and final.error.ename == "ValueError"
    assert "bad calibration for run 7" in final.error.evalue
    assert final.error.cell_index is not None and "raise ValueError" in (final.error.cell_source or "")
    nb = nbformat.read(platform.archive / final.notebook, as_version=4)
    assert any("papermill-error-cell-tag" in c.metadata.get("tags", []) for c in nb.cells)  # papermill's banner


def test_timeout_kills_the_kernel(platform: Settings) -> None:
    path = data_file(platform, "SLOW1.txt")
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    job = complete(platform, instrument="SLOW", run_number=3, data=str(path), rb_number="1920003")
    final = wait_for_jobs(platform, {job}, 120)[job]
    assert final.state is JobState.TIMED_OUT
    assert "time limit of 3 s" in (final.reason or "")
    nb = nbformat.read(platform.archive / final.notebook, as_version=4)
    assert "nbreduce-error" in nb.cells[0].metadata.get("tags", [])
    leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before
                and "ipykernel" in " ".join(p.cmdline()) and p.status() != psutil.STATUS_ZOMBIE]
    assert not [p for p in leftover if "SLOW" in str(p.cwd())]


@pytest.mark.parametrize(("instrument", "why"), [("OFF", "disabled"), ("NOSUCH", "no template")])
def test_disabled_or_unknown_instrument_is_skipped(platform: Settings, instrument: str, why: str) -> None:
    path = data_file(platform, f"{instrument}.txt")
    job = complete(platform, instrument=instrument, run_number=4, data=str(path), rb_number="1920004")
    final = wait_for_jobs(platform, {job}, 60)[job]
    assert final.state is JobState.SKIPPED and why in (final.reason or "")


def test_missing_data_file_fails_after_bounded_wait(platform: Settings) -> None:
    missing = platform.data_roots[0] / "never-written.nxs"
    job = complete(platform, instrument="ECHO", run_number=5, data=str(missing), rb_number="1920001")
    final = wait_for_jobs(platform, {job}, 60)[job]
    assert final.state is JobState.FAILED and "not readable after" in (final.reason or "")


def test_file_appearing_late_is_waited_for(platform: Settings) -> None:
    late = platform.data_roots[0] / "late.txt"
    job = complete(platform, instrument="ECHO", run_number=6, data=str(late), rb_number="1920001")
    threading.Timer(1.5, late.write_text, args=("now",)).start()
    final = wait_for_jobs(platform, {job}, 120)[job]
    assert final.state is JobState.SUCCEEDED, final.reason


BAD_MESSAGES = {
    "not json": (b"{not json", "invalid message"),
    "wrong types": (json.dumps({"instrument": "ECHO", "run_number": "abc", "data": 5}).encode(), "run_number"),
    "instrument traversal": (json.dumps({"instrument": "../../etc", "run_number": 1, "rb_number": "1920001",
                                         "data": "/x"}).encode(), "instrument"),
    "rb traversal": (json.dumps({"instrument": "ECHO", "run_number": 1, "rb_number": "../1", "data": "/x"}).encode(),
                     "rb_number"),
    "negative run": (json.dumps({"instrument": "ECHO", "run_number": -3, "rb_number": "1", "data": "/x"}).encode(),
                     "run_number"),
    "outside data roots": (json.dumps({"instrument": "ECHO", "run_number": 8, "rb_number": "1920001",
                                       "data": "/etc/passwd", "message_id": "outside-1"}).encode(), "outside"),
    "unknown parameter": (None, "unknown parameter"),
}


def test_bad_messages_go_to_dead_letter_and_runner_survives(platform: Settings) -> None:
    publisher = Publisher(platform)
    good = data_file(platform, "ECHO-param.txt")
    BAD_MESSAGES["unknown parameter"] = (
        json.dumps({"instrument": "ECHO", "run_number": 9, "rb_number": "1920001", "data": str(good),
                    "message_id": "unknown-param-1", "reduction_arguments": {"sacle": 3}}).encode(),
        "unknown parameter")
    sent = {}
    for name, (raw, _) in BAD_MESSAGES.items():
        publisher.publish(RUN_COMPLETIONS, raw, key=name.encode())
        sent[name] = raw
    # the runner still works afterwards
    ok = complete(platform, instrument="ECHO", run_number=10, data=str(good), rb_number="1920001")
    assert wait_for_jobs(platform, {ok}, 120)[ok].state is JobState.SUCCEEDED
    import time

    deadline = time.monotonic() + 60
    letters: dict[bytes, DeadLetter] = {}
    while time.monotonic() < deadline and len(letters) < len(sent):
        letters = {d.key: d for d in (DeadLetter.from_bytes(m.value()) for m in read_topic(platform, DEAD_LETTER))}
        time.sleep(0.5)
    for name, (raw, reason) in BAD_MESSAGES.items():
        letter = letters[name.encode()]
        assert letter.value == raw, name  # original bytes kept
        assert reason in letter.reason, (name, letter.reason)
        assert letter.source_topic == RUN_COMPLETIONS and letter.offset is not None
    # identifiable rejections are visible as job states
    outside = job_id_for(RUN_COMPLETIONS, -1, -1, "outside-1")
    assert [e.state for e in events_of(platform, outside)][-1] is JobState.REJECTED
    # nothing was written outside the archive
    assert not (platform.archive.parent / "etc").exists()


def test_override_of_the_wrong_type_is_rejected_by_the_runner(platform: Settings) -> None:
    """Requests can bypass the portal's form (straight to Kafka): the runner checks types itself."""
    path = data_file(platform, "ECHO-types.txt")
    job = submit_request(platform, instrument="ECHO", run_number=12, data=str(path), rb_number="1920001",
                         reduction_arguments={"scale": "__import__('os').system('id')"})
    final = wait_for_jobs(platform, {job}, 60)[job]
    assert final.state is JobState.REJECTED
    assert "scale: Input should be a valid number" in (final.reason or "")


def test_a_job_reserved_by_another_runner_is_not_taken_over(tmp_path: Path) -> None:
    """A rebalance can hand one message to two runners: the second must not clear the first one's work."""
    from runner.archive.store import Archive, ReservationBusy

    archive = Archive(tmp_path / "archive")
    first = archive.reserve("job-1", "ECHO", "1920001", [1])
    with pytest.raises(ReservationBusy):
        archive.reserve("job-1", "ECHO", "1920001", [1])
    archive.release(first)
    again = archive.reserve("job-1", "ECHO", "1920001", [1])
    assert again.version == 1
    archive.release(again)


def test_kafka_client_properties_from_the_environment(settings: Settings) -> None:
    from runner.bus.clients import client_config

    config = client_config(Settings.from_env({
        "NBREDUCE_HOME": str(settings.home), "NBREDUCE_BROKER__BOOTSTRAP_SERVERS": "broker:9093",
        "NBREDUCE_BROKER__KAFKA__SECURITY_PROTOCOL": "SASL_SSL", "NBREDUCE_BROKER__KAFKA__SASL_MECHANISM": "SCRAM",
        "OTHER": "x"}))
    assert config["bootstrap.servers"] == "broker:9093"
    assert config["security.protocol"] == "SASL_SSL" and config["sasl.mechanism"] == "SCRAM"


def test_runner_serves_only_its_environments(tmp_path: Path) -> None:
    from pipeline_support import FIXTURE_NOTEBOOKS

    from runner.pipeline.reduce import serves
    from runner.templates.registry import TemplateRegistry

    settings = Settings.from_env({"NBREDUCE_HOME": str(tmp_path), "NBREDUCE_NOTEBOOKS": str(FIXTURE_NOTEBOOKS),
                                  "NBREDUCE_RUNNER__ENVIRONMENTS": "minimal"})
    registry = TemplateRegistry(settings.notebooks)
    request = {"run_number": 1, "data": "/x"}
    assert serves(settings, registry, RunCompletion(instrument="MINI", **request))  # environment minimal
    assert not serves(settings, registry, RunCompletion(instrument="ECHO", **request))  # python3, another group
    assert serves(settings, registry, RunCompletion(instrument="NOSUCH", **request))  # reported as skipped
