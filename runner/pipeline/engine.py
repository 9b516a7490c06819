"""Kernels handed to runs: the provider interface, existence checks, killing a kernel's process tree."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Protocol

import psutil
from jupyter_client import KernelManager
from jupyter_client.kernelspec import NoSuchKernel

from runner.config import Settings
from runner.kernels.environments import kernel_spec_manager

#: papermill's name of :class:`runner.pipeline.papermill_engine.ProvidedKernelEngine`.
ENGINE_NAME = "nbreduce"


class KernelProvider(Protocol):
    """Hands out one started kernel per run and takes it back afterwards (never reused).

    :class:`runner.kernels.pool.KernelPool` is the implementation: warm kernels when it has them, a cold
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
