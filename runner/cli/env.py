"""``nbreduce env``: processing environments."""

from __future__ import annotations

import click

from runner.config import Settings
from runner.kernels.environments import build, lock, status


@click.group("env")
def env_commands() -> None:
    """Processing environments: pinned software stacks, each exposed as Jupyter kernels."""


@env_commands.command("build")
@click.argument("names", nargs=-1)
@click.option("--all", "all_", is_flag=True, help="Build every environment (the default without NAME).")
def build_command(names: tuple[str, ...], all_: bool) -> None:
    """Build environments whose spec changed; unchanged ones are left as they are."""
    if names and all_:
        raise click.UsageError("give NAMEs or --all, not both")
    results = build(Settings.from_env(), names or None)
    for result in results:
        label = f"{result.environment}" + (f" ({result.hash12})" if result.hash12 else "")
        click.echo(f"{label}: {result.status}" + (f": {result.message}" if result.message else ""),
                   err=result.status in ("failed", "unavailable"))
    # asked for by name, an unavailable environment is an error; with --all it is only reported
    if any(r.status == "failed" or (names and r.status == "unavailable") for r in results):
        raise SystemExit(1)


@env_commands.command("list")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per environment.")
def list_command(as_json: bool) -> None:
    """Environments, their spec hash and build state (built / missing / outdated)."""
    rows = status(Settings.from_env())
    if as_json:
        for row in rows:
            click.echo(row.model_dump_json())
        return
    click.echo(f"{'NAME':<12} {'KIND':<6} {'HASH':<13} {'STATE':<9} {'PYTHON':<8} {'PKGS':>5}  BUILDS")
    for row in rows:
        click.echo(f"{row.name:<12} {row.kind:<6} {row.hash12:<13} {row.state:<9} {row.python_version or '-':<8} "
                   f"{row.packages if row.packages is not None else '-':>5}  {','.join(row.builds) or '-'}"
                   + (f"  ({row.note})" if row.note else ""))


@env_commands.command("lock")
@click.argument("name")
@click.option("--upgrade", is_flag=True, help="Re-resolve every pin instead of keeping the existing ones.")
def lock_command(name: str, upgrade: bool) -> None:
    """Compile environments/NAME/requirements.in into requirements.lock (hashes included)."""
    click.echo(lock(name, Settings.from_env().environments, upgrade=upgrade))

