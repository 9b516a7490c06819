"""The single-user servers' environment: JupyterLab, the hub's single-user app and nbreduce, runnable by any account.

Servers of unprivileged accounts cannot use the hub's own interpreter when it lives under /root (a
venv's interpreter is its base interpreter). The ``lab`` processing environment (environments/lab: the
hub's and JupyterLab's pinned versions, and the project itself) is built like any other, on an
interpreter every account may run (``kernels.python``), plus JupyterLab's settings overrides (no news
pop-up at every start). The production equivalent is the lab image (deploy/images/lab).
"""

from __future__ import annotations

import json
from pathlib import Path

from runner.config import Settings
from runner.kernels.environments import BuildError, build, load

LAB_ENVIRONMENT = "lab"
#: JupyterLab settings every user gets (overrides.json): no "get notified about news?" pop-up at each start.
LAB_OVERRIDES = {
    "@jupyterlab/apputils-extension:notification": {"fetchNews": "false", "checkForUpdates": False},
}


def write_overrides(prefix: Path) -> None:
    """JupyterLab of the environment at ``prefix`` reads its settings overrides here."""
    folder = prefix / "share" / "jupyter" / "lab" / "settings"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "overrides.json").write_text(json.dumps(LAB_OVERRIDES, indent=2))


def lab_python(settings: Settings) -> Path:
    """The interpreter of the lab environment, built (from the uv cache: seconds) when its lock changed."""
    [result] = build(settings, [LAB_ENVIRONMENT])
    if result.status not in ("built", "unchanged"):
        raise BuildError(f"the lab environment could not be built: {result.message}")
    prefix = load(LAB_ENVIRONMENT, settings.environments).build_dir(settings)
    write_overrides(prefix)
    return prefix / "bin" / "python"
