"""Shared helpers of the hub/portal tests: a small real template and archived versions of it.

Versions are published with the real :class:`runner.archive.store.Archive` and their status events go to
the real broker, exactly as the runner leaves them, so the portal and the hub see real data.
"""

from __future__ import annotations

import base64
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import nbformat

from runner.archive.store import Archive
from runner.bus.clients import Publisher
from runner.bus.models import ErrorInfo, JobState, StatusEvent, utcnow
from runner.bus.topics import REDUCTION_STATUS
from runner.config import Settings

PARAMETERS_CELL = '''\
data_file = ""
run_number = 0
rb_number = ""
output_dir = "."
ei: float = 25.0  # incident energy (meV); range: 0.5..2000
mode = "powder"  # one of: powder, single-crystal
bins = 100  # range: 1..100000
normalise = True
masks: list[int] = []
label: str = "auto"
'''

WORK_CELL = '''\
import os
import scrapbook as sb
os.makedirs(output_dir, exist_ok=True)
with open(os.path.join(output_dir, "summary.txt"), "w") as f:
    f.write(f"{label} ei={ei} bins={bins}\\n")
sb.glue("ei", ei)
sb.glue("label", label)
print("reduced", run_number, "with ei", ei)
'''

# a 1x1 PNG: a stand-in for a plot in archived notebooks and output files
PNG = base64.b64decode(
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5ErkJggg==")


def write_template(notebooks: Path, instrument: str = "MARI") -> Path:
    folder = notebooks / instrument
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(PARAMETERS_CELL)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {instrument} test reduction"), params,
                nbformat.v4.new_code_cell(WORK_CELL)]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, folder / "reduce.ipynb")
    (folder / "instrument.toml").write_text(f'name = "{instrument}"\ntimeout = 120\nfile_prefix = "MAR"\n')
    return folder / "reduce.ipynb"


def executed_notebook(instrument: str, run: int, parameters: dict[str, Any], failed: bool = False):
    nb = nbformat.v4.new_notebook()
    cell = nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in parameters.items()))
    cell.metadata["tags"] = ["injected-parameters"]
    plot = nbformat.v4.new_code_cell("plot()")
    plot.outputs = [nbformat.v4.new_output("display_data", data={"image/png": base64.b64encode(PNG).decode(),
                                                                 "text/plain": "<Figure>"})]
    script = nbformat.v4.new_code_cell("html()")
    script.outputs = [nbformat.v4.new_output("display_data", data={
        "text/html": "<script>document.title='pwned'</script><b>html output</b>"})]
    nb.cells = [nbformat.v4.new_markdown_cell(f"# {instrument} run {run}"), cell, plot, script]
    if failed:
        nb.cells.append(nbformat.v4.new_code_cell("1/0"))
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    return nb


def archive_job(settings: Settings, *, instrument: str = "MARI", rb: str = "1920001", run: int = 1000,
                title: str = "vanadium", state: JobState = JobState.SUCCEEDED, requested_by: str = "run-detection",
                parameters: dict[str, Any] | None = None, rerun_of: str | None = None,
                job_id: str | None = None) -> StatusEvent:
    """Publish one archived version (notebook, outputs, job.json) and return its final status event."""
    archive = Archive(settings.archive)
    job_id = job_id or uuid.uuid4().hex
    reservation = archive.reserve(job_id, instrument, rb, [run])
    data_file = str(settings.data_roots[0] / f"MAR{run:08d}.nxs")
    params = {"data_file": data_file, "run_number": run, "rb_number": rb, "output_dir": str(reservation.final),
              "ei": 25.0, "mode": "powder", "bins": 100, "normalise": True, "masks": [], "label": "auto",
              **(parameters or {})}
    failed = state is JobState.FAILED
    nbformat.write(executed_notebook(instrument, run, params, failed), reservation.staged_notebook)
    (reservation.final / "summary.txt").write_text(f"run {run}\n")  # templates write to output_dir
    (reservation.final / "spectrum.png").write_bytes(PNG)
    finished = utcnow()
    event = StatusEvent(
        job_id=job_id, state=state, instrument=instrument, run_number=run, rb_number=rb, run_title=title,
        version=reservation.version, requested_by=requested_by, rerun_of=rerun_of, data=[data_file],
        parameters=params, queued_at=finished - timedelta(seconds=30), started_at=finished - timedelta(seconds=20),
        finished_at=finished, notebook=archive.relative(reservation.final / reservation.notebook_name),
        output_files=[archive.relative(reservation.final / n) for n in ("summary.txt", "spectrum.png")],
        scraps={"ei": params["ei"]}, kernel="python3", template_hash="sha256:test",
        error=ErrorInfo(ename="ZeroDivisionError", evalue="division by zero", cell_index=4,
                        traceback="ZeroDivisionError: division by zero") if failed else None,
        reason="ZeroDivisionError in cell 4" if failed else None,
    )
    archive.publish(reservation, event)
    return event


def publish_status(settings: Settings, *events: StatusEvent) -> None:
    publisher = Publisher(settings)
    try:
        for event in events:
            publisher.publish(REDUCTION_STATUS, event, key=event.job_id)
    finally:
        publisher.close()


def seed(settings: Settings) -> dict[str, StatusEvent]:
    """Template + three experiments: alice's MARI RB1920001, bob's WISH RB1920002, another MARI RB."""
    write_template(settings.notebooks, "MARI")
    write_template(settings.notebooks, "WISH")
    jobs = {
        "alice": archive_job(settings, instrument="MARI", rb="1920001", run=1001, title="vanadium alice"),
        "alice_failed": archive_job(settings, instrument="MARI", rb="1920001", run=1002, title="sample alice",
                                    state=JobState.FAILED),
        "bob": archive_job(settings, instrument="WISH", rb="1920002", run=2001, title="bob's crystal"),
        "other": archive_job(settings, instrument="MARI", rb="1930003", run=1003, title="someone else"),
    }
    publish_status(settings, *jobs.values())
    return jobs


MEMBERSHIP = {
    "users": {
        "alice": {"rbs": ["1920001"]},
        "bob": {"rbs": ["1920002"]},
        "carol": {"instruments": ["MARI"]},
        "dave": {"admin": True},
        "erin": {},
    }
}
