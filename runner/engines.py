"""A papermill engine that runs on a kernel nbreduce provides (warm from the pool or cold).

papermill always starts (and owns) a new kernel. nbreduce needs the kernel in hand: to kill it when a
run exceeds its time limit, to give every run its own working directory without papermill's
process-wide ``os.chdir``, and to serve runs from a warm pool. papermill's own client
(:class:`PapermillNotebookClient`) still does the work, so parameter injection, error banners and
per-cell metadata stay papermill's.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Protocol

import psutil
from jupyter_client import KernelManager
from jupyter_client.kernelspec import NoSuchKernel
from papermill.clientwrap import PapermillNotebookClient
from papermill.engines import NBClientEngine, papermill_engines
from papermill.utils import merge_kwargs, remove_args

from runner.config import Settings
from runner.environments import kernel_spec_manager

ENGINE_NAME = "nbreduce"


class KernelProvider(Protocol):
    """Hands out one started kernel per run and takes it back afterwards (never reused).

    :class:`runner.kernels.KernelPool` is the implementation: warm kernels when it has them, a cold
    start otherwise.
    """

    def acquire(self, kernel_name: str, cwd: Path, timeout: float = 60) -> KernelManager: ...

    def release(self, km: KernelManager) -> None: ...


def kernel_exists(settings: Settings, name: str) -> bool:
    try:
        kernel_spec_manager(settings).get_kernel_spec(name)
    except NoSuchKernel:
        return False
    return True


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


def kernel_pid(km: KernelManager) -> int | None:
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
