"""The archive is protected by the operating system: experiment groups, ACLs, unprivileged accounts.

Everything runs for real: system accounts and groups are created (and removed afterwards), and each
check runs a Python process as that account the way JupyterHub's LocalProcessSpawner starts a server
(``set_user_setuid``: uid, gid and the supplementary groups of the account).
"""

from __future__ import annotations

import grp
import json
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from jupyterhub.spawner import set_user_setuid

from runner.archive.permissions import ExperimentGroups, experiment_group, instrument_group
from runner.archive.store import Archive
from runner.bus.models import JobState, StatusEvent
from runner.hub.access import Access
from runner.hub.accounts import build_reductions_tree, ensure_account, groups_of

SYSTEM_PYTHON = "/usr/bin/python3"
USERS = {"nbrtest-alice": Access(rbs=frozenset({"7771001"})),
         "nbrtest-carol": Access(instruments=frozenset({"MARI"})),
         "nbrtest-mallory": Access()}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="creates system accounts: the embedded platform as root")


@pytest.fixture(scope="module")
def shared() -> Iterator[Path]:
    """A folder other accounts can reach (pytest's own temporary folders are private to root)."""
    folder = Path(tempfile.mkdtemp(prefix="nbreduce-isolation-", dir="/tmp"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture(scope="module")
def archive(shared: Path) -> Iterator[Path]:
    root = shared / "archive"
    store = Archive(root, ExperimentGroups())
    store.permissions.root(root)
    for job, inst, rb, run in (("a", "MARI", "7771001", 1), ("b", "MARI", "7771003", 2), ("c", "WISH", "7771002", 3)):
        reservation = store.reserve(job, inst, rb, [run])
        reservation.staged_notebook.write_text("{}")
        (reservation.final / "result.txt").write_text(f"{inst} {rb}")
        store.publish(reservation, StatusEvent(job_id=job, state=JobState.SUCCEEDED, instrument=inst, rb_number=rb,
                                               run_number=run))
    yield root
    for name in USERS:
        subprocess.run(["userdel", name], capture_output=True)
    for group in [experiment_group(r) for r in ("7771001", "7771002", "7771003")]:
        subprocess.run(["groupdel", group], capture_output=True)


def as_user(name: str, code: str) -> dict:
    """Run ``code`` (which sets ``result``) as ``name`` with the account's groups; returns ``result``."""
    script = f"import json, os\nresult = {{}}\n{code}\nprint(json.dumps(result))"
    out = subprocess.run([SYSTEM_PYTHON, "-c", script], preexec_fn=set_user_setuid(name), capture_output=True,
                         text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


PROBE = """
def attempt(what, action):
    try:
        action()
        result[what] = "allowed"
    except PermissionError:
        result[what] = "denied"
    except OSError as exc:
        result[what] = type(exc).__name__
a = {root!r}
attempt("list archive", lambda: os.listdir(a))
attempt("list MARI", lambda: os.listdir(a + "/MARI"))
attempt("list own RB", lambda: os.listdir(a + "/MARI/RB7771001"))
attempt("read own file", lambda: open(a + "/MARI/RB7771001/1/v1/result.txt").read())
attempt("write own version", lambda: open(a + "/MARI/RB7771001/1/v1/new.txt", "w"))
attempt("overwrite own file", lambda: open(a + "/MARI/RB7771001/1/v1/result.txt", "a"))
attempt("list other RB", lambda: os.listdir(a + "/MARI/RB7771003"))
attempt("read other file", lambda: open(a + "/MARI/RB7771003/2/v1/result.txt").read())
attempt("read other instrument", lambda: open(a + "/WISH/RB7771002/3/v1/result.txt").read())
"""


def test_the_operating_system_enforces_experiment_membership(archive: Path, shared: Path) -> None:
    for name, access in USERS.items():
        entry = ensure_account(name, shared / "homes" / name, groups_of(access))
        assert entry.pw_uid != 0 and entry.pw_shell == "/usr/sbin/nologin"
    assert {g.gr_name for g in grp.getgrall() if "nbrtest-alice" in g.gr_mem} == {experiment_group("7771001")}
    assert {g.gr_name for g in grp.getgrall() if "nbrtest-carol" in g.gr_mem} == {instrument_group("MARI")}

    alice = as_user("nbrtest-alice", PROBE.format(root=str(archive)))
    assert alice == {"list archive": "denied", "list MARI": "denied", "list own RB": "allowed",
                     "read own file": "allowed", "write own version": "denied", "overwrite own file": "denied",
                     "list other RB": "denied", "read other file": "denied", "read other instrument": "denied"}
    carol = as_user("nbrtest-carol", PROBE.format(root=str(archive)))  # MARI's instrument scientist
    assert carol["list MARI"] == carol["list own RB"] == carol["read other file"] == "allowed"
    assert carol["read other instrument"] == carol["list archive"] == carol["write own version"] == "denied"
    mallory = as_user("nbrtest-mallory", PROBE.format(root=str(archive)))
    assert set(mallory.values()) == {"denied"}


def test_membership_changes_are_applied_at_the_next_spawn(archive: Path, shared: Path) -> None:
    ensure_account("nbrtest-alice", shared / "homes" / "nbrtest-alice", groups_of(Access(rbs=frozenset({"7771003"}))))
    moved = as_user("nbrtest-alice", PROBE.format(root=str(archive)))
    assert moved["read own file"] == "denied" and moved["read other file"] == "allowed"


def test_reductions_tree_links_only_what_the_user_may_read(archive: Path, shared: Path) -> None:
    access = Access(rbs=frozenset({"7771001"}))
    entry = ensure_account("nbrtest-alice", shared / "homes" / "nbrtest-alice", groups_of(access))
    tree = shared / "homes" / "nbrtest-alice" / "reductions"
    build_reductions_tree(tree, archive, access, ["MARI", "WISH", "LOQ"], owner=entry)
    links = sorted(str(p.relative_to(tree)) for p in tree.rglob("*") if p.is_symlink())
    assert links == ["LOQ/RB7771001", "MARI/RB7771001", "WISH/RB7771001"]  # dangling until a run appears
    seen = as_user("nbrtest-alice", f"result['runs'] = os.listdir({str(tree / 'MARI' / 'RB7771001')!r})")
    assert seen == {"runs": ["1"]}
    build_reductions_tree(tree, archive, Access(instruments=frozenset({"MARI"})), ["MARI", "WISH"], owner=entry)
    assert sorted(p.name for p in tree.iterdir()) == ["MARI"] and (tree / "MARI").resolve() == archive / "MARI"
