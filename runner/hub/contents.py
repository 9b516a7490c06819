"""The single-user server's ``reductions/`` tree: the archive, only the user's experiments, never writable.

Read-only is enforced *in the server*, because file modes do not stop a demo running as root.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from tornado.web import HTTPError
from traitlets import Instance, Unicode, default

from runner.config import Settings
from runner.hub.access import Access

REDUCTIONS_DIR = "reductions"


class ReductionsContentsManager(AsyncLargeFileManager):
    """Home folder plus ``reductions/``: the archive, only the user's experiments, never writable.

    ``reductions`` is a symlink to the archive so Jupyter's own path and hidden-file checks keep
    working; every API path below it is checked against the user's :class:`Access` (invisible
    entries are 404, as if absent) and every write is refused with 403, whoever the process runs as.
    """

    reductions_dir = Unicode(REDUCTIONS_DIR, config=True, help="Name of the read-only tree in the home")
    archive_dir = Unicode(config=True, help="The nbreduce archive (default: the settings' archive)")
    access = Instance(Access, help="Default: the settings' hub.access, handed over by the spawner (none when unset)")

    @default("archive_dir")
    def _default_archive(self) -> str:
        return str(Settings().archive)

    @default("access")
    def _default_access(self) -> Access:
        return Access.from_env(Settings().hub.access)

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
