"""Execute one template with papermill on a provided kernel, with a whole-run time limit.

papermill has per-cell timeouts only; a whole-run limit is enforced here by a watchdog that kills the
kernel, which nbclient then reports as a dead kernel. A kernel that dies for any other reason (OOM,
kill) ends the run the same way, with a clear reason instead of a hang.

The executed notebook is written once at the end (papermill's saves during the run are throttled by the
engine), already stamped with nbreduce's metadata; scraps are read from the notebook in memory. A full or
read-only archive is raised as the ``OSError`` it is (see :mod:`runner.pipeline.faults`), not turned
into a failed run.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import nbformat
import papermill
from nbclient.exceptions import CellTimeoutError, DeadKernelError
from papermill.exceptions import PapermillExecutionError

from runner.atomic import write_atomic
from runner.bus.models import ErrorInfo, JobState, utcnow
from runner.pipeline.engine import ENGINE_NAME, KernelProvider, kernel_pid, kill_process_tree
from runner.pipeline.faults import archive_fault
from runner.pipeline.inspection import (
    error_from_notebook,
    glued_payloads,
    glued_scraps,
    scraps_from_kernel,
    scraps_summary,
)
from runner.pipeline.progress import RunProgress
from runner.pipeline.provenance import kernel_record, stamp_notebook

log = logging.getLogger(__name__)


@dataclass
class Execution:
    """What happened to one notebook run."""

    state: JobState
    started_at: datetime
    finished_at: datetime
    kernel: str
    #: Kernel, display name, environment and build hash, packages (see runner.pipeline.provenance.kernel_record).
    kernel_info: dict[str, Any] = field(default_factory=dict)
    error: ErrorInfo | None = None
    reason: str | None = None
    scraps: dict[str, Any] = field(default_factory=dict)
    #: Milliseconds: kernel (acquire), execute (papermill), cells (the notebook's own code, kernel-side),
    #: scraps, notebook (stamping the executed notebook).
    timings: dict[str, float] = field(default_factory=dict)


def execute(
    template_path: Path,
    output_path: Path,
    cwd: Path,
    parameters: dict[str, Any],
    kernel_name: str,
    kernels: KernelProvider,
    timeout: float,
    metadata: dict[str, Any] | None = None,
    progress: RunProgress | None = None,
) -> Execution:
    """Run ``template_path`` into ``output_path`` (kept whatever the outcome) in a kernel working in ``cwd``;
    ``progress`` hears of every cell and stream output while it runs (see :mod:`runner.pipeline.progress`)."""
    started = utcnow()
    clock = time.monotonic()
    timings: dict[str, float] = {}

    def timed(phase: str) -> None:
        nonlocal clock
        now = time.monotonic()
        timings[phase] = round((now - clock) * 1000, 2)
        clock = now

    km = kernels.acquire(kernel_name, cwd=cwd)
    kernel_info = kernel_record(km)
    timed("kernel")
    timed_out = threading.Event()

    def kill() -> None:
        # By pid, not km.kill_kernel(): the manager belongs to the thread running the notebook.
        timed_out.set()
        pid = kernel_pid(km)
        log.warning("run exceeded %.0fs: killing kernel %s (pid %s)", timeout, kernel_name, pid)
        if pid is not None:
            kill_process_tree(pid)

    watchdog = threading.Timer(timeout, kill)
    watchdog.daemon = True
    watchdog.start()
    state, error, reason = JobState.SUCCEEDED, None, None
    stamp = {**(metadata or {}), "kernel": kernel_info, "started_at": started.isoformat()}
    nb = None
    try:
        nb = papermill.execute_notebook(
            str(template_path),
            str(output_path),
            parameters=parameters,
            engine_name=ENGINE_NAME,
            kernel_name=kernel_name,
            km=km,
            progress_bar=False,
            request_save_on_cell_execute=True,
            autosave_cell_every=10,
            nbreduce_metadata=stamp,
            **({"progress": progress, "stdout_file": progress.stdout, "stderr_file": progress.stderr}
               if progress is not None else {}),
        )
    except PapermillExecutionError as exc:
        state = JobState.FAILED
        error = ErrorInfo(ename=exc.ename, evalue=exc.evalue, cell_index=exc.cell_index,
                          cell_source=exc.source, traceback=_plain("\n".join(exc.traceback)))
        reason = f"{exc.ename}: {exc.evalue}"
    except (DeadKernelError, CellTimeoutError, RuntimeError) as exc:
        if timed_out.is_set():
            state, reason = JobState.TIMED_OUT, f"run exceeded its time limit of {timeout:.0f} s; kernel killed"
        else:
            state, reason = JobState.FAILED, f"kernel {kernel_name} died during the run ({type(exc).__name__}: {exc})"
        error = ErrorInfo(ename=type(exc).__name__, evalue=reason)
    except Exception as exc:  # kernel failed to start, notebook unreadable, ...
        if archive_fault(exc) is not None:  # the archive cannot take the notebook: not the run's failure
            watchdog.cancel()
            kernels.release(km)
            raise
        state, reason = JobState.FAILED, f"execution failed: {type(exc).__name__}: {exc}"
        error = ErrorInfo(ename=type(exc).__name__, evalue=str(exc))
    timed("execute")
    if nb is not None:
        timings["cells"] = cell_time(nb)
    scraps: dict[str, Any] | None = None
    try:
        if nb is None and output_path.exists():
            nb = _read(output_path)
        if nb is not None:
            payloads = glued_payloads(nb)
            others = [p for p in payloads if p["encoder"] != "json"]
            if others and timed_out.is_set():
                raise RuntimeError("the kernel that glued them was killed")
            # scraps only scrapbook can decode (text, pandas, ...): in the kernel that glued them
            scraps = glued_scraps(payloads, scraps_from_kernel(km, others) if others else None)
    except Exception as exc:  # dead kernel, or an environment that cannot read them: read them here
        log.info("scraps not read in the kernel (%s); reading them in the runner", exc)
        scraps = None
    finally:
        watchdog.cancel()
        kernels.release(km)
    if scraps is None:
        scraps = scraps_summary(output_path) if output_path.exists() else {}
    timed("scraps")
    finished = utcnow()
    if state is not JobState.SUCCEEDED:  # the engine stamped a succeeded run before papermill wrote it
        _finalise_notebook(output_path, kernel_name, kernel_info.get("display_name"), state, reason,
                           {**stamp, "finished_at": finished.isoformat()})
        if state is JobState.FAILED and error is not None and error.cell_index is None and output_path.exists():
            error = error_from_notebook(nbformat.read(output_path, as_version=4)) or error
    timed("notebook")
    return Execution(state, started, finished, kernel_name, kernel_info, error, reason, scraps, timings)


def cell_time(nb: nbformat.NotebookNode) -> float:
    """Milliseconds the notebook's own code ran, as the kernel timed it (execute_input to execute_reply)."""
    total = 0.0
    for cell in nb.cells:
        times = cell.get("metadata", {}).get("execution", {})
        begin, end = times.get("iopub.execute_input"), times.get("shell.execute_reply")
        if begin and end:
            try:
                total += (datetime.fromisoformat(end) - datetime.fromisoformat(begin)).total_seconds()
            except ValueError:
                continue
    return round(total * 1000, 2)


def _read(path: Path) -> nbformat.NotebookNode | None:
    try:
        return nbformat.read(path, as_version=4)
    except Exception as exc:  # a notebook cut short by a killed kernel: nothing to read from it
        log.info("cannot read %s: %s", path, exc)
        return None


def _finalise_notebook(path: Path, kernel_name: str, display_name: str | None, state: JobState,
                       reason: str | None, metadata: dict[str, Any]) -> None:
    """Stamp the kernel that really ran (papermill keeps the template's) and nbreduce's run metadata."""
    if not path.exists():
        return
    for attempt in range(3):
        try:
            nb = nbformat.read(path, as_version=4)
            break
        except Exception:  # papermill may still be flushing an autosave
            if attempt == 2:
                return
            time.sleep(0.1)
    stamp_notebook(nb, kernel_name, display_name, {**metadata, "state": state.value,
                                                    **({"reason": reason} if reason else {})})
    if state in (JobState.TIMED_OUT,) or (state is JobState.FAILED and reason and "kernel" in reason):
        banner = nbformat.v4.new_markdown_cell(
            f'<span style="color:red; font-size:1.4em">**nbreduce: {state.value}** — {reason}</span>'
        )
        banner.metadata["tags"] = ["nbreduce-error"]
        nb.cells.insert(0, banner)
    write_atomic(path, nbformat.writes(nb))


def _plain(text: str) -> str:
    from nbconvert.filters import strip_ansi  # imported on failure only: nbconvert is heavy

    return strip_ansi(text)
