"""``nbreduce demo`` as a new user runs it: a real process tree, a real hub; Ctrl-C and a dying hub leave nothing.

The demo runs in its own process (as `make demo` does) with one instrument, so each test takes seconds
to a minute; the process tree is listed while it runs and checked after it ended.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from runner.bus.embedded import free_port

pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture
def demo_home() -> Iterator[Path]:
    """A home other accounts can reach (users' servers run as their own accounts when the demo is root)."""
    top = Path(tempfile.mkdtemp(prefix="nbreduce-demo-", dir="/tmp"))
    top.chmod(0o755)
    yield top / "home"
    shutil.rmtree(top, ignore_errors=True)


def start_demo(home: Path, *args: str, **env: str) -> subprocess.Popen:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("NBREDUCE_")}
    environ.update(NBREDUCE_HOME=str(home), **env)
    return subprocess.Popen([sys.executable, "-m", "runner.cli", "demo", "--instruments", "MARI", *args],
                            env=environ, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)


def read_until(proc: subprocess.Popen, marker: str, timeout: float, seen: list[str]) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            if proc.poll() is not None:
                return False
            continue
        seen.append(line)
        if marker in line:
            return True
    return False


def family(proc: subprocess.Popen) -> list[psutil.Process]:
    try:
        return [psutil.Process(proc.pid), *psutil.Process(proc.pid).children(recursive=True)]
    except psutil.Error:
        return []


def alive(processes: list[psutil.Process]) -> list[str]:
    left = []
    for p in processes:
        try:
            if p.is_running() and p.status() != psutil.STATUS_ZOMBIE:
                left.append(" ".join(p.cmdline())[:200])
        except psutil.Error:
            continue
    return left


def test_ctrl_c_stops_everything_the_demo_started(demo_home: Path) -> None:
    port = free_port()
    proc = start_demo(demo_home, "--hub-port", str(port))
    output: list[str] = []
    try:
        assert read_until(proc, "Platform running", 600, output), "".join(output)[-4000:]
        text = "".join(output)
        assert f"hub       http://127.0.0.1:{port}/" in text and "succeeded MARI run" in text
        assert text.index("hub       http://") > text.index("simulate  MARI")  # printed once the hub serves
        tree = family(proc)
        names = " ".join(" ".join(p.cmdline()) for p in tree)
        assert "jupyterhub" in names and "tansu" in names and "configurable-http-proxy" in names, names
        proc.send_signal(signal.SIGINT)
        proc.wait(120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 0, "".join(output)[-3000:]
    time.sleep(1)
    assert alive(tree) == [], "left running after Ctrl-C"


def test_a_dying_hub_fails_the_demo_loudly_and_leaves_nothing(demo_home: Path) -> None:
    proc = start_demo(demo_home, "--hub-port", str(free_port()), NBREDUCE_HUB__PROXY_COMMAND='["/bin/false"]')
    output: list[str] = []
    tree: list[psutil.Process] = []
    deadline = time.monotonic() + 600
    while proc.poll() is None and time.monotonic() < deadline:
        tree = family(proc) or tree  # the last tree seen before the exit
        line = proc.stdout.readline()
        output.append(line)
    output += proc.stdout.readlines()
    text = "".join(output)
    assert proc.wait(60) == 1, text[-3000:]
    assert "JupyterHub exited with status" in text and "hub.log" in text, text[-3000:]
    assert "Platform running" not in text and "hub       http://" not in text
    time.sleep(1)
    assert alive(tree) == [], "left running after the hub died"


def test_a_busy_port_is_reported_not_moved(demo_home: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = start_demo(demo_home, "--hub-port", str(port))
        out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 1 and f"port {port} is busy" in out, out
