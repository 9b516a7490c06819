"""A papermill engine that runs on a kernel nbreduce provides, plus the cold-start kernel provider.

papermill always starts (and owns) a new kernel. nbreduce needs the kernel in hand: to kill it when a
run exceeds its time limit, to give every run its own working directory without papermill's
process-wide ``os.chdir``, and to serve runs from a warm pool. papermill's own client
(:class:`PapermillNotebookClient`) still does the work, so parameter injection, error banners and
per-cell metadata stay papermill's.
"""

from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path
from typing import Any, Protocol

import psutil
from jupyter_client import AsyncKernelManager
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_core.utils import run_sync
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, papermill_engines
from papermill.utils import merge_kwargs, remove_args

from runner.config import Settings

ENGINE_NAME = "nbreduce"


class KernelProvider(Protocol):
    """Hands out one started kernel per run and takes it back afterwards (never reused)."""

    def acquire(self, kernel_name: str, cwd: Path, timeout: float = 60) -> AsyncKernelManager: ...

    def release(self, km: AsyncKernelManager) -> None: ...


def kernel_env(settings: Settings) -> dict[str, str]:
    """Environment of kernels: the project's Jupyter data dir first, so built environments are found."""
    env = dict(os.environ)
    paths = [str(settings.jupyter_dir), *filter(None, env.get("JUPYTER_PATH", "").split(os.pathsep))]
    env["JUPYTER_PATH"] = os.pathsep.join(dict.fromkeys(paths))
    env.setdefault("MPLBACKEND", "module://matplotlib_inline.backend_inline")
    env["PYDEVD_DISABLE_FILE_VALIDATION"] = "1"
    return env


def kernel_spec_manager(settings: Settings) -> KernelSpecManager:
    ksm = KernelSpecManager()
    ksm.kernel_dirs = [str(settings.jupyter_dir / "kernels"), *ksm.kernel_dirs]
    return ksm


def kernel_exists(settings: Settings, name: str) -> bool:
    try:
        kernel_spec_manager(settings).get_kernel_spec(name)
    except NoSuchKernel:
        return False
    return True


class ColdKernels:
    """Starts a fresh kernel for every run: the fallback when no warm kernel is available.

    Kernels are :class:`AsyncKernelManager`: nbclient awaits the client's channels, and a blocking
    client would stall its event loop so that a dead kernel is never noticed.
    """

    def __init__(self, settings: Settings):
        self.settings = settings
        self.started = 0

    def acquire(self, kernel_name: str, cwd: Path, timeout: float = 60) -> AsyncKernelManager:
        # IPC sockets: no TCP port races between parallel runs, and no unencrypted-TCP warning
        km = AsyncKernelManager(kernel_name=kernel_name, kernel_spec_manager=kernel_spec_manager(self.settings),
                           transport="ipc", ip=str(self.settings.home / "run" / f"kernel-{uuid.uuid4().hex[:12]}"))
        (self.settings.home / "run").mkdir(parents=True, exist_ok=True)
        run_sync(km.start_kernel)(cwd=str(cwd), env=kernel_env(self.settings))
        self.started += 1
        return km

    def release(self, km: AsyncKernelManager) -> None:
        shutdown(km)


def shutdown(km: AsyncKernelManager) -> None:
    """Stop a kernel whatever state it is in (finished, dead or hung)."""
    try:
        if km.has_kernel:
            run_sync(km.shutdown_kernel)(now=True)
    except Exception:
        pid = kernel_pid(km)
        if pid is not None:
            kill_process_tree(pid)


def kill_process_tree(pid: int) -> None:
    """SIGKILL a kernel and whatever it started (subprocesses of a reduction must not outlive it)."""
    try:
        parent = psutil.Process(pid)
        processes = [*parent.children(recursive=True), parent]
    except psutil.Error:
        return
    for process in processes:
        with contextlib.suppress(psutil.Error):
            process.kill()


def kernel_pid(km: AsyncKernelManager) -> int | None:
    provisioner = getattr(km, "provisioner", None)
    process = getattr(provisioner, "process", None)
    return getattr(process, "pid", None)


class ProvidedKernelEngine(NBClientEngine):
    """NBClientEngine that executes on the kernel manager passed as ``km`` and leaves it to its provider.

    nbclient's own clean-up shuts a kernel down gracefully (seconds); here only the client channels
    are closed and the provider kills the kernel, so a finished run is published without that wait.
    """

    @classmethod
    def execute_managed_notebook(cls, nb_man, kernel_name, log_output=False, stdout_file=None, stderr_file=None,
                                 start_timeout=60, execution_timeout=None, **kwargs: Any):
        kwargs = remove_args(["input_path"], **kwargs)
        safe_kwargs = remove_args(["timeout", "startup_timeout"], **kwargs)
        final_kwargs = merge_kwargs(
            safe_kwargs,
            timeout=execution_timeout,
            startup_timeout=start_timeout,
            kernel_name=kernel_name,
            log_output=log_output,
            stdout_file=stdout_file,
            stderr_file=stderr_file,
        )
        client = PapermillNotebookClient(nb_man, **final_kwargs)
        try:
            return client.execute(cleanup_kc=False)
        finally:
            if client.kc is not None:
                client.kc.stop_channels()


papermill_engines.register(ENGINE_NAME, ProvidedKernelEngine)
