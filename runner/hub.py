"""JupyterHub for nbreduce: ``nbreduce hub`` and the pieces its config file plugs in.

* :class:`MembershipAuthenticator` — demo login (one shared password, documented in docs/hub.md) for
  the users of a :class:`runner.access.MembershipSource`; groups ``rb-*``/``instrument-*``/``admin``
  are set at every login and refresh (``manage_groups``), so membership changes need no hub restart.
* :func:`pre_spawn_hook` — hands each single-user server its :class:`runner.access.Access`, the
  archive and the instrument kernels; spawner-agnostic, so KubeSpawner can use it unchanged.
* :class:`ReductionsContentsManager` — the single-user server's ``reductions/`` tree: the archive,
  filtered to the user's experiments and read-only *in the server*, because file modes do not stop
  a demo running as root.

Only light imports at module level: the single-user server imports this module for its contents
manager and the hub for its authenticator.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path
from secrets import compare_digest
from typing import Any

import click
import psutil

from runner.access import ACCESS_ENV, Access, MembershipSource, YamlMembership, groups_for
from runner.broker import free_port
from runner.config import PACKAGE_DIR, Settings

REPO_DIR = PACKAGE_DIR.parent
#: ``npm install --prefix <repo> configurable-http-proxy@CHP_VERSION`` puts the proxy here.
CHP_VERSION = "5.3.0"
NODE_BIN = REPO_DIR / "node_modules" / ".bin"
DEMO_PASSWORD = "nbreduce-demo"
REDUCTIONS_DIR = "reductions"


def hub_config_dir() -> Path:
    """The hub_config folder of a source checkout, else the copy bundled into the wheel."""
    source = REPO_DIR / "hub_config"
    return source if source.is_dir() else PACKAGE_DIR / "_bundled" / "hub_config"


def hub_dir(settings: Settings) -> Path:
    """Hub state (sqlite database, cookie secret, proxy pid, user homes of the demo spawner)."""
    return settings.home / "hub"


# --------------------------------------------------------------------------------------------------
# Authenticator
# --------------------------------------------------------------------------------------------------
try:  # the hub process has jupyterhub; the portal and single-user servers import only the rest
    from jupyterhub.auth import Authenticator
    from traitlets import Any as AnyTrait
    from traitlets import Unicode, default
except ImportError:  # pragma: no cover - jupyterhub is a dependency of the hub extra
    Authenticator = None  # type: ignore[assignment,misc]

if Authenticator is not None:

    class MembershipAuthenticator(Authenticator):
        """Demo login: the shared password, for users listed by the membership source only."""

        membership_file = Unicode("", config=True, help="YAML membership file (runner.access.Membership schema)")
        demo_password = Unicode(DEMO_PASSWORD, config=True, help="Shared demo password (>= 8 characters)")
        membership = AnyTrait(help="A runner.access.MembershipSource; default: YamlMembership(membership_file)")

        @default("membership")
        def _default_membership(self) -> MembershipSource:
            return YamlMembership(Path(self.membership_file or hub_config_dir() / "membership.yaml"))

        @default("manage_groups")
        def _manage_groups(self) -> bool:
            return True

        @default("refresh_pre_spawn")
        def _refresh_pre_spawn(self) -> bool:
            return True

        @default("auth_refresh_age")
        def _auth_refresh_age(self) -> int:
            return 60

        def check_allow_config(self) -> None:
            if len(self.demo_password) < 8:
                raise ValueError("MembershipAuthenticator.demo_password must have at least 8 characters")
            self.log.warning("MembershipAuthenticator: demo login with a shared password; see docs/hub.md "
                             "and hub_config/production_example.py for a real identity provider")

        def check_allowed(self, username: str, authentication: dict | None = None) -> bool:
            return self.membership.lookup(username) is not None

        def _model(self, username: str) -> dict[str, Any] | None:
            entry = self.membership.lookup(username)
            if entry is None:
                return None
            return {"name": username, "admin": entry.admin, "groups": groups_for(entry)}

        async def authenticate(self, handler, data: dict) -> dict[str, Any] | None:
            username = self.normalize_username(data.get("username", ""))
            if not compare_digest(str(data.get("password", "")).encode(), self.demo_password.encode()):
                return None
            return self._model(username)

        async def refresh_user(self, user, handler=None) -> dict[str, Any] | bool:
            """Re-read membership: groups follow the file, a removed user must log in again (and fails)."""
            return self._model(user.name) or False


def pre_spawn_hook(spawner) -> None:
    """Give a single-user server the user's access, the archive and the nbreduce kernels."""
    settings = Settings.from_env()
    access = Access.from_groups(group.name for group in spawner.user.groups)
    if spawner.user.admin:
        access = access.model_copy(update={"admin": True})
    spawner.environment = {
        **spawner.environment,
        ACCESS_ENV: access.to_env(),
        "NBREDUCE_HOME": str(settings.home),
        "NBREDUCE_ARCHIVE": str(settings.archive),
        # instrument kernelspecs live in <home>/jupyter/kernels; python3 comes from the server's own prefix
        "JUPYTER_PATH": os.pathsep.join(filter(None, [str(settings.jupyter_dir), os.environ.get("JUPYTER_PATH")])),
    }
    home = getattr(spawner, "home_dir", None)  # SimpleLocalProcessSpawner; KubeSpawner mounts volumes instead
    if home:
        Path(home).mkdir(parents=True, exist_ok=True)


# --------------------------------------------------------------------------------------------------
# Single-user contents manager
# --------------------------------------------------------------------------------------------------
try:
    from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
    from tornado.web import HTTPError
except ImportError:  # pragma: no cover
    AsyncLargeFileManager = None  # type: ignore[assignment,misc]

if AsyncLargeFileManager is not None:
    from traitlets import Instance
    from traitlets import Unicode as _Unicode
    from traitlets import default as _default

    class ReductionsContentsManager(AsyncLargeFileManager):
        """Home folder plus ``reductions/``: the archive, only the user's experiments, never writable.

        ``reductions`` is a symlink to the archive so Jupyter's own path and hidden-file checks keep
        working; every API path below it is checked against the user's :class:`Access` (invisible
        entries are 404, as if absent) and every write is refused with 403, whoever the process runs as.
        """

        reductions_dir = _Unicode(REDUCTIONS_DIR, config=True, help="Name of the read-only tree in the home")
        archive_dir = _Unicode(config=True, help="The nbreduce archive (default: $NBREDUCE_ARCHIVE)")
        access = Instance(Access, help="Default: from $NBREDUCE_ACCESS (no access when unset)")

        @_default("archive_dir")
        def _default_archive(self) -> str:
            return os.environ.get("NBREDUCE_ARCHIVE") or str(Settings.from_env().archive)

        @_default("access")
        def _default_access(self) -> Access:
            return Access.from_env(os.environ.get(ACCESS_ENV))

        def __init__(self, **kwargs: Any):
            super().__init__(**kwargs)
            self._link_archive()

        def _link_archive(self) -> None:
            link, target = Path(self.root_dir) / self.reductions_dir, Path(self.archive_dir)
            target.mkdir(parents=True, exist_ok=True)
            if link.is_symlink():
                if Path(os.readlink(link)) == target:
                    return
                link.unlink()
            elif link.exists():
                self.log.error("%s exists and is not the nbreduce archive link: reductions not shown", link)
                return
            link.symlink_to(target, target_is_directory=True)

        # -- access -----------------------------------------------------------------------------
        def _parts(self, path: str) -> list[str] | None:
            """Components below ``reductions/`` (``[]`` for the tree itself), None outside it."""
            parts = [p for p in path.strip("/").split("/") if p]
            return parts[1:] if parts and parts[0] == self.reductions_dir else None

        def _visible(self, parts: list[str]) -> bool:
            if not parts or self.access.admin:
                return True
            instrument = parts[0]
            if len(parts) == 1:
                return instrument.upper() in self.access.instruments or any(
                    (Path(self.archive_dir) / instrument / f"RB{rb}").is_dir() for rb in self.access.rbs)
            folder = parts[1]
            return folder.startswith("RB") and self.access.can_see(instrument, folder[2:])

        def _get_os_path(self, path: str) -> str:
            parts = self._parts(path)
            if parts is not None and not self._visible(parts):
                raise HTTPError(404, f"No such file or directory: {path}")
            return super()._get_os_path(path)

        async def _dir_model(self, path: str, content: bool = True) -> dict:
            parts = self._parts(path)
            if parts is None or len(parts) > 1 or not content:
                return await super()._dir_model(path, content=content)
            # top levels of the tree: list only what the user may see (the rest would 404 in get)
            model = await super()._dir_model(path, content=False)
            os_dir = self._get_os_path(path)
            entries = []
            for name in sorted(os.listdir(os_dir)):
                if name.startswith(".") or not self.should_list(name) or not self._visible([*parts, name]):
                    continue
                if os.path.isdir(os.path.join(os_dir, name)):
                    entries.append(await self.get(f"{path.strip('/')}/{name}", content=False))
            model["content"], model["format"] = entries, "json"
            return model

        # -- read-only --------------------------------------------------------------------------
        def _refuse(self, path: str | None) -> None:
            if path is not None and self._parts(path) is not None:
                raise HTTPError(403, f"{path}: published reductions are read-only; copy the notebook to your "
                                     "home folder to change or re-run it")

        def is_writable(self, path: str) -> bool:
            return self._parts(path) is None and super().is_writable(path)

        async def save(self, model: dict, path: str = "") -> dict:
            self._refuse(path)
            return await super().save(model, path)

        async def delete_file(self, path: str) -> None:
            self._refuse(path)
            await super().delete_file(path)

        async def rename_file(self, old_path: str, new_path: str) -> None:
            self._refuse(old_path)
            self._refuse(new_path)
            await super().rename_file(old_path, new_path)

        async def copy(self, from_path: str, to_path: str | None = None) -> dict:
            self._refuse(to_path if to_path is not None else from_path.strip("/").rpartition("/")[0])
            return await super().copy(from_path, to_path)

        async def create_checkpoint(self, path: str) -> dict:
            self._refuse(path)
            return await super().create_checkpoint(path)

        async def restore_checkpoint(self, checkpoint_id: str, path: str) -> None:
            self._refuse(path)
            await super().restore_checkpoint(checkpoint_id, path)

        async def delete_checkpoint(self, checkpoint_id: str, path: str) -> None:
            self._refuse(path)
            await super().delete_checkpoint(checkpoint_id, path)

        async def get_kernel_path(self, path: str, model: dict | None = None) -> str:
            """Kernels of archived notebooks start in the home folder, where they may write."""
            if self._parts(path) is not None:
                return ""
            return await super().get_kernel_path(path, model)


# --------------------------------------------------------------------------------------------------
# Launcher
# --------------------------------------------------------------------------------------------------
def proxy_command() -> list[str]:
    """configurable-http-proxy installed by ``npm install --prefix <repo>``, else one on PATH."""
    local = NODE_BIN / "configurable-http-proxy"
    found = str(local) if local.exists() else shutil.which("configurable-http-proxy")
    if not found:
        raise click.ClickException(
            f"configurable-http-proxy not found: npm install --prefix {REPO_DIR} configurable-http-proxy@{CHP_VERSION}")
    return [found]


def hub_environment(settings: Settings, port: int, ip: str = "127.0.0.1", membership: Path | None = None,
                    password: str | None = None, portal_port: int | None = None) -> dict[str, str]:
    """Environment for ``jupyterhub -f hub_config/jupyterhub_config.py``; internal ports are free ones."""
    env = dict(os.environ)
    env.update(
        NBREDUCE_HOME=str(settings.home),
        NBREDUCE_ARCHIVE=str(settings.archive),
        NBREDUCE_NOTEBOOKS=str(settings.notebooks),
        NBREDUCE_HUB_IP=ip,
        NBREDUCE_HUB_PORT=str(port),
        NBREDUCE_HUB_API_PORT=str(free_port()),
        NBREDUCE_PROXY_API_PORT=str(free_port()),
        NBREDUCE_PORTAL_PORT=str(portal_port or free_port()),
        NBREDUCE_PROXY_COMMAND=json.dumps(proxy_command()),
        PATH=os.pathsep.join([str(NODE_BIN), str(Path(sys.executable).parent), env.get("PATH", "")]),
    )
    if settings.bootstrap_servers:
        env["NBREDUCE_BOOTSTRAP_SERVERS"] = settings.bootstrap_servers
    if membership is not None:
        env["NBREDUCE_MEMBERSHIP"] = str(Path(membership).resolve())
    if password is not None:
        env["NBREDUCE_DEMO_PASSWORD"] = password
    return env


def hub_argv(config: Path | None = None) -> list[str]:
    return [sys.executable, "-m", "jupyterhub", "-f", str(config or hub_config_dir() / "jupyterhub_config.py")]


def start_hub(settings: Settings, port: int = 8000, ip: str = "127.0.0.1", membership: Path | None = None,
              password: str | None = None, config: Path | None = None, log_file: Path | None = None,
              portal_port: int | None = None) -> subprocess.Popen:
    """Start the hub (which starts the proxy and the portal service) and return its process."""
    state = hub_dir(settings)
    state.mkdir(parents=True, exist_ok=True)
    env = hub_environment(settings, port, ip, membership, password, portal_port)
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


@click.command("hub")
@click.option("--port", default=8000, show_default=True, help="Public port of the hub (the proxy).")
@click.option("--ip", default="127.0.0.1", show_default=True, help="Public address to bind.")
@click.option("--membership", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Membership YAML (default: hub_config/membership.yaml).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JupyterHub config file (default: hub_config/jupyterhub_config.py).")
def hub_command(port: int, ip: str, membership: Path | None, config: Path | None) -> None:
    """JupyterHub with the reductions portal: scientists find and rerun the reductions of their experiments."""
    settings = Settings.from_env()
    click.echo(f"nbreduce hub on http://{ip}:{port}/ (state in {hub_dir(settings)}; demo users: docs/hub.md)")
    sys.exit(run_hub(settings, port, ip, membership, config=config))


if __name__ == "__main__":
    hub_command()
