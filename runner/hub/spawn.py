"""What every single-user server is given when it starts: its account, its reductions tree, the kernels.

Spawner-agnostic (``Spawner.pre_spawn_hook``): with the local spawners it prepares the user's home —
their unprivileged system account when the hub runs as root (runner.hub.accounts), a ``reductions/``
tree of links to what they may read, a writable ``work/`` — and with KubeSpawner the same access
arrives as read-only mounts (deploy/jupyterhub). Every server gets the user's access, the archive and
the instrument kernels (``JUPYTER_PATH``).
"""

from __future__ import annotations

import os
from pathlib import Path

from runner.config import Settings
from runner.hub.access import ACCESS_ENV, Access
from runner.hub.accounts import build_reductions_tree, ensure_account, groups_of
from runner.hub.workcopy import WORK
from runner.kernels.environments import jupyter_data_path
from runner.templates.registry import TemplateRegistry


def system_users(settings: Settings) -> bool:
    """Servers run as the users' own unprivileged accounts: when configured, else when the hub is root."""
    return settings.hub.system_users if settings.hub.system_users is not None else os.geteuid() == 0


def pre_spawn_hook(spawner) -> None:
    settings = Settings()
    access = Access.from_groups(group.name for group in spawner.user.groups)
    if spawner.user.admin:
        access = access.model_copy(update={"admin": True})
    spawner.environment = {
        **spawner.environment,
        ACCESS_ENV: access.to_env(),
        "NBREDUCE_HOME": str(settings.home),
        "NBREDUCE_ARCHIVE": str(settings.archive),
        # instrument kernelspecs live in <home>/jupyter/kernels; python3 comes from the server's own prefix
        "JUPYTER_PATH": jupyter_data_path(settings, os.environ.get("JUPYTER_PATH")),
    }
    home = getattr(spawner, "home_dir", None)  # SimpleLocalProcessSpawner; the account's home otherwise
    if home is None and not system_users(settings):
        return  # KubeSpawner: the image and its mounts provide the home
    home = Path(home) if home else Path(settings.home) / "hub" / "users" / spawner.user.name
    owner = None
    if system_users(settings):
        owner = ensure_account(spawner.user.name, home, groups_of(access))
        home = Path(owner.pw_dir)  # an existing account keeps its own home
    home.mkdir(parents=True, exist_ok=True)
    instruments = TemplateRegistry(settings.notebooks).instruments()
    build_reductions_tree(home / "reductions", settings.archive, access, instruments, owner=owner)
    work = home / WORK
    work.mkdir(exist_ok=True)
    if owner is not None:
        os.chown(work, owner.pw_uid, owner.pw_gid)
