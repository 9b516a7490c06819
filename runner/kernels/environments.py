"""Processing environments: one pinned software stack per instrument or technique, built by content hash.

Each folder ``environments/<name>/`` holds a spec (``requirements.lock`` compiled by uv from
``requirements.in``, or a conda ``environment.yml``) and ``environment.toml`` (description, Python
version, preload statements for warm kernels). A build lives in ``<envs_dir>/<name>-<hash12>`` where
``hash12`` is the short sha256 of the spec, so a changed spec never disturbs a build that older
results (and reruns) still refer to. Every build is exposed as two kernelspecs:
``nbreduce-<name>`` (the current spec) and ``nbreduce-<name>-<hash12>`` (exactly that build).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tomllib
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Literal

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_core.paths import jupyter_path
from pydantic import BaseModel, Field, ValidationError

from runner.atomic import write_atomic
from runner.bus.models import utcnow
from runner.config import PACKAGE_DIR, Settings

log = logging.getLogger(__name__)

CONFIG_NAME = "environment.toml"
REQUIREMENTS_IN = "requirements.in"
LOCK_NAME = "requirements.lock"
CONDA_SPEC = "environment.yml"
#: Written last into a build folder: a build without it is incomplete and never used.
RECORD_NAME = "nbreduce-build.json"
#: Installed distributions of a build (``uv pip freeze`` / ``conda env export``), kept for provenance.
FREEZE_NAME = "installed-packages.txt"
KERNEL_PREFIX = "nbreduce-"
#: The source checkout, installed into environments that ask for the project (``project = true``).
PROJECT_DIR = PACKAGE_DIR.parent
#: Entry point name of runner.kernels.provisioner.ForkProvisioner, named in the kernelspecs of uv builds.
FORK_PROVISIONER = "nbreduce-fork"
HASH_LEN = 12
#: Conda front ends tried in this order; ``kernels.conda`` names one explicitly.
CONDA_FRONTENDS = ("micromamba", "mamba", "conda")
_NAME_PATTERN = r"^[a-z][a-z0-9_-]{0,39}$"  # folder and kernel name: jupyter looks kernels up lower-cased


class EnvironmentSpecError(LookupError):
    """An environment does not exist or its folder is invalid; the message says which and why."""


class BuildError(RuntimeError):
    """A build failed; nothing of it was registered."""


class BuildUnavailable(BuildError):
    """The environment cannot be built on this machine (e.g. a conda spec without a conda front end)."""


class EnvironmentConfig(BaseModel):
    """Contents of ``environment.toml``."""

    name: str = Field(pattern=_NAME_PATTERN)
    description: str = ""
    #: Interpreter request handed to ``uv venv --python`` (ignored for conda specs, which pin python).
    python: str = f"{sys.version_info.major}.{sys.version_info.minor}"
    #: Python statements run in every warm kernel before it is handed out (imports, mostly).
    preload: list[str] = Field(default_factory=list)
    #: Register kernelspecs for it (false for the servers' own environment, which is not a kernel).
    kernel: bool = True
    #: Install the nbreduce project itself into it (editable, no dependencies: the lock has them).
    project: bool = False


class Environment(BaseModel):
    """A discovered environment spec and its content hash."""

    config: EnvironmentConfig
    path: Path
    kind: Literal["uv", "conda"]
    spec: Path
    sha256: str

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def hash12(self) -> str:
        return self.sha256[:HASH_LEN]

    @property
    def kernel_name(self) -> str:
        return kernel_name(self.name)

    @property
    def exact_kernel_name(self) -> str:
        return kernel_name(self.name, self.hash12)

    def build_dir(self, settings: Settings) -> Path:
        return settings.envs_dir / f"{self.name}-{self.hash12}"


class BuildRecord(BaseModel):
    """``nbreduce-build.json``: what a build folder contains, for ``env list`` and run provenance."""

    environment: str
    kind: Literal["uv", "conda"]
    hash12: str
    sha256: str
    spec_name: str
    python_version: str
    packages: int
    built_at: datetime = Field(default_factory=utcnow)
    builder: str
    path: Path
    #: The interpreter requested from uv (``kernels.python``, else environment.toml's version).
    python_request: str | None = None


class BuildResult(BaseModel):
    environment: str
    hash12: str | None = None
    status: Literal["built", "unchanged", "unavailable", "failed"]
    path: Path | None = None
    message: str = ""


class EnvironmentStatus(BaseModel):
    """One row of ``nbreduce env list``."""

    name: str
    kind: Literal["uv", "conda"]
    description: str
    hash12: str
    state: Literal["built", "missing", "outdated"]
    kernel_name: str
    python_version: str | None = None
    packages: int | None = None
    #: Hashes of every complete build on disk, newest first: each is still runnable by its exact kernel.
    builds: list[str] = Field(default_factory=list)
    note: str = ""


def kernel_name(environment: str, hash12: str | None = None) -> str:
    """Kernelspec name of an environment's current build, or of the build with ``hash12``."""
    if hash12 is None:
        return f"{KERNEL_PREFIX}{environment}"
    return f"{KERNEL_PREFIX}{environment}-{normalise_hash(hash12)}"


def normalise_hash(value: str) -> str:
    """Accept ``sha256:<hex>``, a full hex digest or its 12-character form (what reruns may carry)."""
    digest = value.split(":", 1)[-1].strip().lower()
    if len(digest) < HASH_LEN or any(c not in "0123456789abcdef" for c in digest):
        raise ValueError(f"not an environment hash: {value!r}")
    return digest[:HASH_LEN]


def _read_config(folder: Path) -> EnvironmentConfig:
    config_path = folder / CONFIG_NAME
    if not config_path.is_file():
        raise EnvironmentSpecError(f"no environment {folder.name!r} (expected {config_path})")
    try:
        config = EnvironmentConfig(**{"name": folder.name, **tomllib.loads(config_path.read_text())})
    except (tomllib.TOMLDecodeError, ValidationError, OSError) as exc:
        raise EnvironmentSpecError(f"{config_path} is invalid: {exc}") from exc
    if config.name != folder.name:
        raise EnvironmentSpecError(f"{config_path}: name {config.name!r} differs from its folder {folder.name!r}")
    return config


def load(name: str, root: Path) -> Environment:
    """The environment ``name`` under ``root`` (``Settings.environments``)."""
    folder = root / name
    config = _read_config(folder)
    lock, conda = folder / LOCK_NAME, folder / CONDA_SPEC
    if lock.is_file() and conda.is_file():
        raise EnvironmentSpecError(f"{folder}: has both {LOCK_NAME} and {CONDA_SPEC}; keep one")
    if lock.is_file():
        kind, spec = "uv", lock
    elif conda.is_file():
        kind, spec = "conda", conda
    else:
        hint = f" (run `nbreduce env lock {name}`)" if (folder / REQUIREMENTS_IN).is_file() else ""
        raise EnvironmentSpecError(f"{folder}: no {LOCK_NAME} or {CONDA_SPEC}{hint}")
    content = spec.read_bytes()
    locked_for = re.search(rb"^#\s+nbreduce env lock \S+ \(python (\S+)\)", content, flags=re.MULTILINE)
    if kind == "uv" and locked_for and locked_for.group(1).decode() != config.python:
        # the hash covers the lock only, so the interpreter it was compiled for must match the request
        raise EnvironmentSpecError(
            f"{folder}: {CONFIG_NAME} asks for python {config.python} but {LOCK_NAME} was compiled for "
            f"python {locked_for.group(1).decode()}; run `nbreduce env lock {name}`")
    digest = hashlib.sha256(content).hexdigest()
    return Environment(config=config, path=folder, kind=kind, spec=spec, sha256=digest)  # type: ignore[arg-type]


def discover(root: Path) -> dict[str, Environment]:
    """All valid environments under ``root``; invalid folders are logged and left out."""
    found: dict[str, Environment] = {}
    if not root.is_dir():
        return found
    for folder in sorted(p for p in root.iterdir() if (p / CONFIG_NAME).is_file()):
        try:
            found[folder.name] = load(folder.name, root)
        except EnvironmentSpecError as exc:
            log.warning("skipping environment: %s", exc)
    return found


def preload_by_kernel(root: Path) -> dict[str, list[str]]:
    """``{kernel name: preload statements}`` for :class:`runner.kernels.pool.KernelPool`."""
    return {env.kernel_name: list(env.config.preload) for env in discover(root).values() if env.config.preload}


# --------------------------------------------------------------------------- kernelspecs


def kernels_dir(settings: Settings) -> Path:
    return settings.jupyter_dir / "kernels"


def kernel_spec_manager(settings: Settings) -> KernelSpecManager:
    """A kernelspec manager that sees nbreduce's kernels first, then the usual Jupyter ones."""
    return KernelSpecManager(kernel_dirs=[str(kernels_dir(settings)), *jupyter_path("kernels")])


def jupyter_data_path(settings: Settings, existing: str | None = None) -> str:
    """``JUPYTER_PATH`` led by nbreduce's data dir, so the instrument kernels are found first."""
    paths = [str(settings.jupyter_dir), *filter(None, (existing or "").split(os.pathsep))]
    return os.pathsep.join(dict.fromkeys(paths))


def jupyter_env(settings: Settings, base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for kernels and Jupyter processes: ``base`` (default: ours) with nbreduce's ``JUPYTER_PATH``."""
    env = dict(os.environ if base is None else base)
    env["JUPYTER_PATH"] = jupyter_data_path(settings, env.get("JUPYTER_PATH"))
    env.setdefault("PYDEVD_DISABLE_FILE_VALIDATION", "1")  # silences debugpy's frozen-modules warning per kernel
    return env


def _kernel_json(env: Environment, build_dir: Path, exact: bool) -> dict:
    which = f"build {env.hash12}" if exact else f"current, {env.hash12}"
    spec = {
        "argv": [str(build_dir / "bin" / "python"), "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"nbreduce {env.name} ({which})",
        "language": "python",
        "interrupt_mode": "signal",
        # visible to the notebook, so a reduction can record which environment really ran it
        "env": {"NBREDUCE_ENVIRONMENT": env.name, "NBREDUCE_ENVIRONMENT_HASH": env.hash12},
        "metadata": {
            "nbreduce": {"environment": env.name, "hash12": env.hash12, "sha256": env.sha256, "kind": env.kind,
                         "build_dir": str(build_dir), "exact": exact},
            "debugger": False,
        },
    }
    if env.kind == "uv":
        # forked from a preloaded fork server when the runner's pool starts it (runner.kernels.provisioner); conda
        # stacks (Mantid and its framework threads) are not known to be fork-safe and launch normally
        spec["metadata"]["kernel_provisioner"] = {
            "provisioner_name": FORK_PROVISIONER, "config": {"preload": list(env.config.preload)}}
    return spec


def register_kernels(settings: Settings, env: Environment, build_dir: Path) -> list[str]:
    """Write (or refresh) the exact and the current kernelspec of a complete build; returns their names."""
    names = []
    for name, exact in ((env.exact_kernel_name, True), (env.kernel_name, False)):
        write_atomic(kernels_dir(settings) / name / "kernel.json",
                     json.dumps(_kernel_json(env, build_dir, exact), indent=1, default=str))
        names.append(name)
    return names


# --------------------------------------------------------------------------- builds


def uv_bin() -> str:
    """The uv executable: the one of the ``uv`` package installed with the runner, else uv on PATH."""
    try:
        from uv import find_uv_bin

        return find_uv_bin()
    except (ImportError, FileNotFoundError):
        found = shutil.which("uv")
        if found is None:
            raise BuildError("uv not found: install the `uv` package into the runner's environment") from None
        return found


def uv_environ(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment for uv: pip's index settings carried over when no uv index setting is given.

    Hosts that reach PyPI through a mirror often configure only pip (``PIP_INDEX_URL`` ...); uv
    reads its own variables, so without this a build would bypass the mirror.
    """
    env = dict(os.environ if base is None else base)
    uv_keys = ("UV_INDEX_URL", "UV_DEFAULT_INDEX", "UV_INDEX", "UV_EXTRA_INDEX_URL", "UV_FIND_LINKS")
    if not any(env.get(k) for k in uv_keys):
        for pip_key, uv_key in (("PIP_INDEX_URL", "UV_INDEX_URL"), ("PIP_EXTRA_INDEX_URL", "UV_EXTRA_INDEX_URL"),
                                ("PIP_FIND_LINKS", "UV_FIND_LINKS")):
            if env.get(pip_key):
                env[uv_key] = env[pip_key]
    env.pop("VIRTUAL_ENV", None)  # builds name their interpreter explicitly
    env.setdefault("UV_PYTHON_DOWNLOADS", "never")
    return env


def _run(argv: Sequence[str], what: str, cwd: Path | None = None) -> str:
    proc = subprocess.run(list(argv), capture_output=True, text=True, env=uv_environ(), cwd=cwd, check=False)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-25:])
        raise BuildError(f"{what} failed (exit {proc.returncode}): {' '.join(map(str, argv))}\n{tail}")
    return proc.stdout


def conda_frontend(settings: Settings) -> str | None:
    """A conda front end on PATH (``kernels.conda`` first), or None."""
    explicit = settings.kernels.conda
    candidates = [explicit] if explicit else list(CONDA_FRONTENDS)
    for name in candidates:
        found = shutil.which(name)
        if found:
            return found
    return None


def read_record(build_dir: Path) -> BuildRecord | None:
    try:
        return BuildRecord.model_validate_json((build_dir / RECORD_NAME).read_text())
    except (OSError, ValueError):
        return None


def builds_of(settings: Settings, name: str) -> list[BuildRecord]:
    """Complete builds of environment ``name`` on disk, newest first."""
    if not settings.envs_dir.is_dir():
        return []
    records = [
        record
        for path in settings.envs_dir.glob(f"{name}-*")
        if path.is_dir() and len(path.name) == len(name) + 1 + HASH_LEN
        and (record := read_record(path)) is not None and record.environment == name
    ]
    return sorted(records, key=lambda r: r.built_at, reverse=True)


@contextmanager
def _build_lock(settings: Settings, name: str) -> Iterator[None]:
    """One builder per environment across processes (a CLI build racing a runner's, say)."""
    settings.envs_dir.mkdir(parents=True, exist_ok=True)
    with open(settings.envs_dir / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _probe(python: Path) -> str:
    """Python version of a build; fails the build when ipykernel is not importable there."""
    return _run([str(python), "-c", "import ipykernel, platform; print(platform.python_version())"],
                "ipykernel check").strip()


def _count_packages(freeze: str) -> int:
    return sum(1 for line in freeze.splitlines() if line.strip() and not line.lstrip().startswith("#"))


def python_request(settings: Settings, env: Environment) -> str:
    """What ``uv venv --python`` gets: ``kernels.python`` when set (an interpreter every account can run, for
    kernels of unprivileged users), else the version environment.toml asks for."""
    return settings.kernels.python or env.config.python


def _build_uv(settings: Settings, env: Environment, final: Path) -> BuildRecord:
    """venv + locked install in a temporary folder, renamed into place only when complete."""
    tmp = settings.envs_dir / f".tmp-{env.name}-{env.hash12}-{uuid.uuid4().hex[:8]}"
    uv = uv_bin()
    try:
        # relocatable: entry-point scripts find their interpreter relatively, so the rename below is safe
        _run([uv, "venv", "--quiet", "--relocatable", "--no-python-downloads", "--python",
              python_request(settings, env), str(tmp)], "uv venv")
        python = tmp / "bin" / "python"
        _run([uv, "pip", "install", "--quiet", "--python", str(python), "--requirement", str(env.spec)],
             "uv pip install")
        if env.config.project:  # the project itself, from its checkout (its dependencies are in the lock)
            _run([uv, "pip", "install", "--quiet", "--no-deps", "--python", str(python), "--editable",
                  str(PROJECT_DIR)], "uv pip install nbreduce")
        version = _probe(python)
        freeze = _run([uv, "pip", "freeze", "--python", str(python)], "uv pip freeze")
        (tmp / FREEZE_NAME).write_text(freeze)
        shutil.copy2(env.spec, tmp / env.spec.name)  # the exact spec travels with the build
        record = BuildRecord(environment=env.name, kind="uv", hash12=env.hash12, sha256=env.sha256,
                             spec_name=env.spec.name, python_version=version, packages=_count_packages(freeze),
                             builder=f"uv {_run([uv, '--version'], 'uv --version').split()[1]}", path=final,
                             python_request=python_request(settings, env))
        (tmp / RECORD_NAME).write_text(record.model_dump_json(indent=2))
        os.rename(tmp, final)
        return record
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _build_conda(settings: Settings, env: Environment, final: Path) -> BuildRecord:
    """Conda prefixes embed their path, so they are created in place; the record marks completion."""
    frontend = conda_frontend(settings)
    if frontend is None:
        raise BuildUnavailable(
            f"{env.name} is a conda environment ({env.spec}); building it needs micromamba, mamba or conda "
            f"(or NBREDUCE_KERNELS__CONDA) with its channels reachable. None is available on this machine, so it "
            f"was not built; build it where the channels are reachable (see kernels/{env.name}/Dockerfile)."
        )
    is_micromamba = Path(frontend).name.startswith("micromamba")
    create = ["create", "--yes", "--prefix", str(final), "--file", str(env.spec)] if is_micromamba else \
        ["env", "create", "--prefix", str(final), "--file", str(env.spec)]
    try:
        _run([frontend, *create], f"{Path(frontend).name} create")
        version = _probe(final / "bin" / "python")
        export = _run([frontend, "env", "export", "--prefix", str(final)], "conda env export")
        (final / FREEZE_NAME).write_text(export)
        listing = json.loads(_run([frontend, "list", "--prefix", str(final), "--json"], "conda list"))
        shutil.copy2(env.spec, final / env.spec.name)
        record = BuildRecord(environment=env.name, kind="conda", hash12=env.hash12, sha256=env.sha256,
                             spec_name=env.spec.name, python_version=version, packages=len(listing),
                             builder=Path(frontend).name, path=final)
        (final / RECORD_NAME).write_text(record.model_dump_json(indent=2))
        return record
    except BaseException:
        shutil.rmtree(final, ignore_errors=True)
        raise


def build_environment(settings: Settings, env: Environment) -> BuildResult:
    """Build ``env`` unless a complete build of its hash exists; (re)register its kernelspecs either way."""
    final = env.build_dir(settings)
    with _build_lock(settings, env.name):
        record = read_record(final)
        status: Literal["built", "unchanged"] = "unchanged"
        if record is not None and env.kind == "uv" and (record.python_request or env.config.python) != \
                python_request(settings, env):
            log.info("rebuilding environment %s: interpreter %s requested, built with %s", env.name,
                     python_request(settings, env), record.python_request or env.config.python)
            shutil.rmtree(final)
            record = None
        if record is None:
            if final.exists():  # an interrupted in-place (conda) build
                shutil.rmtree(final)
            log.info("building environment %s (%s) into %s", env.name, env.hash12, final)
            builder = _build_uv if env.kind == "uv" else _build_conda
            record = builder(settings, env, final)
            status = "built"
        if env.config.kernel:
            register_kernels(settings, env, final)
    message = f"python {record.python_version}, {record.packages} packages" + (
        f"; kernels {env.kernel_name}, {env.exact_kernel_name}" if env.config.kernel else "")
    return BuildResult(environment=env.name, hash12=env.hash12, status=status, path=final, message=message)


def build(settings: Settings, names: Sequence[str] | None = None, root: Path | None = None) -> list[BuildResult]:
    """Build the named environments (all when ``names`` is empty); failures are reported, not raised."""
    root = root or settings.environments
    targets: list[str] = list(names) if names else list(discover(root))
    results = []
    for name in targets:
        try:
            results.append(build_environment(settings, load(name, root)))
        except BuildUnavailable as exc:
            results.append(BuildResult(environment=name, status="unavailable", message=str(exc)))
        except (BuildError, EnvironmentSpecError, OSError) as exc:
            results.append(BuildResult(environment=name, status="failed", message=str(exc)))
    return results


def status(settings: Settings, root: Path | None = None) -> list[EnvironmentStatus]:
    """Every environment with its current hash and whether that hash is built."""
    rows = []
    for env in discover(root or settings.environments).values():
        records = builds_of(settings, env.name)
        current = next((r for r in records if r.hash12 == env.hash12), None)
        state: Literal["built", "missing", "outdated"] = "built" if current else ("outdated" if records else "missing")
        note = ""
        if env.kind == "conda" and current is None and conda_frontend(settings) is None:
            note = "conda spec: not buildable here (no micromamba/mamba/conda)"
        shown = current or (records[0] if records else None)
        rows.append(EnvironmentStatus(
            name=env.name, kind=env.kind, description=env.config.description, hash12=env.hash12, state=state,
            kernel_name=env.kernel_name, python_version=shown.python_version if shown else None,
            packages=shown.packages if shown else None, builds=[r.hash12 for r in records], note=note,
        ))
    return rows


def lock(name: str, root: Path, upgrade: bool = False,
         constraints: Sequence[Path] = ()) -> Path:
    """Compile ``requirements.in`` into ``requirements.lock`` with hashes (existing pins kept unless ``upgrade``)."""
    folder = root / name
    config = _read_config(folder)
    if not (folder / REQUIREMENTS_IN).is_file():
        raise EnvironmentSpecError(f"{folder}: no {REQUIREMENTS_IN} to lock")
    argv = [uv_bin(), "pip", "compile", "--quiet", "--generate-hashes", "--python-version", config.python,
            "--custom-compile-command", f"nbreduce env lock {name} (python {config.python})",
            REQUIREMENTS_IN, "--output-file", LOCK_NAME]
    argv += ["--upgrade"] if upgrade else []
    for path in constraints:
        argv += ["--constraint", str(Path(path).resolve())]
    _run(argv, "uv pip compile", cwd=folder)
    return folder / LOCK_NAME
