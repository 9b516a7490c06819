"""``nbreduce submit``, ``runs``, ``dead-letters``: jobs by hand and their states."""

from __future__ import annotations

import json
import sys

import click

from runner.cli.common import broker_settings, parse_param, show


@click.command()
@click.option("--instrument", "-i", required=True)
@click.option("--run", "runs", required=True, multiple=True, type=int, help="Run number (repeat for multi-run).")
@click.option("--file", "files", required=True, multiple=True, help="Data file (repeat for multi-run).")
@click.option("--rb", help="Experiment (RB) number; read from the NeXus file when omitted.")
@click.option("--title", default="")
@click.option("--param", "params", multiple=True, help="Template parameter override NAME=VALUE (repeatable).")
@click.option("--user", default=None, help="Requested by (default: your login name).")
@click.option("--wait", "wait", is_flag=True, help="Wait until the job reaches a final state.")
@click.option("--timeout", default=600.0, help="With --wait: give up after this many seconds.")
def submit(instrument, runs, files, rb, title, params, user, wait, timeout) -> None:
    """Submit a reduction by hand (goes through nbreduce.reduction-requests)."""
    import getpass
    from pathlib import Path

    from pydantic import ValidationError

    from runner.pipeline.submit import submit_request, wait_for_job

    settings = broker_settings()
    try:
        overrides = dict(parse_param(p) for p in params)
        job_id = submit_request(
            settings,
            instrument=instrument,
            run_number=list(runs) if len(runs) > 1 else runs[0],
            data=[str(Path(f).resolve()) for f in files] if len(files) > 1 else str(Path(files[0]).resolve()),
            rb_number=rb,
            run_title=title,
            reduction_arguments=overrides,
            requested_by=user or getpass.getuser(),
        )
    except ValidationError as exc:
        raise click.ClickException(f"invalid submission: {exc}") from None
    click.echo(f"submitted job {job_id}")
    if wait:
        event = wait_for_job(settings, job_id, timeout)
        if event is None:
            raise click.ClickException(f"job {job_id} not finished after {timeout:.0f} s")
        click.echo(f"{event.outcome}: {event.notebook or ''} {event.reason or ''}".rstrip())
        for warning in event.warnings:
            click.echo(f"  warning: {warning}")
        sys.exit(0 if event.state.value == "succeeded" else 1)


@click.command()
@click.option("--instrument", "-i", default=None)
@click.option("--state", default=None, help="Only jobs in this state.")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def runs(instrument, state, limit, as_json) -> None:
    """Jobs and their states, newest first (folded from the status topic)."""
    from runner.bus.status import StatusView

    jobs = sorted(StatusView.rebuild(broker_settings()).snapshot(), key=lambda e: e.timestamp, reverse=True)
    if instrument:
        jobs = [j for j in jobs if j.instrument == instrument.upper()]
    if state:
        jobs = [j for j in jobs if j.state.value == state]
    jobs = jobs[:limit]
    if as_json:
        click.echo(json.dumps([j.model_dump(mode="json", exclude_none=True) for j in jobs], indent=2))
        return
    if not jobs:
        click.echo("no jobs")
        return
    click.echo(f"{'JOB':10} {'INSTR':7} {'RUN':>12} {'RB':>9} {'V':>3} {'STATE':23} {'UPDATED':20} DETAIL")
    for j in jobs:
        run = "-".join(str(r) for r in j.runs[:1] + j.runs[-1:]) if len(j.runs) > 1 else str(j.run_number or "")
        detail = j.notebook or ""
        if j.reason and j.state.value != "succeeded":
            detail = j.reason
        elif j.warnings:
            detail = "; ".join(j.warnings)
        click.echo(f"{j.job_id[:10]:10} {j.instrument or '?':7} {run:>12} {j.rb_number or '':>9} "
                   f"{j.version or '':>3} {j.outcome:23} {j.timestamp:%Y-%m-%d %H:%M:%S}  {detail}")


@click.command("dead-letters")
@click.option("--json", "as_json", is_flag=True)
def dead_letters(as_json) -> None:
    """Messages that were rejected, with their reason and original bytes."""
    from runner.bus.clients import read_topic
    from runner.bus.models import DeadLetter
    from runner.bus.topics import DEAD_LETTER

    def line(d: DeadLetter) -> str:
        preview = d.value[:80].decode(errors="replace").replace("\n", " ")
        if d.value_truncated:
            preview += f" … ({d.value_size:,} bytes, sha256 {d.value_sha256}: the whole message is the source record)"
        return f"{d.timestamp:%Y-%m-%d %H:%M:%S} {d.source_topic}[{d.partition}]@{d.offset}: {d.reason}\n    {preview}"

    show([DeadLetter.from_bytes(m.value()) for m in read_topic(broker_settings(), DEAD_LETTER)], as_json,
          "no dead letters", line)
