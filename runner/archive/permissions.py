"""Who may read the archive, enforced by the operating system, not only by the servers that show it.

The archive is read by single-user servers and their kernels, which run users' own code. A contents
manager that hides paths does not stop ``os.listdir`` in a kernel; file permissions do. Pluggable, like
JupyterHub's spawners (``NBREDUCE_ARCHIVE_PERMISSIONS``):

* :class:`OpenPermissions` (``open``) — the folders as the runner's umask makes them. For deployments
  where the servers see only what is mounted for them (KubeSpawner with one read-only mount per
  experiment: deploy/jupyterhub) or where everyone may read everything.
* :class:`ExperimentGroups` (``experiment-groups``) — one Unix group per experiment
  (``nbr-rb<RB>``), per instrument (``nbr-inst-<inst>``, its scientists) and ``nbr-admin``. The archive
  root and instrument folders can be traversed but not listed (0711, plus read for the instrument's
  group); an experiment folder belongs to its group (0750) and its instrument's and the admins' groups
  read it through POSIX ACLs. Needs root (the embedded platform started as root) and ``setfacl``; the
  hub puts each user into the groups of their membership (:mod:`runner.hub.accounts`).

Versions themselves are read-only for everyone (runner.archive.store.make_read_only).
"""

from __future__ import annotations

import grp
import logging
import os
import shutil
import subprocess
from pathlib import Path

log = logging.getLogger(__name__)

ADMIN_GROUP = "nbr-admin"


def experiment_group(rb_number: str) -> str:
    return f"nbr-rb{rb_number}"


def instrument_group(instrument: str) -> str:
    return f"nbr-inst-{instrument.lower()}"


def ensure_group(name: str) -> int:
    """The gid of system group ``name``, created when missing (needs root)."""
    try:
        return grp.getgrnam(name).gr_gid
    except KeyError:
        subprocess.run(["groupadd", "--system", "-f", name], check=True, capture_output=True)
        return grp.getgrnam(name).gr_gid


class ArchivePermissions:
    """Applied by the runner to the archive root and to every instrument and experiment folder it creates."""

    name = "open"

    def root(self, path: Path) -> None:
        """The archive root, once per runner start."""

    def instrument(self, path: Path, instrument: str) -> None:
        """An instrument folder (``<archive>/<INST>``)."""

    def experiment(self, path: Path, instrument: str, rb_number: str) -> None:
        """An experiment folder (``<archive>/<INST>/RB<rb>``)."""

    def apply(self, archive: Path) -> int:
        """(Re)apply to an existing archive; returns the number of experiment folders. Idempotent."""
        self.root(archive)
        count = 0
        for inst_dir in sorted(p for p in archive.iterdir() if p.is_dir() and not p.name.startswith(".")):
            self.instrument(inst_dir, inst_dir.name)
            for rb_dir in sorted(p for p in inst_dir.iterdir() if p.is_dir() and p.name.startswith("RB")):
                self.experiment(rb_dir, inst_dir.name, rb_dir.name[2:])
                count += 1
        return count


class OpenPermissions(ArchivePermissions):
    """Nothing beyond the umask: access is decided by what is mounted, or nobody is restricted."""


class ExperimentGroups(ArchivePermissions):
    """Experiment and instrument groups with ACLs (see the module docstring)."""

    name = "experiment-groups"

    def __init__(self) -> None:
        if os.geteuid() != 0:
            raise PermissionError("experiment-groups archive permissions need root (groups, ownership, ACLs)")
        if shutil.which("setfacl") is None:
            raise FileNotFoundError("experiment-groups archive permissions need setfacl (Debian package acl)")

    def root(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        ensure_group(ADMIN_GROUP)
        path.chmod(0o711)
        _acl(path, [f"g:{ADMIN_GROUP}:rx"])
        staging = path / ".staging"
        if staging.is_dir():
            staging.chmod(0o700)

    def instrument(self, path: Path, instrument: str) -> None:
        group = instrument_group(instrument)
        ensure_group(group)
        path.chmod(0o711)
        _acl(path, [f"g:{group}:rx", f"g:{ADMIN_GROUP}:rx"])

    def experiment(self, path: Path, instrument: str, rb_number: str) -> None:
        gid = ensure_group(experiment_group(rb_number))
        ensure_group(instrument_group(instrument))
        os.chown(path, 0, gid)
        path.chmod(0o750)
        _acl(path, [f"g:{instrument_group(instrument)}:rx", f"g:{ADMIN_GROUP}:rx"])


PERMISSIONS: dict[str, type[ArchivePermissions]] = {
    OpenPermissions.name: OpenPermissions,
    ExperimentGroups.name: ExperimentGroups,
}


def archive_permissions(name: str) -> ArchivePermissions:
    """The policy named ``name``: a built-in name or ``package.module:Class``."""
    if name in PERMISSIONS:
        return PERMISSIONS[name]()
    module, _, attribute = name.partition(":")
    if attribute:
        import importlib

        found = getattr(importlib.import_module(module), attribute, None)
        if isinstance(found, type) and issubclass(found, ArchivePermissions):
            return found()
    raise ValueError(f"unknown archive permissions {name!r}: use one of {', '.join(PERMISSIONS)} or module:Class")


def _acl(path: Path, entries: list[str]) -> None:
    """Set ACL entries (the mask follows), replacing earlier values of the same entries."""
    subprocess.run(["setfacl", "-m", ",".join(entries), str(path)], check=True, capture_output=True)
