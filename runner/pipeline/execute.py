"""Execute one template with papermill on a provided kernel, with a whole-run time limit.

papermill has per-cell timeouts only; a whole-run limit is enforced here by a watchdog that kills the
kernel, which nbclient then reports as a dead kernel. A kernel that dies for any other reason (OOM,
kill) ends the run the same way, with a clear reason instead of a hang.
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
from runner.pipeline.inspection import error_from_notebook, scraps_from_kernel, scraps_summary
from runner.pipeline.progress import RunProgress
from runner.pipeline.provenance import kernel_record

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
    km = kernels.acquire(kernel_name, cwd=cwd)
    kernel_info = kernel_record(km)
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
    try:
        papermill.execute_notebook(
            str(template_path),
            str(output_path),
            parameters=parameters,
            engine_name=ENGINE_NAME,
            kernel_name=kernel_name,
            km=km,
            progress_bar=False,
            request_save_on_cell_execute=True,
            autosave_cell_every=10,
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
        state, reason = JobState.FAILED, f"execution failed: {type(exc).__name__}: {exc}"
        error = ErrorInfo(ename=type(exc).__name__, evalue=str(exc))
    scraps: dict[str, Any] | None = None
    try:
        if output_path.exists() and not timed_out.is_set():
            scraps = scraps_from_kernel(km, output_path)
    except Exception as exc:  # dead kernel, or an environment that cannot read them: read them here
        log.info("scraps not read in the kernel (%s); reading them in the runner", exc)
    finally:
        watchdog.cancel()
        kernels.release(km)
    if scraps is None:
        scraps = scraps_summary(output_path) if output_path.exists() else {}
    finished = utcnow()
    started_at = started.isoformat()
    _finalise_notebook(output_path, kernel_name, kernel_info.get("display_name"), state, reason,
                       {**(metadata or {}), "kernel": kernel_info, "started_at": started_at,
                        "finished_at": finished.isoformat()})
    if state is JobState.FAILED and error is not None and error.cell_index is None and output_path.exists():
        error = error_from_notebook(nbformat.read(output_path, as_version=4)) or error
    return Execution(state, started, finished, kernel_name, kernel_info, error, reason, scraps)


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
    spec = nb.metadata.setdefault("kernelspec", {})
    spec["name"] = kernel_name
    if display_name:
        spec["display_name"] = display_name
    nb.metadata["nbreduce"] = {**metadata, "state": state.value, **({"reason": reason} if reason else {})}
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
