"""Processing environments: discovery, hashing, idempotent builds keyed by hash, kernelspec registration.

Builds are real (``uv venv`` + locked install of the ``minimal`` environment); the uv cache makes
every build after the first a matter of seconds.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
import shutil
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.cli.env import env_commands
from runner.config import Settings
from runner.kernels import environments as envs

REPO_ENVIRONMENTS = Path(__file__).resolve().parent.parent / "environments"


@pytest.fixture
def env_root(tmp_path: Path) -> Path:
    """A private copy of the minimal environment that a test may change."""
    root = tmp_path / "environments"
    shutil.copytree(REPO_ENVIRONMENTS / "minimal", root / "minimal")
    return root


def test_repository_environments_are_discovered_with_their_spec_hash() -> None:
    found = envs.discover(REPO_ENVIRONMENTS)
    assert {"minimal", "scipp", "mantid"} <= found.keys()
    assert (found["minimal"].kind, found["scipp"].kind, found["mantid"].kind) == ("uv", "uv", "conda")
    for env in found.values():
        assert env.hash12 == hashlib.sha256(env.spec.read_bytes()).hexdigest()[:12]
        assert env.kernel_name == f"nbreduce-{env.name}"
        assert env.exact_kernel_name == f"nbreduce-{env.name}-{env.hash12}"
    assert "import scipp" in found["scipp"].config.preload
    assert envs.preload_by_kernel(REPO_ENVIRONMENTS)["nbreduce-minimal"] == ["import numpy"]


@pytest.mark.parametrize("name", ["minimal", "scipp"])
def test_locks_pin_the_versions_the_runner_runs_with(name: str) -> None:
    """A template must behave the same in its environment and in the runner's own venv."""
    lock = (REPO_ENVIRONMENTS / name / envs.LOCK_NAME).read_text()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==([^\s\\]+)", lock, flags=re.MULTILINE))
    assert "ipykernel" in pins and "--hash=sha256:" in lock
    for dist, version in pins.items():
        try:
            installed = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        assert installed == version, f"{name}: {dist} locked {version}, runner has {installed}"


def test_build_registers_current_and_exact_kernelspecs(built: Settings) -> None:
    env = envs.load("minimal", REPO_ENVIRONMENTS)
    build_dir = env.build_dir(built)
    record = envs.read_record(build_dir)
    assert record is not None and record.hash12 == env.hash12 and record.python_version.startswith("3.")
    assert "numpy==2.4.6" in (build_dir / envs.FREEZE_NAME).read_text().splitlines()
    assert record.packages == len((build_dir / envs.FREEZE_NAME).read_text().split())

    ksm = envs.kernel_spec_manager(built)
    current = ksm.get_kernel_spec("nbreduce-minimal")
    exact = ksm.get_kernel_spec(f"nbreduce-minimal-{env.hash12}")
    for spec, is_exact in ((current, False), (exact, True)):
        assert spec.argv[0] == str(build_dir / "bin" / "python") and Path(spec.argv[0]).exists()
        assert "minimal" in spec.display_name and env.hash12 in spec.display_name
        assert spec.metadata["nbreduce"] == {"environment": "minimal", "hash12": env.hash12, "sha256": env.sha256,
                                             "kind": "uv", "build_dir": str(build_dir), "exact": is_exact}
        assert spec.env["NBREDUCE_ENVIRONMENT_HASH"] == env.hash12
    assert envs.jupyter_env(built, {"JUPYTER_PATH": "/x"})["JUPYTER_PATH"] == f"{built.jupyter_dir}:/x"


def test_second_build_is_a_no_op(built: Settings) -> None:
    env = envs.load("minimal", REPO_ENVIRONMENTS)
    record_file = env.build_dir(built) / envs.RECORD_NAME
    before = record_file.stat()
    [result] = envs.build(built, ["minimal"], root=REPO_ENVIRONMENTS)
    assert result.status == "unchanged" and result.hash12 == env.hash12
    after = record_file.stat()
    assert (after.st_ino, after.st_mtime_ns) == (before.st_ino, before.st_mtime_ns)
    assert not [p for p in built.envs_dir.iterdir() if p.name.startswith(".tmp-")]


def test_changed_lock_gets_a_new_build_and_the_old_one_stays_usable(home: Path, env_root: Path) -> None:
    settings = Settings.from_env()
    [first] = envs.build(settings, ["minimal"], root=env_root)
    assert first.status == "built"
    lock = env_root / "minimal" / envs.LOCK_NAME
    lock.write_text(lock.read_text() + "# touched: a new spec is a new build\n")
    [second] = envs.build(settings, ["minimal"], root=env_root)
    assert second.status == "built" and second.hash12 != first.hash12

    ksm = envs.kernel_spec_manager(settings)
    old = ksm.get_kernel_spec(f"nbreduce-minimal-{first.hash12}")
    assert old.metadata["nbreduce"]["hash12"] == first.hash12 and Path(old.argv[0]).exists()
    assert ksm.get_kernel_spec("nbreduce-minimal").metadata["nbreduce"]["hash12"] == second.hash12
    [row] = envs.status(settings, env_root)
    assert row.state == "built" and row.hash12 == second.hash12
    assert set(row.builds) == {first.hash12, second.hash12}

    lock.write_text(lock.read_text() + "# not built yet\n")
    [row] = envs.status(settings, env_root)
    assert row.state == "outdated"


def test_failed_build_registers_nothing(home: Path, env_root: Path) -> None:
    """A lock without ipykernel installs fine but cannot serve as a kernel: the build must fail whole."""
    lock = env_root / "minimal" / envs.LOCK_NAME
    numpy_only = re.search(r"^numpy==.*?(?=^\S)", lock.read_text(), flags=re.MULTILINE | re.DOTALL)
    assert numpy_only
    lock.write_text(numpy_only.group(0))
    settings = Settings.from_env()
    [result] = envs.build(settings, ["minimal"], root=env_root)
    assert result.status == "failed" and "ipykernel" in result.message
    assert [p.name for p in settings.envs_dir.iterdir() if not p.name.endswith(".lock")] == []
    assert not envs.kernels_dir(settings).exists()
    assert envs.status(settings, env_root)[0].state == "missing"


def test_conda_environment_says_clearly_it_is_not_buildable_here(home: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NBREDUCE_KERNELS__CONDA", "no-such-conda-frontend")
    runner = CliRunner()
    result = runner.invoke(env_commands, ["build", "mantid"])
    assert result.exit_code == 1
    assert "mantid: unavailable" in result.output and "conda" in result.output
    assert not envs.kernels_dir(Settings.from_env()).exists()

    listing = runner.invoke(env_commands, ["list", "--json"])
    assert listing.exit_code == 0
    rows = {row["name"]: row for row in map(json.loads, listing.output.splitlines())}
    assert rows["mantid"]["state"] == "missing" and "not buildable here" in rows["mantid"]["note"]


FAKE_MICROMAMBA = '''#!{python}
"""Stand-in for micromamba (no conda channels here): a venv with the minimal lock plays the conda prefix."""
import json, subprocess, sys
args = sys.argv[1:]
if args[0] == "create":
    prefix, spec = args[args.index("--prefix") + 1], args[args.index("--file") + 1]
    subprocess.run([{uv!r}, "venv", "--quiet", prefix], check=True)
    if "unsolvable" in open(spec).read():
        sys.exit("error: nothing provides unsolvable")
    subprocess.run([{uv!r}, "pip", "install", "--quiet", "--python", prefix + "/bin/python", "-r", {lock!r}],
                   check=True)
elif args[:2] == ["env", "export"]:
    print("name: fake\\ndependencies:\\n  - python=3.11")
elif args[0] == "list":
    print(json.dumps([{{"name": "python"}}, {{"name": "ipykernel"}}]))
'''


@pytest.fixture
def fake_micromamba(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    script = tmp_path / "bin" / "micromamba"
    script.parent.mkdir()
    script.write_text(FAKE_MICROMAMBA.format(python=sys.executable, uv=envs.uv_bin(),
                                             lock=str(REPO_ENVIRONMENTS / "minimal" / envs.LOCK_NAME)))
    script.chmod(0o755)
    monkeypatch.setenv("NBREDUCE_KERNELS__CONDA", str(script))
    return script


def test_conda_build_plumbing_with_a_stand_in_frontend(home: Path, tmp_path: Path, fake_micromamba: Path) -> None:
    root = tmp_path / "environments"
    shutil.copytree(REPO_ENVIRONMENTS / "mantid", root / "mantid")
    settings = Settings.from_env()
    [result] = envs.build(settings, ["mantid"], root=root)
    assert result.status == "built", result.message
    record = envs.read_record(result.path)
    assert record is not None and (record.kind, record.packages, record.builder) == ("conda", 2, "micromamba")
    assert (result.path / envs.FREEZE_NAME).read_text().startswith("name: fake")
    spec = envs.kernel_spec_manager(settings).get_kernel_spec(f"nbreduce-mantid-{result.hash12}")
    assert spec.metadata["nbreduce"]["kind"] == "conda" and Path(spec.argv[0]).exists()
    assert envs.build(settings, ["mantid"], root=root)[0].status == "unchanged"

    spec_file = root / "mantid" / envs.CONDA_SPEC
    spec_file.write_text(spec_file.read_text() + "  - unsolvable\n")
    [failed] = envs.build(settings, ["mantid"], root=root)
    assert failed.status == "failed" and "nothing provides unsolvable" in failed.message
    assert not envs.load("mantid", root).build_dir(settings).exists()  # the in-place prefix was removed
    assert envs.kernel_spec_manager(settings).get_kernel_spec("nbreduce-mantid").metadata["nbreduce"]["hash12"] \
        == result.hash12  # the current alias still points at the last good build


def test_kernel_names_accept_the_hash_forms_reruns_carry() -> None:
    digest = "AB" * 32
    assert envs.kernel_name("scipp") == "nbreduce-scipp"
    assert envs.kernel_name("scipp", f"sha256:{digest}") == f"nbreduce-scipp-{'ab' * 6}"
    assert envs.kernel_name("scipp", "abababababab") == "nbreduce-scipp-abababababab"
    with pytest.raises(ValueError):
        envs.normalise_hash("xyz")


def test_invalid_environment_folders_are_rejected(tmp_path: Path) -> None:
    (tmp_path / "Bad Name").mkdir()
    (tmp_path / "Bad Name" / envs.CONFIG_NAME).write_text("")
    (tmp_path / "nospec").mkdir()
    (tmp_path / "nospec" / envs.CONFIG_NAME).write_text('description = "x"\n')
    (tmp_path / "nospec" / envs.REQUIREMENTS_IN).write_text("numpy\n")
    with pytest.raises(envs.EnvironmentSpecError, match="invalid"):
        envs.load("Bad Name", tmp_path)
    with pytest.raises(envs.EnvironmentSpecError, match="env lock nospec"):
        envs.load("nospec", tmp_path)
    assert envs.discover(tmp_path) == {}


def test_python_request_must_match_the_lock(env_root: Path) -> None:
    """The hash covers the lock only, so a lock compiled for another interpreter is refused, not built."""
    config = env_root / "minimal" / envs.CONFIG_NAME
    config.write_text(config.read_text().replace('python = "3.11"', 'python = "3.12"'))
    with pytest.raises(envs.EnvironmentSpecError, match="env lock minimal"):
        envs.load("minimal", env_root)


def test_uv_inherits_pip_index_settings_unless_uv_has_its_own() -> None:
    bridged = envs.uv_environ({"PIP_INDEX_URL": "https://mirror/simple", "PIP_FIND_LINKS": "/wheels",
                               "VIRTUAL_ENV": "/venv"})
    assert bridged["UV_INDEX_URL"] == "https://mirror/simple" and bridged["UV_FIND_LINKS"] == "/wheels"
    assert "VIRTUAL_ENV" not in bridged and bridged["UV_PYTHON_DOWNLOADS"] == "never"
    own = envs.uv_environ({"PIP_INDEX_URL": "https://mirror/simple", "UV_DEFAULT_INDEX": "https://uv/simple"})
    assert "UV_INDEX_URL" not in own
