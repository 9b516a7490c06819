"""Working copies: a scientist's own copy of an archived notebook, to extend and rerun in JupyterLab.

The archived version is the record and never changes. ``GET <server>/nbreduce/working-copy?path=reductions/...``
(the portal's "Open in JupyterLab" and the banner of every archived notebook link here) creates
``work/<INST>/RB<rb>/<run>/v<k>/<notebook>`` once — the same notebook, its injected ``output_dir``
pointing at that folder (data files are still read where they are), on the kernel that produced it —
and opens it in JupyterLab. Loaded into each single-user server as a jupyter_server extension
(``--ServerApp.jpserver_extensions=runner.hub.workcopy=True``).
"""

from __future__ import annotations

import json
import posixpath
from pathlib import Path
from typing import Any

import nbformat
from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel
from jupyter_server.base.handlers import JupyterHandler
from jupyter_server.utils import url_path_join
from tornado import web

REDUCTIONS = "reductions"
WORK = "work"
#: Cells nbreduce adds to a served notebook (never part of the record, never saved into a copy).
BANNER_TAG = "nbreduce-archive-banner"
NOTE_TAG = "nbreduce-kernel-note"
ENDPOINT = "nbreduce/working-copy"


def copy_path(archived: str) -> str:
    """``reductions/<INST>/RB<rb>/<run>/v<k>/<name>`` -> ``work/<INST>/RB<rb>/<run>/v<k>/<name>``."""
    parts = [p for p in archived.strip("/").split("/") if p]
    if len(parts) < 2 or parts[0] != REDUCTIONS or not parts[-1].endswith(".ipynb") or ".." in parts:
        raise web.HTTPError(400, f"not an archived notebook: {archived}")
    return posixpath.join(WORK, *parts[1:])


def pin_kernel(nb: nbformat.NotebookNode, specs: KernelSpecManager) -> str | None:
    """Point ``nb`` at the exact environment build that produced it while that build exists, else at the
    environment's current build; returns a note for the user when it had to fall back."""
    run = nb.metadata.get("nbreduce", {}).get("kernel", {})
    environment, build = run.get("environment"), run.get("environment_hash")
    if not environment:
        return None
    for name, note in ((f"nbreduce-{environment}-{build}" if build else None, None),
                       (f"nbreduce-{environment}", f"The build of environment {environment} that produced this "
                                                   f"version ({build}) is no longer installed: this notebook "
                                                   f"opens on the environment's current build.")):
        if name is None:
            continue
        try:
            spec = specs.get_kernel_spec(name)
        except NoSuchKernel:
            continue
        nb.metadata["kernelspec"] = {"name": name, "display_name": spec.display_name, "language": spec.language}
        return note if build else None
    return f"Environment {environment} is not installed here: choose a kernel to run this notebook."


def note_cell(text: str, tag: str) -> nbformat.NotebookNode:
    cell = nbformat.v4.new_markdown_cell(text)
    cell.metadata["tags"] = [tag]
    cell.metadata["deletable"] = True
    return cell


def working_copy(nb: nbformat.NotebookNode, archived: str, folder: Path, specs: KernelSpecManager
                 ) -> nbformat.NotebookNode:
    """The copy of an archived notebook: outputs and code as they are, ``output_dir`` = ``folder``."""
    nb = nbformat.from_dict(json.loads(json.dumps(nb)))  # a deep copy
    nb.cells = [c for c in nb.cells if not {BANNER_TAG, NOTE_TAG} & set(c.metadata.get("tags", []))]
    parameters = dict(nb.metadata.get("papermill", {}).get("parameters") or {})
    for index, cell in enumerate(nb.cells):
        if "injected-parameters" in cell.metadata.get("tags", []) and "output_dir" in parameters:
            from papermill.translators import translate_parameters

            parameters["output_dir"] = str(folder)
            kernel = nb.metadata.get("kernelspec", {}).get("name", "python3")
            source = translate_parameters(kernel, "python", parameters, "Parameters of this working copy")
            nb.cells[index] = nbformat.v4.new_code_cell(source, metadata=cell.metadata)
            nb.metadata.setdefault("papermill", {})["parameters"] = parameters
    note = pin_kernel(nb, specs)
    if note:
        nb.cells.insert(0, note_cell(f"**Note:** {note}", NOTE_TAG))
    nb.metadata.setdefault("nbreduce", {})["working_copy_of"] = archived
    return nb


class WorkingCopyHandler(JupyterHandler):
    """Create (once) and open the working copy of an archived notebook."""

    auth_resource = "contents"

    @web.authenticated
    async def get(self) -> None:
        target = await self._ensure(self.get_argument("path"))
        self.redirect(url_path_join(self.base_url, "lab", "tree", target))

    @web.authenticated
    async def post(self) -> None:
        self.finish({"path": await self._ensure(self.get_argument("path"))})

    async def _ensure(self, archived: str) -> str:
        target = copy_path(archived)
        cm = self.contents_manager
        if await _maybe(cm.file_exists(target)):  # the user's own copy: never overwritten
            return target
        model = await _maybe(cm.get(archived.strip("/"), content=True, type="notebook"))
        folder = posixpath.dirname(target)
        os_folder = Path(cm._get_os_path(folder))
        os_folder.mkdir(parents=True, exist_ok=True)
        copy = working_copy(nbformat.from_dict(model["content"]), archived, os_folder, self.kernel_spec_manager)
        await _maybe(cm.save({"type": "notebook", "format": "json", "content": copy}, target))
        self.log.info("working copy of %s at %s", archived, target)
        return target


async def _maybe(value: Any) -> Any:
    """Contents managers may be synchronous or asynchronous."""
    import inspect

    return await value if inspect.isawaitable(value) else value


def _load_jupyter_server_extension(serverapp: Any) -> None:
    web_app = serverapp.web_app
    route = url_path_join(web_app.settings["base_url"], ENDPOINT)
    web_app.add_handlers(".*$", [(route, WorkingCopyHandler)])
    serverapp.log.info("nbreduce working copies at %s", route)


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "runner.hub.workcopy"}]
