"""The single-user server's ``reductions/`` tree: the user's experiments in the archive, never writable.

The tree is prepared before the server starts: links into the archive, one per experiment or instrument
the user may read (runner.hub.accounts.build_reductions_tree; KubeSpawner mounts the same folders
read-only). This contents manager serves it read-only (every write through the REST API is refused
with 403, whoever the process runs as), hides what the user may not see and links that lead nowhere
yet, keeps checkpoints out of it, and shows every archived notebook with a banner leading to a working
copy (runner.hub.workcopy) on the kernel that produced it. The operating system enforces the same
(runner.archive.permissions) for the kernels, which do not go through this class.
"""

from __future__ import annotations

import os
import posixpath
from typing import Any

import nbformat
from jupyter_server.services.contents.largefilemanager import AsyncLargeFileManager
from jupyter_server.utils import url_path_join
from tornado.web import HTTPError
from traitlets import Instance, Unicode, default

from runner.config import Settings
from runner.hub.access import Access
from runner.hub.workcopy import BANNER_TAG, ENDPOINT, NOTE_TAG, copy_path, note_cell, pin_kernel

REDUCTIONS_DIR = "reductions"


def _leads_somewhere(path: str) -> bool:
    """A readable link target, or a folder of the tree holding at least one."""
    if os.path.islink(path) or not os.path.isdir(path):
        return os.access(path, os.R_OK)
    try:
        return any(_leads_somewhere(os.path.join(path, name)) for name in os.listdir(path))
    except OSError:
        return False


class ReductionsContentsManager(AsyncLargeFileManager):
    """Home folder plus a read-only ``reductions/`` tree of the user's experiments."""

    reductions_dir = Unicode(REDUCTIONS_DIR, config=True, help="Name of the read-only tree in the home")
    access = Instance(Access, help="Default: the settings' hub.access, handed over by the spawner (none when unset)")

    @default("access")
    def _default_access(self) -> Access:
        return Access.from_env(Settings().hub.access)

    # -- what is shown ----------------------------------------------------------------------------
    def _parts(self, path: str) -> list[str] | None:
        """Components below ``reductions/`` (``[]`` for the tree itself), None outside it."""
        parts = [p for p in path.strip("/").split("/") if p]
        return parts[1:] if parts and parts[0] == self.reductions_dir else None

    def _visible(self, parts: list[str]) -> bool:
        """Defence in depth: the tree holds only what the user may read, and this checks it again."""
        if len(parts) < 2 or self.access.admin:
            return not parts or self.access.admin or parts[0].upper() in self.access.instruments or bool(
                self.access.rbs)
        return parts[1].startswith("RB") and self.access.can_see(parts[0], parts[1][2:])

    def _get_os_path(self, path: str) -> str:
        parts = self._parts(path)
        if parts is not None and not self._visible(parts):
            raise HTTPError(404, f"No such file or directory: {path}")
        os_path = super()._get_os_path(path)
        if parts and os.path.lexists(os_path) and not _leads_somewhere(os_path):  # not listed: not there either
            raise HTTPError(404, f"No such file or directory: {path}")
        return os_path

    async def _dir_model(self, path: str, content: bool = True) -> dict:
        parts = self._parts(path)
        if parts is None or not content:
            return await super()._dir_model(path, content=content)
        # inside the tree: list only entries that lead to something the user may read (links into the archive
        # for experiments without runs on an instrument yet, or not readable, are left out)
        model = await super()._dir_model(path, content=False)
        os_dir = self._get_os_path(path)
        entries = []
        for name in sorted(os.listdir(os_dir)):
            child = os.path.join(os_dir, name)
            if name.startswith(".") or not self.should_list(name) or not self._visible([*parts, name]) \
                    or not _leads_somewhere(child):
                continue
            entries.append(await self.get(f"{path.strip('/')}/{name}", content=False))
        model["content"], model["format"] = entries, "json"
        return model

    async def get(self, path: str, content: bool = True, type: str | None = None, format: str | None = None,
                  **kwargs: Any) -> dict:
        model = await super().get(path, content=content, type=type, format=format, **kwargs)
        if self._parts(path) is not None and model.get("type") == "notebook" and content:
            self._present_archived(model, path)
        return model

    def _present_archived(self, model: dict, path: str) -> None:
        """An archived notebook as the user sees it: a banner to the working copy, the kernel that produced it."""
        nb = model["content"]
        base = getattr(self.parent, "base_url", "/")
        link = f"{url_path_join(base, ENDPOINT)}?path={path.strip('/')}"
        banner = note_cell(
            "**Archived version — read-only.** This is the record of the run as nbreduce executed it; it "
            f"cannot be changed. [**Make a working copy**]({link}) to extend or rerun it in your own workspace "
            f"(`{copy_path(path)}`).", BANNER_TAG)
        cells = [banner]
        note = pin_kernel(nb, self.parent.kernel_spec_manager) if hasattr(self.parent, "kernel_spec_manager") \
            else None
        if note:
            cells.append(note_cell(f"**Note:** {note}", NOTE_TAG))
        nb.cells = cells + [c for c in nb.cells if not {BANNER_TAG, NOTE_TAG} & set(c.metadata.get("tags", []))]
        nbformat.validate(nb)

    # -- read-only ----------------------------------------------------------------------------------
    def _refuse(self, path: str | None) -> None:
        if path is not None and self._parts(path) is not None:
            raise HTTPError(403, f"{path}: reductions/ is the read-only archive; make a working copy (the banner "
                                 f"of the notebook, or the portal's \"Open in JupyterLab\") or save into work/")

    def is_writable(self, path: str) -> bool:
        return self._parts(path) is None and super().is_writable(path)

    async def save(self, model: dict, path: str = "") -> dict:
        self._refuse(path)
        if model.get("type") == "notebook" and isinstance(model.get("content"), dict):
            # a "save as" of an archived notebook: the banner is not part of the user's copy
            cells = model["content"].get("cells", [])
            model["content"]["cells"] = [c for c in cells
                                         if BANNER_TAG not in (c.get("metadata") or {}).get("tags", [])]
        return await super().save(model, path)

    async def new_untitled(self, path: str = "", type: str = "", ext: str = "") -> dict:
        self._refuse(path)
        return await super().new_untitled(path, type, ext)

    async def delete_file(self, path: str) -> None:
        self._refuse(path)
        await super().delete_file(path)

    async def rename_file(self, old_path: str, new_path: str) -> None:
        self._refuse(old_path)
        self._refuse(new_path)
        await super().rename_file(old_path, new_path)

    async def copy(self, from_path: str, to_path: str | None = None) -> dict:
        self._refuse(to_path if to_path is not None else posixpath.dirname(from_path.strip("/")))
        return await super().copy(from_path, to_path)

    # -- checkpoints never land in the archive ------------------------------------------------------
    async def create_checkpoint(self, path: str) -> dict:
        self._refuse(path)
        return await super().create_checkpoint(path)

    async def list_checkpoints(self, path: str) -> list:
        if self._parts(path) is not None:
            return []  # nothing to list, and no .ipynb_checkpoints folder made beside an archived file
        return await super().list_checkpoints(path)

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
