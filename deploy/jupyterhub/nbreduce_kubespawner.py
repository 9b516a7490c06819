"""KubeSpawner glue for nbreduce on zero-to-jupyterhub: each user's pod mounts, read-only, only the
archive folders of that user's experiments and instruments.

``runner.hub.spawn.pre_spawn_hook`` hands the single-user server the user's access, and its contents manager
filters what JupyterLab shows; but a kernel can read every file its pod can see. Mounting only the
visible folders makes the file system itself the boundary (docs/hub.md, "Demo caveat").

The hub image (deploy/images/hub/Dockerfile) puts this file on ``PYTHONPATH``;
deploy/jupyterhub/values.yaml sets ``c.KubeSpawner.pre_spawn_hook = nbreduce_kubespawner.pre_spawn_hook``.
The hub mounts the archive read-only itself, to see which experiment folders exist.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from runner.config import Settings
from runner.hub.access import ACCESS_ENV, Access
from runner.hub.spawn import pre_spawn_hook as nbreduce_pre_spawn_hook

#: Name of the archive volume in ``singleuser.storage.extraVolumes`` (the PVC ``nbreduce-archive``).
ARCHIVE_VOLUME = "nbreduce-archive"


def visible_folders(access: Access, archive: Path) -> list[str] | None:
    """Archive folders (relative paths) the user may read; None means the whole archive (admins).

    Instrument scientists get their instrument's folder, experiment members every ``<INST>/RB<rb>`` of
    their experiments that exists when the server starts: an experiment whose first reduction appears
    later shows at the user's next server start. Names come from hub groups; anything that is not a
    plain instrument name or RB number is ignored rather than turned into a path.
    """
    if access.admin:
        return None
    folders = {inst for inst in access.instruments if inst.isalnum() and (archive / inst).is_dir()}
    for rb in access.rbs:
        if not rb.isdigit():
            continue
        for path in archive.glob(f"*/RB{rb}"):
            instrument = path.parent.name
            if path.is_dir() and instrument.isalnum() and instrument not in folders:
                folders.add(f"{instrument}/{path.name}")
    return sorted(folders)


def archive_mounts(access: Access, archive: Path, volume: str = ARCHIVE_VOLUME) -> list[dict[str, Any]]:
    """Read-only volume mounts of the archive for one user, at the archive's own path."""
    folders = visible_folders(access, archive)
    if folders is None:
        return [{"name": volume, "mountPath": str(archive), "readOnly": True}]
    return [{"name": volume, "mountPath": str(archive / folder), "subPath": folder, "readOnly": True}
            for folder in folders]


def replace_mounts(current: list | dict, mounts: list[dict[str, Any]], volume: str = ARCHIVE_VOLUME) -> list | dict:
    """``current`` without the archive mounts of a previous spawn, plus ``mounts``.

    The spawner object outlives a server, so mounts added at one start must not pile up at the next;
    KubeSpawner accepts ``volume_mounts`` as a list or as a dict keyed by any name.
    """
    if isinstance(current, dict):
        kept = {key: mount for key, mount in current.items() if mount.get("name") != volume}
        return kept | {f"{volume}-{index}": mount for index, mount in enumerate(mounts)}
    return [mount for mount in current if mount.get("name") != volume] + mounts


def pre_spawn_hook(spawner: Any) -> None:
    """nbreduce's hook (access, archive, kernels in the environment), then the per-user archive mounts."""
    nbreduce_pre_spawn_hook(spawner)
    access = Access.from_env(spawner.environment.get(ACCESS_ENV))
    mounts = archive_mounts(access, Settings.from_env().archive)
    spawner.volume_mounts = replace_mounts(spawner.volume_mounts, mounts)
    spawner.log.info("nbreduce: %s gets %d archive mount(s)", spawner.user.name, len(mounts))
