"""``nbreduce replay``."""

from __future__ import annotations

import json

import click

from runner.bus.replay import ReplayError, replay
from runner.cli.common import broker_settings


@click.command("replay")
@click.option("--id", "ids", multiple=True, metavar="DEAD_LETTER_ID", help="Dead letter to replay (repeatable).")
@click.option("--reason", default=None, metavar="SUBSTRING", help="Only letters whose reason contains this.")
@click.option("--topic", default=None, metavar="SOURCE", help="Only letters from this source topic.")
@click.option("--all", "all_letters", is_flag=True, help="Select every dead letter (needed when no filter is given).")
@click.option("--dry-run", is_flag=True, help="Show what would be replayed, send nothing.")
@click.option("--force", is_flag=True, help="Replay letters that were replayed before.")
@click.option("--json", "as_json", is_flag=True)
def replay_command(ids: tuple[str, ...], reason: str | None, topic: str | None, all_letters: bool, dry_run: bool,
                   force: bool, as_json: bool) -> None:
    """Re-send dead letters to their source topic after the cause was fixed (each one once)."""
    try:
        results = replay(broker_settings(), ids, reason=reason, topic=topic, all_letters=all_letters,
                         dry_run=dry_run, force=force)
    except ReplayError as exc:
        raise click.UsageError(str(exc)) from None
    if as_json:
        click.echo(json.dumps([r.model_dump(mode="json", exclude_none=True) for r in results], indent=2))
    elif not results:
        click.echo("no dead letter matches")
    else:
        for r in results:
            where = f" -> {r.source_topic}[{r.partition}]@{r.offset}" if r.status == "replayed" else ""
            click.echo(f"{r.status:12} {r.dead_letter_id}{where}  {r.reason or ''}".rstrip())
            if r.detail:
                click.echo(f"{'':12} {r.detail}")
    problems = [r for r in results if r.status in ("refused", "not-found", "failed")]
    if problems:
        raise click.ClickException(f"{len(problems)} dead letter(s) not replayed (see above)")
