"""Warm kernel pool with real kernels: the runner's own ``python3`` and the built ``minimal`` environment.

Also pins down how papermill 2.7 / nbclient 0.11 treat a kernel manager passed as ``km``: they run
on it, leave it running (the pool kills it on release) and keep papermill's own notebook handling.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import nbformat
import papermill
import pytest
import scrapbook
from jupyter_client import AsyncKernelManager
from jupyter_client.channels import HBChannel
from jupyter_client.kernelspec import NoSuchKernel
from jupyter_core.utils import run_sync
from nbclient.exceptions import DeadKernelError
from nbformat.v4 import new_code_cell, new_notebook

from runner.config import Settings
from runner.kernels import environments as envs
from runner.kernels.pool import (
    KernelPool,
    PoolKernelManager,
    describe_exit,
    evaluate_silently,
    kernel_alive,
    kernel_exit_code,
    kernel_provenance,
    parse_sizes,
    preload_code,
    shutdown,
)

READY = 120  # generous upper bounds on waits, never asserted as timings
REPO_ENVIRONMENTS = Path(__file__).resolve().parent.parent / "environments"


def evaluate(km: PoolKernelManager, expression: str) -> str:
    """``repr`` of ``expression`` evaluated in the kernel, without touching its history or namespace."""
    return evaluate_silently(km, "", expression, READY)


def pid(km: PoolKernelManager) -> int:
    return km.provisioner.pid  # type: ignore[union-attr]


def wait_dead(km: PoolKernelManager) -> None:
    deadline = time.monotonic() + READY
    while kernel_alive(km) and time.monotonic() < deadline:
        time.sleep(0.05)


def heartbeat_threads() -> set[int]:
    return {id(t) for t in threading.enumerate() if isinstance(t, HBChannel)}


def write_notebook(path: Path, *sources: str, kernel: str = "python3") -> Path:
    cells = [new_code_cell(sources[0], metadata={"tags": ["parameters"]})]
    cells += [new_code_cell(source) for source in sources[1:]]
    nb = new_notebook(cells=cells)
    nb.metadata["kernelspec"] = {"name": kernel, "display_name": kernel, "language": "python"}
    nbformat.write(nb, path)
    return path


def test_pool_sizes_from_configuration_text() -> None:
    assert parse_sizes("nbreduce-scipp=2, python3=1") == {"nbreduce-scipp": 2, "python3": 1}
    assert parse_sizes("") == {}
    with pytest.raises(ValueError):
        parse_sizes("nbreduce-scipp")


def test_preload_runs_in_a_throwaway_namespace() -> None:
    namespace: dict = {}
    exec(preload_code(["import fractions", "x = 1"]), namespace)
    assert "fractions" not in namespace and "x" not in namespace


def test_warm_kernel_has_preloaded_modules_and_works_in_the_requested_folder(built: Settings,
                                                                              tmp_path: Path) -> None:
    preload = envs.preload_by_kernel(REPO_ENVIRONMENTS)
    with KernelPool(built, sizes={"nbreduce-minimal": 1}, preload=preload) as pool:
        assert pool.wait_ready(READY), pool.stats()
        km = pool.acquire("nbreduce-minimal", cwd=tmp_path)
        assert km.origin == "warm" and kernel_alive(km)
        assert evaluate(km, "'numpy' in __import__('sys').modules") == "True"
        assert evaluate(km, "'numpy' in globals()") == "False"  # same namespace as a cold kernel
        assert evaluate(km, "__import__('os').getcwd()") == repr(str(tmp_path))
        assert evaluate(km, "__import__('sys').executable").startswith(repr(str(built.envs_dir))[:-1])
        provenance = kernel_provenance(km)
        assert provenance["kernel"] == "nbreduce-minimal" and provenance["environment"] == "minimal"
        pool.release(km)
        wait_dead(km)
        assert not kernel_alive(km)
        stats = pool.stats()
        assert (stats.warm_hits, stats.cold_starts, stats.released) == (1, 0, 1)


def test_concurrent_acquisitions_never_share_a_kernel(built: Settings, tmp_path: Path) -> None:
    with KernelPool(built, sizes={"python3": 2}) as pool:
        assert pool.wait_ready(READY)
        with ThreadPoolExecutor(4) as workers:
            kms = list(workers.map(lambda _: pool.acquire("python3", cwd=tmp_path, timeout=READY), range(4)))
        assert len({id(km) for km in kms}) == 4 and len({pid(km) for km in kms}) == 4
        stats = pool.stats()
        assert stats.warm_hits >= 2 and stats.warm_hits + stats.cold_starts == 4
        for km in kms:
            pool.release(km)
        assert pool.wait_ready(READY)  # refilled in the background
    assert all(not kernel_alive(km) for km in kms)


def test_cold_start_when_not_pooled_and_clear_errors(built: Settings, tmp_path: Path) -> None:
    pool = KernelPool(built)  # no sizes: cold starts only, start() not even needed
    km = pool.acquire("python3", cwd=tmp_path)
    assert km.origin == "cold" and evaluate(km, "__import__('os').getcwd()") == repr(str(tmp_path))
    pool.release(km)
    with pytest.raises(NoSuchKernel):
        pool.acquire("nbreduce-no-such-environment", cwd=tmp_path)
    with pytest.raises(FileNotFoundError):
        pool.acquire("python3", cwd=tmp_path / "missing")
    pool.stop()
    assert pool.stats().cold_starts == 1


def test_killed_kernel_is_detected_as_dead(built: Settings, tmp_path: Path) -> None:
    pool = KernelPool(built)
    km = pool.acquire("python3", cwd=tmp_path)
    assert kernel_alive(km) and kernel_exit_code(km) is None
    os.kill(pid(km), signal.SIGKILL)
    wait_dead(km)
    assert not kernel_alive(km)
    assert kernel_exit_code(km) == -signal.SIGKILL
    assert "SIGKILL" in describe_exit(kernel_exit_code(km))
    pool.release(km)
    pool.stop()


def test_death_detection_also_works_for_async_kernel_managers(tmp_path: Path) -> None:
    km = AsyncKernelManager(kernel_name="python3")
    run_sync(km.start_kernel)(cwd=str(tmp_path))
    try:
        assert kernel_alive(km)
        os.kill(km.provisioner.pid, signal.SIGKILL)  # type: ignore[union-attr]
        wait_dead(km)  # type: ignore[arg-type]
        assert not kernel_alive(km) and kernel_exit_code(km) == -signal.SIGKILL
    finally:
        run_sync(km.cleanup_resources)()


def test_warm_kernel_that_died_while_idle_is_not_handed_out(built: Settings, tmp_path: Path) -> None:
    with KernelPool(built, sizes={"python3": 1}) as pool:
        assert pool.wait_ready(READY)
        [idle] = pool._warm["python3"]
        os.kill(pid(idle), signal.SIGKILL)
        wait_dead(idle)
        km = pool.acquire("python3", cwd=tmp_path)
        assert km is not idle and kernel_alive(km)
        assert pool.stats().discarded == 1
        pool.release(km)


def test_a_killed_kernel_is_reaped_without_waiting_a_poll_interval(built: Settings, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """jupyter_client looks whether a killed kernel is gone every 0.1 s: the pool's one reaper thread then stops at
    most ~9 kernels a second, and a burst of short runs leaves kernels running behind it (the soak: 160 after 600
    runs, each with its sockets, threads and memory in the runner). The pool looks again at once."""
    pool = KernelPool(built)
    kms = [pool.acquire("python3", cwd=tmp_path) for _ in range(3)]
    slept: list[float] = []
    real_sleep = asyncio.sleep

    async def sleep(delay: float, *args, **kwargs):
        slept.append(delay)
        return await real_sleep(delay, *args, **kwargs)

    monkeypatch.setattr(asyncio, "sleep", sleep)
    for km in kms:
        shutdown(km)
        assert not kernel_alive(km)
    assert slept and min(slept) < 0.005 and max(slept) <= 0.1, slept  # at once first, never longer than before
    pool.stop()


def test_stop_kills_warm_kernels(built: Settings) -> None:
    pool = KernelPool(built, sizes={"python3": 1}).start()
    assert pool.wait_ready(READY)
    [idle] = pool._warm["python3"]
    pool.stop()
    assert not kernel_alive(idle)
    assert pool.stats().warm == {"python3": 0}


def test_papermill_runs_a_parameterised_notebook_on_a_pool_kernel(built: Settings, tmp_path: Path) -> None:
    """papermill 2.7 forwards ``km`` to nbclient 0.11, which runs on it and leaves it running."""
    source = write_notebook(
        tmp_path / "template.ipynb",
        "sample = 'default'\nscale = 1",
        "import os, sys, scrapbook\nprint(os.getcwd(), sample, scale * 2, 'fractions' in sys.modules)\n"
        "scrapbook.glue('doubled', scale * 2)",
    )
    workdir = tmp_path / "work"
    workdir.mkdir()
    heartbeats_before = heartbeat_threads()
    with KernelPool(built, sizes={"python3": 1}, preload={"python3": ["import fractions"]}) as pool:
        assert pool.wait_ready(READY)
        km = pool.acquire("python3", cwd=workdir)
        papermill.execute_notebook(str(source), str(tmp_path / "out.ipynb"), parameters={"sample": "MAR25581",
                                   "scale": 21}, km=km, kernel_name=km.kernel_name, progress_bar=False)
        assert kernel_alive(km)  # nbclient does not shut down a kernel it did not start
        pool.release(km)
        wait_dead(km)
    assert heartbeat_threads() <= heartbeats_before  # the channels nbclient left open were closed

    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    tags = [cell.metadata.get("tags", []) for cell in out.cells]
    assert tags == [["parameters"], ["injected-parameters"], []]
    assert "sample = \"MAR25581\"" in out.cells[1].source and "scale = 21" in out.cells[1].source
    assert out.cells[2].outputs[0].text == f"{workdir} MAR25581 42 True\n"
    assert [cell.execution_count for cell in out.cells] == [1, 2, 3]  # preload/chdir left no trace
    assert all(cell.metadata.papermill.status == "completed" for cell in out.cells)
    assert out.metadata.papermill.parameters == {"sample": "MAR25581", "scale": 21}
    assert scrapbook.read_notebook(str(tmp_path / "out.ipynb")).scraps["doubled"].data == 42


def test_papermill_error_banner_on_a_warm_environment_kernel(built: Settings, tmp_path: Path) -> None:
    source = write_notebook(tmp_path / "template.ipynb", "divisor = 1", "import numpy\nvalue = 1 / divisor",
                            "print('never runs')", kernel="nbreduce-minimal")
    with KernelPool(built, sizes={"nbreduce-minimal": 1}) as pool:
        assert pool.wait_ready(READY)
        km = pool.acquire("nbreduce-minimal", cwd=tmp_path)
        assert km.origin == "warm"
        with pytest.raises(papermill.PapermillExecutionError) as failure:
            papermill.execute_notebook(str(source), str(tmp_path / "out.ipynb"), parameters={"divisor": 0}, km=km,
                                       kernel_name=km.kernel_name, progress_bar=False)
        pool.release(km)
    assert failure.value.ename == "ZeroDivisionError"
    out = nbformat.read(tmp_path / "out.ipynb", as_version=4)
    assert out.cells[0].cell_type == "markdown" and "papermill-error-cell-tag" in out.cells[0].metadata.tags
    statuses = [cell.metadata.papermill.status for cell in out.cells if cell.cell_type == "code"]
    assert statuses == ["completed", "completed", "failed", "pending"]


def test_kernel_killed_during_a_papermill_run_fails_the_run_instead_of_hanging(built: Settings,
                                                                                tmp_path: Path) -> None:
    """With the pool's manager nbclient notices the dead kernel; a plain KernelManager would hang here."""
    marker = tmp_path / "running"
    source = write_notebook(tmp_path / "template.ipynb", "marker = ''",
                            "import pathlib, time\npathlib.Path(marker).touch()\ntime.sleep(600)")
    pool = KernelPool(built)
    km = pool.acquire("python3", cwd=tmp_path)

    def kill_when_running() -> None:
        deadline = time.monotonic() + READY
        while not marker.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        os.kill(pid(km), signal.SIGKILL)

    killer = threading.Thread(target=kill_when_running, daemon=True)
    killer.start()
    with pytest.raises(DeadKernelError):
        papermill.execute_notebook(str(source), str(tmp_path / "out.ipynb"), parameters={"marker": str(marker)},
                                   km=km, kernel_name=km.kernel_name, progress_bar=False)
    killer.join()
    assert kernel_exit_code(km) == -signal.SIGKILL
    pool.release(km)
    pool.stop()
