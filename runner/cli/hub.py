"""``nbreduce hub``."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from runner.config import Settings
from runner.hub.launch import hub_dir, run_hub


@click.command("hub")
@click.option("--port", default=8000, show_default=True, help="Public port of the hub (the proxy).")
@click.option("--ip", default="127.0.0.1", show_default=True, help="Public address to bind.")
@click.option("--membership", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Membership YAML (default: hub_config/membership.yaml).")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="JupyterHub config file (default: hub_config/jupyterhub_config.py).")
def hub_command(port: int, ip: str, membership: Path | None, config: Path | None) -> None:
    """JupyterHub with the reductions portal: scientists find and rerun the reductions of their experiments."""
    settings = Settings.from_env()
    click.echo(f"nbreduce hub on http://{ip}:{port}/ (state in {hub_dir(settings)}; demo users: docs/hub.md)")
    sys.exit(run_hub(settings, port, ip, membership, config=config))
