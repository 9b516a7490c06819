"""``nbreduce hub``: start and stop JupyterHub, the proxy and the portal service as one unit.

The hub's configuration (``hub_config/jupyterhub_config.py``) plugs in :mod:`runner.hub.auth`,
:mod:`runner.hub.spawn` and :mod:`runner.hub.contents`; this module only prepares its environment
and process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import psutil
from pydantic import SecretStr

from runner.bus.embedded import free_port
from runner.config import ENV_PREFIX, PACKAGE_DIR, Settings

REPO_DIR = PACKAGE_DIR.parent
#: ``npm install --prefix <repo> configurable-http-proxy@CHP_VERSION`` puts the proxy here.
CHP_VERSION = "5.3.0"
NODE_BIN = REPO_DIR / "node_modules" / ".bin"


def hub_config_dir() -> Path:
    """The hub_config folder of a source checkout, else the copy bundled into the wheel."""
    source = REPO_DIR / "hub_config"
    return source if source.is_dir() else PACKAGE_DIR / "_bundled" / "hub_config"


def hub_dir(settings: Settings) -> Path:
    """Hub state (sqlite database, cookie secret, proxy pid, user homes of the demo spawner)."""
    return settings.home / "hub"


def proxy_command() -> list[str]:
    """configurable-http-proxy installed by ``npm install --prefix <repo>``, else one on PATH."""
    local = NODE_BIN / "configurable-http-proxy"
    found = str(local) if local.exists() else shutil.which("configurable-http-proxy")
    if not found:
        raise FileNotFoundError(
            f"configurable-http-proxy not found: npm install --prefix {REPO_DIR} configurable-http-proxy@{CHP_VERSION}")
    return [found]


def hub_settings(settings: Settings, port: int, ip: str = "127.0.0.1", membership: Path | None = None,
                 password: str | None = None, portal_port: int | None = None) -> Settings:
    """``settings`` with the hub's addresses filled in: the public ``ip:port``, free internal ports."""
    hub = settings.hub.model_copy(update={
        "ip": ip, "port": port, "api_port": settings.hub.api_port or free_port(),
        "proxy_api_port": settings.hub.proxy_api_port or free_port(),
        "proxy_command": settings.hub.proxy_command or proxy_command(),
        **({"membership": Path(membership).resolve()} if membership is not None else {}),
        **({"demo_password": SecretStr(password)} if password is not None else {}),
    })
    portal = settings.portal.model_copy(update={"port": portal_port or settings.portal.port or free_port()})
    return settings.model_copy(update={"hub": hub, "portal": portal})


def hub_environment(settings: Settings) -> dict[str, str]:
    """Environment for ``jupyterhub -f hub_config/jupyterhub_config.py`` (which reads it back as Settings)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(ENV_PREFIX)}
    env.update(settings.to_env())
    env["PATH"] = os.pathsep.join([str(NODE_BIN), str(Path(sys.executable).parent), env.get("PATH", "")])
    return env


def hub_argv(config: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "jupyterhub", "-f", str(config or hub_config_dir() / "jupyterhub_config.py")]


def start_hub(settings: Settings, port: int = 8000, ip: str = "127.0.0.1", membership: Path | None = None,
              password: str | None = None, config: Path | None = None, log_file: Path | None = None,
              portal_port: int | None = None) -> subprocess.Popen:
    """Start the hub (which starts the proxy and the portal service) and return its process."""
    state = hub_dir(settings)
    state.mkdir(parents=True, exist_ok=True)
    env = hub_environment(hub_settings(settings, port, ip, membership, password, portal_port))
    out = open(log_file, "ab") if log_file else None  # noqa: SIM115 - handed to the child process
    try:
        return subprocess.Popen(hub_argv(config), cwd=state, env=env, stdout=out,
                                stderr=subprocess.STDOUT if out else None, stdin=subprocess.DEVNULL)
    finally:
        if out:
            out.close()


def stop_hub(proc: subprocess.Popen, timeout: float = 20) -> int:
    """Stop the hub and whatever it started (proxy, portal, user servers), also if it dies mid-start.

    The hub cleans up after SIGTERM once it is running; before that (or when it hangs) the processes
    it started are ended here, found as its descendants — never by name.
    """
    try:
        family = psutil.Process(proc.pid).children(recursive=True)
    except psutil.Error:
        family = []
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    _gone, alive = psutil.wait_procs(family, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.terminate()
    _gone, alive = psutil.wait_procs(alive, timeout=5)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    return proc.returncode


def run_hub(settings: Settings, port: int = 8000, ip: str = "127.0.0.1", membership: Path | None = None,
            password: str | None = None, config: Path | None = None) -> int:
    """Run the hub in the foreground until it exits or is interrupted; returns its exit code."""
    proc = start_hub(settings, port, ip, membership, password, config)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        return stop_hub(proc)
