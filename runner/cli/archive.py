"""``nbreduce archive verify|prune`` (and ``nbreduce prune``): the archive's integrity and retention."""

from __future__ import annotations

from datetime import timedelta

import click

from runner.archive.integrity import verify
from runner.archive.prune import PruneRefused, human_size, parse_duration, prune
from runner.config import Settings


class DurationType(click.ParamType):
    name = "DURATION"

    def convert(self, value, param, ctx):
        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@click.command("prune")
@click.option("--older-than", "older_than", type=DurationType(), required=True,
              help="Remove versions that finished longer ago than this: <n>d, <n>w or <n>y.")
@click.option("--dry-run", is_flag=True, help="List what would be removed, with sizes; remove nothing.")
@click.option("--instrument", "-i", default=None, help="Only this instrument's versions.")
@click.option("--json", "as_json", is_flag=True)
def prune_command(older_than: timedelta, dry_run: bool, instrument: str | None, as_json: bool) -> None:
    """Remove old versions from the archive (never younger than NBREDUCE_RETENTION__ARCHIVE_MIN_AGE_DAYS)."""
    try:
        report = prune(Settings.from_env(), older_than, dry_run=dry_run, instrument=instrument)
    except PruneRefused as exc:
        raise click.BadParameter(str(exc), param_hint="'--older-than'") from None
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        verb = "would remove" if dry_run else "removed"
        for v in report.versions:
            status = f"FAILED ({v.error})" if v.error else verb
            click.echo(f"{status} {v.path}  {human_size(v.bytes)}  finished {v.finished_at:%Y-%m-%d}"
                       f"{' (from mtime)' if v.age_from == 'mtime' else ''}")
        click.echo(f"{verb} {report.total_versions} version(s), {human_size(report.total_bytes)} "
                   f"finished before {report.cutoff:%Y-%m-%d %H:%M} UTC under {report.archive}"
                   f"{f'; {len(report.in_progress)} in progress left alone' if report.in_progress else ''}")
    if report.errors:
        raise click.ClickException(f"{len(report.errors)} version(s) could not be removed")


@click.group("archive")
def archive_commands() -> None:
    """The archive of executed notebooks: integrity and retention."""


archive_commands.add_command(prune_command, "prune")


@archive_commands.command("verify")
@click.option("--instrument", "-i", default=None, help="Only this instrument's versions.")
@click.option("--rb", default=None, help="Only this experiment's versions.")
@click.option("--json", "as_json", is_flag=True)
def verify_command(instrument: str | None, rb: str | None, as_json: bool) -> None:
    """Compare every published version with the file digests recorded when it was published.

    Reports files changed, missing or added since; exits 1 if any version differs (or has no record).
    """
    report = verify(Settings.from_env().archive, instrument, rb)
    if as_json:
        click.echo(report.model_dump_json(indent=2))
    else:
        for check in report.problems:
            click.echo(f"{check.version}: {check.summary()}")
        verified = sum(check.files for check in report.versions if check.ok)
        click.echo(f"{len(report.versions)} version(s) checked, {len(report.problems)} with problems, "
                   f"{verified} files unchanged under {report.archive}")
    if report.problems:
        raise SystemExit(1)


@archive_commands.command("permissions")
def permissions_command() -> None:
    """(Re)apply the archive permissions policy (NBREDUCE_ARCHIVE_PERMISSIONS) to every existing folder."""
    from runner.archive.permissions import archive_permissions

    settings = Settings.from_env()
    policy = archive_permissions(settings.archive_permissions)
    settings.archive.mkdir(parents=True, exist_ok=True)
    count = policy.apply(settings.archive)
    click.echo(f"{policy.name}: applied to {count} experiment folder(s) under {settings.archive}")
