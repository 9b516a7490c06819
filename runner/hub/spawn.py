"""What every single-user server is given when it starts: the user's access, the archive, the kernels.

Spawner-agnostic (``Spawner.pre_spawn_hook``), so the local demo spawner and KubeSpawner share it.
"""

from __future__ import annotations

import os
from pathlib import Path

from runner.config import Settings
from runner.hub.access import ACCESS_ENV, Access
from runner.kernels.environments import jupyter_data_path


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
        "JUPYTER_PATH": jupyter_data_path(settings, os.environ.get("JUPYTER_PATH")),
    }
    home = getattr(spawner, "home_dir", None)  # SimpleLocalProcessSpawner; KubeSpawner mounts volumes instead
    if home:
        Path(home).mkdir(parents=True, exist_ok=True)
