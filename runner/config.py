"""Settings of one nbreduce installation, read from the environment.

Every command started with the same ``NBREDUCE_HOME`` finds the embedded broker and the
archive without further configuration: all local state lives under that folder.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pydantic import BaseModel, Field

PACKAGE_DIR = Path(__file__).resolve().parent
SOURCE_NOTEBOOKS = PACKAGE_DIR.parent / "notebooks"
BUNDLED_NOTEBOOKS = PACKAGE_DIR / "_bundled" / "notebooks"


def _default_notebooks() -> Path:
    """Templates of a source checkout win; an installed wheel carries its own copy."""
    return SOURCE_NOTEBOOKS if SOURCE_NOTEBOOKS.is_dir() else BUNDLED_NOTEBOOKS


class Settings(BaseModel):
    """Resolved configuration; build it with :meth:`from_env`."""

    home: Path
    bootstrap_servers: str | None = None
    archive: Path
    data_roots: list[Path]
    notebooks: Path
    runner_group: str = "nbreduce-runners"
    max_parallel: int = Field(2, ge=1)
    file_wait_seconds: float = Field(120.0, ge=0)
    #: Processing environments this runner serves (None: all). Runners of other environments use
    #: their own consumer group (``NBREDUCE_RUNNER_GROUP``), so each group sees every request once.
    runner_environments: list[str] | None = None
    #: Warm kernels per kernel name, e.g. ``nbreduce-scipp=2,python3=1``; ``auto``: every enabled
    #: template's kernel, as many as run in parallel; ``0``: always cold-start.
    warm_kernels: str = "auto"
    #: Start kernels of uv environments by forking a per-environment server that did the preload once.
    fork_servers: bool = True

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> Settings:
        env = dict(os.environ if env is None else env)
        home = Path(env.get("NBREDUCE_HOME", "~/.nbreduce")).expanduser().resolve()
        roots = env.get("NBREDUCE_DATA_ROOTS")
        return cls(
            home=home,
            bootstrap_servers=env.get("NBREDUCE_BOOTSTRAP_SERVERS") or None,
            archive=Path(env.get("NBREDUCE_ARCHIVE", home / "archive")).expanduser().resolve(),
            data_roots=[Path(p).expanduser().resolve() for p in roots.split(os.pathsep) if p]
            if roots
            else [home / "data"],
            notebooks=Path(env.get("NBREDUCE_NOTEBOOKS", _default_notebooks())).expanduser().resolve(),
            runner_group=env.get("NBREDUCE_RUNNER_GROUP", "nbreduce-runners"),
            max_parallel=int(env.get("NBREDUCE_MAX_PARALLEL", "2")),
            file_wait_seconds=float(env.get("NBREDUCE_FILE_WAIT_SECONDS", "120")),
            runner_environments=[e.strip() for e in env["NBREDUCE_RUNNER_ENVIRONMENTS"].split(",") if e.strip()]
            if env.get("NBREDUCE_RUNNER_ENVIRONMENTS") else None,
            warm_kernels=env.get("NBREDUCE_WARM_KERNELS", "auto"),
            fork_servers=env.get("NBREDUCE_FORK_SERVERS", "1").lower() not in ("0", "false", "no", "off"),
        )

    @property
    def broker_dir(self) -> Path:
        return self.home / "broker"

    @property
    def jupyter_dir(self) -> Path:
        """The project's own Jupyter data dir (kernelspecs of built environments live in ``kernels/``)."""
        return self.home / "jupyter"

    @property
    def envs_dir(self) -> Path:
        """Built processing environments, one folder per environment name and lock hash."""
        return self.home / "envs"

    @property
    def broker_state_file(self) -> Path:
        return self.broker_dir / "broker.json"

    def bootstrap(self) -> str:
        """The broker to talk to: explicit setting first, else the embedded broker of this home."""
        if self.bootstrap_servers:
            return self.bootstrap_servers
        try:
            state = json.loads(self.broker_state_file.read_text())
            return str(state["bootstrap"])
        except (OSError, ValueError, KeyError):
            raise BrokerNotConfigured(
                f"no broker: set NBREDUCE_BOOTSTRAP_SERVERS or run `nbreduce broker start` "
                f"(NBREDUCE_HOME={self.home})"
            ) from None


class BrokerNotConfigured(RuntimeError):
    """Raised when neither an explicit nor an embedded broker is known."""
