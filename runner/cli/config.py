"""``nbreduce config``: the effective settings, or the reference table of every setting."""

from __future__ import annotations

import json

import click

from runner.cli.common import load_settings
from runner.config import reference


@click.command()
@click.option("--reference", "as_reference", is_flag=True, help="Markdown table of every setting (docs/operations.md).")
@click.option("--env", "as_env", is_flag=True, help="As NBREDUCE_* variables (secrets included: careful).")
def config(as_reference: bool, as_env: bool) -> None:
    """Show the settings this installation runs with (from NBREDUCE_* variables and their defaults)."""
    if as_reference:
        click.echo(reference())
        return
    settings = load_settings()
    if as_env:
        for key, value in sorted(settings.to_env().items()):
            click.echo(f"{key}={value}")
        return
    click.echo(json.dumps(settings.model_dump(mode="json"), indent=2))
