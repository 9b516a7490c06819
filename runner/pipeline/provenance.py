"""Provenance of a run: which template, environment build, packages, parameters, trigger and runner.

"Which script did this rerun use?" and "only variables were tracked, not the environment" were the
old system's complaints: the executed notebook records all of it in ``metadata.nbreduce``.
"""

from __future__ import annotations

import platform
import sys
from functools import lru_cache
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

from jupyter_client import KernelManager
from nbformat import NotebookNode

from runner import __version__
from runner.kernels.environments import FREEZE_NAME
from runner.kernels.pool import kernel_provenance


def installed_packages(km: KernelManager) -> list[str]:
    """``name==version`` of the kernel's environment: the build's freeze, or this interpreter's packages."""
    spec = km.kernel_spec
    build_dir = ((spec.metadata or {}).get("nbreduce", {}) if spec is not None else {}).get("build_dir")
    if build_dir:
        freeze = Path(build_dir) / FREEZE_NAME
        try:
            return list(_freeze(freeze, freeze.stat().st_mtime_ns))
        except OSError:
            return []
    if spec is not None and spec.argv and Path(spec.argv[0]).name.startswith("python") and \
            Path(spec.argv[0]).resolve() != Path(sys.executable).resolve():
        return []  # a foreign kernel we know nothing about
    return list(_own_packages())


@lru_cache(maxsize=32)
def _freeze(path: Path, mtime_ns: int) -> tuple[str, ...]:
    """A build's package list (builds are immutable; the modification time guards against a rebuild)."""
    return tuple(line for line in path.read_text().splitlines() if line.strip())


@lru_cache(maxsize=1)
def _own_packages() -> tuple[str, ...]:
    """This interpreter's packages, listed once per process (scanning them costs tens of milliseconds)."""
    return tuple(sorted(f"{d.metadata['Name']}=={d.version}" for d in importlib_metadata.distributions()))


def kernel_record(km: KernelManager) -> dict[str, Any]:
    """Kernel, environment name and build hash, and the package list, of the kernel that really ran."""
    return {**kernel_provenance(km), "packages": installed_packages(km)}


def runner_record(identity: str) -> dict[str, str]:
    return {"version": __version__, "host": identity, "python": platform.python_version()}


def stamp_notebook(nb: NotebookNode, kernel_name: str, display_name: str | None, metadata: dict[str, Any]) -> None:
    """The kernel that really ran (papermill keeps the template's) and nbreduce's run metadata."""
    spec = nb.metadata.setdefault("kernelspec", {})
    spec["name"] = kernel_name
    if display_name:
        spec["display_name"] = display_name
    nb.metadata["nbreduce"] = metadata
