"""System accounts for hub users, so single-user servers and their kernels never run as root.

When the embedded hub runs as root, every hub user gets an unprivileged system account of the same name
(JupyterHub's LocalProcessSpawner then starts their server as that account) whose supplementary groups
are exactly those of their membership: the experiment, instrument and admin groups that
:class:`runner.archive.permissions.ExperimentGroups` gives read access to. Their ``reductions/`` tree is
a folder of links to what they may read (:func:`build_reductions_tree`): the archive itself stays
unlistable for them, and the operating system refuses everything else.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import shutil
import subprocess
from collections.abc import Iterable
from pathlib import Path

from runner.archive.permissions import ADMIN_GROUP, ensure_group, experiment_group, instrument_group
from runner.hub.access import Access

NOLOGIN = "/usr/sbin/nologin"
#: The comment (GECOS) of accounts nbreduce created: only those does it move or change.
MARKER = "nbreduce hub user"


def groups_of(access: Access) -> list[str]:
    """The Unix groups matching a user's access."""
    groups = [experiment_group(rb) for rb in sorted(access.rbs)]
    groups += [instrument_group(inst) for inst in sorted(access.instruments)]
    return groups + ([ADMIN_GROUP] if access.admin else [])


def ensure_account(name: str, home: Path, groups: Iterable[str]) -> pwd.struct_passwd:
    """An unprivileged system account ``name``, member of exactly ``groups`` (created as needed).

    An account nbreduce created lives in ``home`` (moved there if it was elsewhere, e.g. another hub's state);
    an existing account of the machine keeps its own home.
    """
    groups = list(groups)
    for group in groups:
        ensure_group(group)
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        home.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["useradd", "--system", "--user-group", "--comment", MARKER, "--home-dir", str(home),
                        "--shell", NOLOGIN, name], check=True, capture_output=True)
        entry = pwd.getpwnam(name)
    if entry.pw_uid == 0:
        raise PermissionError(f"refusing to spawn a server for {name}: it is a root account")
    if entry.pw_gecos == MARKER and Path(entry.pw_dir) != home:
        subprocess.run(["usermod", "--home", str(home), name], check=True, capture_output=True)
        entry = pwd.getpwnam(name)
    home = Path(entry.pw_dir)
    current = {g.gr_name for g in grp.getgrall() if name in g.gr_mem}
    if current != set(groups):  # exactly the membership's groups: a removed experiment is removed here too
        subprocess.run(["usermod", "-G", ",".join(groups), name], check=True, capture_output=True)
    home.mkdir(parents=True, exist_ok=True)
    os.chown(home, entry.pw_uid, entry.pw_gid)
    home.chmod(0o700)
    return entry


def build_reductions_tree(tree: Path, archive: Path, access: Access, instruments: Iterable[str],
                          owner: pwd.struct_passwd | None = None) -> None:
    """``tree`` (the user's ``reductions/``) as links into the archive, one per thing the user may read.

    An instrument scientist gets ``<INST>`` -> the instrument folder; an experiment member gets
    ``<INST>/RB<rb>`` for every instrument (links to folders that do not exist yet are hidden by the contents
    manager and work as soon as the runner creates them); an admin gets every instrument folder.
    """
    if tree.is_symlink() or tree.is_file():
        tree.unlink()
    elif tree.is_dir():
        shutil.rmtree(tree)
    tree.mkdir(parents=True)
    names = sorted(set(instruments) | {p.name for p in archive.iterdir() if p.is_dir() and not p.name.startswith(".")}
                   if archive.is_dir() else set(instruments))
    for inst in names:
        if access.admin or inst in access.instruments:
            (tree / inst).symlink_to(archive / inst, target_is_directory=True)
            continue
        if access.rbs:
            (tree / inst).mkdir()
            for rb in sorted(access.rbs):
                (tree / inst / f"RB{rb}").symlink_to(archive / inst / f"RB{rb}", target_is_directory=True)
    if owner is not None:
        for path in [tree, *tree.rglob("*")]:
            with contextlib.suppress(OSError):
                os.lchown(path, owner.pw_uid, owner.pw_gid)
        for path in [tree, *(p for p in tree.rglob("*") if p.is_dir() and not p.is_symlink())]:
            path.chmod(0o555)  # the links are the hub's to maintain; the user cannot redirect them
