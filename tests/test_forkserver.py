"""Fork-server kernels: real fork servers under the built ``minimal`` environment's interpreter.

A forked kernel must behave like a normally launched one (papermill runs, working directory,
environment, BLAS) while every run still gets its own process; deaths are seen with their exit
status; the fork server never outlives the pool or the runner; anything the fork server cannot do
falls back to the normal launch.
"""

from __future__ import annotations

import ast
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import nbformat
import papermill
import psutil
import pytest
from jupyter_client import KernelManager
from jupyter_client.provisioning import KernelProvisionerFactory
from nbformat.v4 import new_code_cell, new_notebook

from runner.config import Settings
from runner.kernels import environments as envs
from runner.kernels.forkserver import ForkServerError, ForkServers
from runner.kernels.pool import KernelPool, evaluate_silently, kernel_alive, kernel_exit_code, shutdown
from runner.kernels.provisioner import PROVISIONER_NAME, ForkProvisioner, kernel_arguments

READY = 120  # generous upper bounds on waits, never asserted as timings
REPO_ENVIRONMENTS = Path(__file__).resolve().parent.parent / "environments"
KERNEL = "nbreduce-minimal"


@pytest.fixture(scope="module")
def pool(built: Settings) -> Iterator[KernelPool]:
    with KernelPool(built, sizes={KERNEL: 2}, preload=envs.preload_by_kernel(REPO_ENVIRONMENTS)) as pool:
        assert pool.wait_ready(READY), pool.stats()
        yield pool


def evaluate(km: KernelManager, expression: str) -> object:
    """``expression`` evaluated in the kernel (JSON round trip), leaving no history or variables."""
    return json.loads(ast.literal_eval(evaluate_silently(km, "", f"__import__('json').dumps({expression})", READY)))


def pid_of(km: KernelManager) -> int:
    return km.provisioner.pid  # type: ignore[union-attr]


def gone(pid: int) -> bool:
    """Exited (a zombie counts: whoever adopted it may not reap at once)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def eventually(condition, what: str) -> None:
    deadline = time.monotonic() + READY
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def fork_server_pids(pool: KernelPool) -> list[int]:
    return [server.pid for server in pool._forks.servers()] if pool._forks is not None else []


# --------------------------------------------------------------------------- kernelspecs and commands


def test_uv_environment_kernelspecs_select_the_fork_provisioner_and_conda_ones_do_not(built: Settings) -> None:
    ksm = envs.kernel_spec_manager(built)
    for name in (KERNEL, envs.load("minimal", REPO_ENVIRONMENTS).exact_kernel_name):
        # found at all means the provisioner's entry point is installed (Jupyter hides the kernel otherwise)
        assert ksm.get_kernel_spec(name).metadata["kernel_provisioner"] == {
            "provisioner_name": PROVISIONER_NAME, "config": {"preload": ["import numpy"]}}
    assert PROVISIONER_NAME in KernelProvisionerFactory.instance().get_provisioner_entries()
    mantid = envs.discover(REPO_ENVIRONMENTS)["mantid"]  # conda: not buildable here, so its spec as written
    assert "kernel_provisioner" not in envs._kernel_json(mantid, Path("/envs/mantid-x"), exact=False)["metadata"]


def test_only_plain_ipykernel_commands_are_forked() -> None:
    assert kernel_arguments(["/env/bin/python", "-m", "ipykernel_launcher", "-f", "k.json", "--x=1"]) == \
        ["-f", "k.json", "--x=1"]
    assert kernel_arguments(["/env/bin/python", "-m", "other_kernel", "-f", "k.json"]) is None
    assert kernel_arguments(["/env/bin/python", "-m", "ipykernel_launcher"]) is None


# --------------------------------------------------------------------------- forked kernels at work


def test_forked_kernels_run_papermill_notebooks_one_process_per_run(pool: KernelPool, tmp_path: Path) -> None:
    source = tmp_path / "template.ipynb"
    nb = new_notebook(cells=[
        new_code_cell("scale = 1", metadata={"tags": ["parameters"]}),
        new_code_cell("import os, numpy\nm = numpy.random.default_rng(0).random((300, 300))\n"  # BLAS after fork
                      "blas = bool(numpy.allclose(m @ m, numpy.einsum('ij,jk->ik', m, m)))\n"
                      "print(os.getcwd(), os.environ['NBREDUCE_ENVIRONMENT'], scale * 2, blas)"),
        new_code_cell("print(numpy.random.random())"),  # the legacy global generator, seeded per kernel
    ])
    nb.metadata["kernelspec"] = {"name": KERNEL, "display_name": KERNEL, "language": "python"}
    nbformat.write(nb, source)

    pids, randoms = set(), set()
    for run in range(3):  # two warm kernels, then the refills
        workdir = tmp_path / f"run{run}"
        workdir.mkdir()
        km = pool.acquire(KERNEL, cwd=workdir, timeout=READY)
        assert km.forked and km.origin == "warm"
        pid = pid_of(km)
        assert pid not in pids and psutil.Process(pid).ppid() in fork_server_pids(pool)
        pids.add(pid)
        out = tmp_path / f"out{run}.ipynb"
        papermill.execute_notebook(str(source), str(out), parameters={"scale": 21}, km=km, kernel_name=KERNEL,
                                   progress_bar=False)
        pool.release(km)
        eventually(lambda km=km: not kernel_alive(km), "released kernel still alive")
        assert gone(pid)
        cells = nbformat.read(out, as_version=4).cells
        assert cells[2].outputs[0].text == f"{workdir} minimal 42 True\n"
        assert [c.execution_count for c in cells] == [1, 2, 3, 4]  # nothing ran in the kernel before the notebook
        randoms.add(cells[3].outputs[0].text)
        pool.wait_ready(READY)
    assert len(randoms) == 3, "forked kernels share the server's random state"
    assert pool.stats().forked_starts >= 3


def test_preloaded_modules_are_in_the_forked_kernel_but_not_in_its_namespace(pool: KernelPool,
                                                                            tmp_path: Path) -> None:
    km = pool.acquire(KERNEL, cwd=tmp_path, timeout=READY)
    try:
        assert km.forked
        assert evaluate(km, "'numpy' in __import__('sys').modules") is True
        assert evaluate(km, "'numpy' in globals()") is False  # same namespace as a cold kernel
        assert evaluate(km, "__import__('sys').executable").startswith(str(pool.settings.envs_dir))
        # a session of its own, watched by ipykernel's parent poller against the fork server
        server = psutil.Process(pid_of(km)).ppid()
        assert evaluate(km, "[__import__('os').getsid(0), __import__('os').environ['JPY_PARENT_PID']]") == \
            [pid_of(km), str(server)]
        assert not any(Path(p).name == "runner" for p in evaluate(km, "__import__('sys').path"))
    finally:
        pool.release(km)


def test_forked_kernel_deaths_are_seen_with_their_exit_status(pool: KernelPool, tmp_path: Path) -> None:
    killed = pool.acquire(KERNEL, cwd=tmp_path, timeout=READY)
    exited = pool.acquire(KERNEL, cwd=tmp_path, timeout=READY)
    try:
        assert killed.forked and exited.forked and kernel_exit_code(killed) is None
        os.kill(pid_of(killed), signal.SIGKILL)
        kc = exited.blocking_client()
        kc.start_channels()
        kc.execute("import os; os._exit(3)")
        eventually(lambda: not kernel_alive(killed) and not kernel_alive(exited), "dead kernels still alive")
        kc.stop_channels()
        assert kernel_exit_code(killed) == -signal.SIGKILL
        assert kernel_exit_code(exited) == 3
    finally:
        pool.release(killed)
        pool.release(exited)


def test_interrupt_reaches_a_forked_kernel(pool: KernelPool, tmp_path: Path) -> None:
    """``interrupt_mode: signal`` goes to the kernel's own process group, as for a launched kernel."""
    km = pool.acquire(KERNEL, cwd=tmp_path, timeout=READY)
    kc = km.blocking_client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=READY)
        marker = tmp_path / "running"
        msg_id = kc.execute(f"import pathlib, time; pathlib.Path({str(marker)!r}).touch(); time.sleep(600)")
        eventually(marker.exists, "cell never started")
        km.interrupt_kernel()
        reply = kc.get_shell_msg(timeout=READY)
        assert reply["parent_header"]["msg_id"] == msg_id
        assert reply["content"]["status"] == "error" and reply["content"]["ename"] == "KeyboardInterrupt"
        assert kernel_alive(km)
    finally:
        kc.stop_channels()
        pool.release(km)


# --------------------------------------------------------------------------- lifetimes


def test_fork_server_stops_with_the_pool(built: Settings) -> None:
    pool = KernelPool(built, sizes={KERNEL: 1}).start()
    assert pool.wait_ready(READY)
    [idle] = pool._warm[KERNEL]
    [server] = fork_server_pids(pool)
    pool.stop()
    assert not kernel_alive(idle)
    eventually(lambda: gone(server), "fork server outlived its pool")


def test_a_handed_out_kernel_keeps_its_fork_server_until_released(built: Settings, tmp_path: Path) -> None:
    pool = KernelPool(built)
    km = pool.acquire(KERNEL, cwd=tmp_path)
    [server] = fork_server_pids(pool)
    pool.stop()  # kill_checked_out=False: the holder still runs on it
    assert kernel_alive(km) and not gone(server)
    assert evaluate(km, "1 + 1") == 2
    pool.release(km)
    assert not kernel_alive(km)
    eventually(lambda: gone(server), "fork server outlived its last kernel")


def test_fork_server_and_its_kernels_die_with_the_runner(built: Settings, tmp_path: Path) -> None:
    script = textwrap.dedent(f"""
        import json, sys, time
        import psutil
        from runner.config import Settings
        from runner.kernels.pool import KernelPool
        pool = KernelPool(Settings.from_env({{"NBREDUCE_HOME": {str(built.home)!r}}}))
        km = pool.acquire({KERNEL!r}, cwd={str(tmp_path)!r})
        print(json.dumps([km.provisioner.pid, psutil.Process(km.provisioner.pid).ppid(), km.forked]), flush=True)
        time.sleep(600)
    """)
    runner = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        kernel, server, forked = json.loads(runner.stdout.readline())  # type: ignore[union-attr]
        assert forked and not gone(kernel) and not gone(server)
    finally:
        runner.kill()
        runner.wait()
    eventually(lambda: gone(server), "fork server outlived the runner")
    eventually(lambda: gone(kernel), "kernel outlived the runner")


def test_kernels_end_when_their_fork_server_dies_and_the_next_start_gets_a_new_server(built: Settings,
                                                                                      tmp_path: Path) -> None:
    pool = KernelPool(built)
    km = pool.acquire(KERNEL, cwd=tmp_path)
    [server] = fork_server_pids(pool)
    try:
        os.kill(server, signal.SIGKILL)
        eventually(lambda: not kernel_alive(km), "kernel outlived its fork server")  # ipykernel's parent poller
        assert kernel_exit_code(km) is not None
        again = pool.acquire(KERNEL, cwd=tmp_path)
        assert again.forked and fork_server_pids(pool) != [server] and evaluate(again, "2 * 21") == 42
        pool.release(again)
    finally:
        pool.release(km)
        pool.stop()


# --------------------------------------------------------------------------- fallbacks


def test_managers_without_fork_servers_launch_normally(built: Settings, tmp_path: Path) -> None:
    """Jupyter servers, the papermill CLI ...: same kernelspec, LocalProvisioner's launch."""
    km = KernelManager(kernel_name=KERNEL, kernel_spec_manager=envs.kernel_spec_manager(built))
    km.start_kernel(cwd=str(tmp_path), env=envs.jupyter_env(built))
    try:
        assert isinstance(km.provisioner, ForkProvisioner) and not km.provisioner.forked
        assert psutil.Process(pid_of(km)).ppid() == os.getpid()
        assert evaluate(km, "__import__('os').environ['NBREDUCE_ENVIRONMENT']") == "minimal"
    finally:
        shutdown(km)

    pool = KernelPool(built, preload={KERNEL: ["import fractions"]}, fork_servers=False)
    km = pool.acquire(KERNEL, cwd=tmp_path)
    assert not km.forked and pool.stats().forked_starts == 0
    pool.release(km)
    pool.stop()


def test_a_fork_server_that_cannot_start_falls_back_to_the_normal_launch(built: Settings, tmp_path: Path) -> None:
    # kills the fork server during its preload; a kernel (which has a parent pid to watch) survives it
    broken = ["import os\nif 'JPY_PARENT_PID' not in os.environ: os._exit(3)"]
    with KernelPool(built, sizes={KERNEL: 1}, preload={KERNEL: broken}) as pool:
        assert pool.wait_ready(READY), pool.stats()
        km = pool.acquire(KERNEL, cwd=tmp_path)
        assert km.origin == "warm" and not km.forked and kernel_alive(km)
        assert evaluate(km, "__import__('os').getcwd()") == str(tmp_path)
        pool.release(km)
        assert pool.stats().forked_starts == 0


def test_fork_server_client_reports_errors_instead_of_hanging(built: Settings, tmp_path: Path) -> None:
    python = str(envs.load("minimal", REPO_ENVIRONMENTS).build_dir(built) / "bin" / "python")
    servers = ForkServers(cwd=tmp_path)
    server = servers.get(python, [], os.environ)
    assert servers.get(python, [], os.environ) is server  # one per interpreter and preload
    with pytest.raises(FileNotFoundError):
        server.fork(["-f", str(tmp_path / "k.json")], tmp_path / "missing", os.environ)
    with pytest.raises(ForkServerError):
        servers.get(str(tmp_path / "no-python"), [], os.environ)
    servers.close()
    eventually(lambda: gone(server.pid), "closed fork server still running")
    with pytest.raises(ForkServerError):
        servers.get(python, [], os.environ)
