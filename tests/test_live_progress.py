"""Live progress and warnings end to end: real broker, real runner, real kernels (fixture templates LONG, WARN).

Unit checks of :class:`runner.pipeline.progress.RunProgress` (line splitting, bursts, warnings) sit beside them.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from pipeline_support import running_platform

from runner.bus.models import JobState, ProgressEvent
from runner.bus.table import TopicTable
from runner.bus.topics import REDUCTION_PROGRESS
from runner.config import Settings
from runner.pipeline.progress import MAX_LINES_PER_EVENT, RunProgress
from runner.pipeline.reduce import result_warnings
from runner.pipeline.submit import submit_request, wait_for_jobs


# -- units ---------------------------------------------------------------------------------------------
def test_progress_numbers_code_cells_and_labels_them_by_heading() -> None:
    progress = RunProgress("job")
    progress.begin([{"cell_type": "markdown", "source": "# Title"},
                    {"cell_type": "code", "source": "x = 1"},
                    {"cell_type": "markdown", "source": "## Fit the peaks\ntext"},
                    {"cell_type": "code", "source": ""},
                    {"cell_type": "code", "source": "\nfit()"}])
    progress.cell_start(cell_index=1)
    first = progress.event()
    assert (first.cell, first.cells, first.cell_label) == (1, 2, "Title")
    assert progress.event() is None  # nothing changed since
    progress.cell_start(cell_index=4)
    assert (progress.event().cell, progress.event(force=True).cell_label) == (2, "Fit the peaks")


def test_progress_lines_partial_lines_and_bursts() -> None:
    progress = RunProgress("job")
    progress.write("stdout", "one\ntw")
    progress.write("stdout", "o\n10%\r50%\r100%\n")
    progress.write("stderr", "oops\n")
    event = progress.event()
    assert [(line.stream, line.text) for line in event.lines] == [
        ("stdout", "one"), ("stdout", "two"), ("stdout", "100%"), ("stderr", "oops")]
    assert event.log_offset == 0
    progress.write("stdout", "".join(f"{i}\n" for i in range(1000)))
    burst = progress.event()
    assert len(burst.lines) == MAX_LINES_PER_EVENT and burst.lines[-1].text == "999"
    assert burst.log_offset == 4 + 1000 - MAX_LINES_PER_EVENT  # the skipped lines are counted, not lost silently
    progress.write("stdout", "unterminated")
    progress.done = True
    last = progress.event(force=True)
    assert last.done and [line.text for line in last.lines] == ["unterminated"] and last.fraction == 1.0


def test_python_warnings_only_from_the_notebooks_own_cells() -> None:
    progress = RunProgress("job")
    progress.cell = 3
    progress.write("stderr", "/tmp/ipykernel_4242/1234567.py:5: UserWarning: fit did not converge\n"
                             "  warnings.warn('fit did not converge')\n"
                             "/venv/lib/python3.11/site-packages/matplotlib/x.py:9: DeprecationWarning: old\n")
    assert progress.warnings == ["UserWarning: fit did not converge (cell 3)"]


def test_result_warnings_from_the_scrap() -> None:
    assert result_warnings({}, []) == []
    assert result_warnings({"nbreduce_warnings": []}, []) == []
    assert result_warnings({"nbreduce_warnings": "no elastic line"}, ["UserWarning: x"]) == [
        "no elastic line", "UserWarning: x"]
    assert result_warnings({"nbreduce_warnings": ["a", "a", 3]}, []) == ["a", "3"]
    assert result_warnings({"nbreduce_warnings": {"x": 1}}, [])[0].startswith("nbreduce_warnings is not a list")


# -- end to end ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    with running_platform(tmp_path_factory.mktemp("live")) as settings:
        yield settings


def data_file(settings: Settings, name: str) -> str:
    path = Path(settings.data_roots[0]) / name
    path.write_text("counts")
    return str(path)


@pytest.mark.broker
def test_running_job_publishes_progress_and_log_lines(platform: Settings) -> None:
    seen: list[ProgressEvent] = []
    stop = threading.Event()
    table = TopicTable(platform, REDUCTION_PROGRESS, ProgressEvent, key=lambda e: e.job_id)
    thread = table.start(stop, seen.append)
    try:
        job = submit_request(platform, instrument="LONG", run_number=7, data=data_file(platform, "LONG7.txt"),
                             rb_number="1920001", reduction_arguments={"steps": 4, "step_seconds": 0.6})
        final = wait_for_jobs(platform, {job}, 120)[job]
        assert final.state is JobState.SUCCEEDED, final.reason
        assert final.warnings == [] and final.outcome == "succeeded"
        deadline = threading.Event()
        while not any(e.done for e in seen if e.job_id == job):
            assert not deadline.wait(0.1) and thread.is_alive()
    finally:
        stop.set()
    mine = [e for e in seen if e.job_id == job]
    # parameters, injected parameters and three cells
    assert len(mine) >= 3, mine  # about one event a second, plus the final one
    assert mine[-1].done and mine[-1].cells == 5 and mine[-1].fraction == 1.0
    assert [e.cell for e in mine] == sorted(e.cell for e in mine)  # cells only move forward
    assert any(not e.done and e.cell_label == "Slow loop" for e in mine)
    assert (mine[0].instrument, mine[0].rb_number) == ("LONG", "1920001")
    log: list[str] = []
    for event in mine:
        assert event.log_offset == len(log)  # nothing lost, nothing repeated
        log += [line.text for line in event.lines]
    assert log == ["loading " + final.data[0], *(f"step {i} of 4 done" for i in range(1, 5)), "saved"]
    # a line printed mid-run arrived before the job finished
    first_step = next(e for e in mine if any(line.text == "step 1 of 4 done" for line in e.lines))
    assert not first_step.done and first_step.timestamp < final.finished_at


@pytest.mark.broker
def test_suspect_result_succeeds_with_warnings(platform: Settings) -> None:
    suspect = submit_request(platform, instrument="WARN", run_number=8, data=data_file(platform, "WARN8.txt"),
                             rb_number="1920001")
    clean = submit_request(platform, instrument="WARN", run_number=9, data=data_file(platform, "WARN9.txt"),
                           rb_number="1920001", reduction_arguments={"elastic_found": True})
    done = wait_for_jobs(platform, {suspect, clean}, 120)
    assert done[suspect].state is JobState.SUCCEEDED
    assert done[suspect].warnings == ["no elastic line found", "UserWarning: peak fit did not converge (cell 3)"]
    assert done[suspect].outcome == "succeeded with warnings"
    assert done[clean].warnings == [] and done[clean].outcome == "succeeded"


@pytest.mark.broker
def test_cli_runs_logs_and_diff(platform: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from runner.cli.main import main

    for name, value in platform.to_env().items():
        monkeypatch.setenv(name, value)
    first = submit_request(platform, instrument="WARN", run_number=10, data=data_file(platform, "WARN10.txt"),
                           rb_number="1920001")
    done = wait_for_jobs(platform, {first}, 120)
    second = submit_request(platform, instrument="WARN", run_number=10, data=done[first].data[0], rb_number="1920001",
                            reduction_arguments={"elastic_found": True})
    done.update(wait_for_jobs(platform, {second}, 120))
    cli = CliRunner()
    runs = cli.invoke(main, ["runs", "-i", "WARN"])
    assert runs.exit_code == 0 and "succeeded with warnings" in runs.output and "no elastic line found" in runs.output
    logs = cli.invoke(main, ["logs", first[:10]])
    assert logs.exit_code == 0, logs.output
    assert "peak fit did not converge" in logs.output and "warning: no elastic line found" in logs.output
    diff = cli.invoke(main, ["diff", first[:10], second[:10]])
    assert diff.exit_code == 0, diff.output
    assert "elastic_found: (template default) -> true" in diff.output  # the changed parameter
    assert "elastic_found: false -> true" in diff.output  # and the changed result
    assert "results: 1 changed" in diff.output and "warnings: 1 changed" in diff.output
    assert "notebook (nbdime):" in diff.output and "elastic_found = True" in diff.output
    assert "start_time" not in diff.output  # papermill's timings always differ: left out unless --metadata
