"""Triggers: ``nbreduce watch``, ``trigger``, ``multirun``, ``triggers``."""

from __future__ import annotations

import threading
from typing import Any

import click

from runner.cli.common import broker_settings, install_stop_signals, load_settings, parse_param, show


@click.command()
@click.option("--instrument", "-i", "instruments", multiple=True, help="Instrument to watch (default: all templates).")
@click.option("--interval", type=float, default=None,
              help="Seconds between polls of lastrun.txt (default: NBREDUCE_TRIGGERS__LASTRUN_INTERVAL_SECONDS).")
@click.option("--from", "start_from", multiple=True, help="INSTRUMENT=RUN: first run to publish when no state exists.")
@click.option("--max-backfill", type=int, default=None,
              help="Larger gaps are reported, not published (default: NBREDUCE_TRIGGERS__MAX_BACKFILL).")
def watch(instruments, interval, start_from, max_backfill) -> None:
    """Poll ISIS lastrun.txt files; publish every new run, backfilling gaps after downtime."""
    from runner.triggers import watch as run_watch

    starts = {k.upper(): int(v) for k, v in (parse_param(s) for s in start_from)}
    stop = threading.Event()
    install_stop_signals(stop)
    run_watch(load_settings(), [i.upper() for i in instruments] or None, interval, stop, start_from=starts,
              max_backfill=max_backfill)


@click.command()
@click.argument("kind", type=click.Choice(["runinfo", "legacy", "multirun"]))
@click.option("--topic", "topics", multiple=True,
              help="runinfo: topics (default all <INST>_runInfo); legacy: the data_ready topic.")
def trigger(kind, topics) -> None:
    """Run a trigger: ISIS run start/stop (runinfo), legacy data_ready (legacy) or multi-run jobs (multirun)."""
    from runner.triggers import run_bridge

    options: dict[str, Any] = {}
    if topics:
        options = {"topics": list(topics)} if kind == "runinfo" else {"topic": topics[0]}
    stop = threading.Event()
    install_stop_signals(stop)
    run_bridge(load_settings(), kind, stop, **options)


@click.group()
def multirun() -> None:
    """Multi-run jobs (sum, stitch): a template fired once a set of runs has completed."""


@multirun.command("declare")
@click.option("--instrument", "-i", required=True)
@click.option("--name", required=True, help="Name of the job, unique per instrument.")
@click.option("--runs", "runs_text", required=True, help="Runs: 100-105 or 100,102,107 (or both, comma-separated).")
@click.option("--template", default="reduce", show_default=True, help="Template of the instrument that sums/stitches.")
@click.option("--rb", default=None, help="Only completions of this experiment count.")
@click.option("--param", "params", multiple=True, help="Parameter override NAME=VALUE (repeatable).")
def multirun_declare(instrument, name, runs_text, template, rb, params) -> None:
    """Declare a multi-run job; the multirun trigger fires it when all its runs have completed."""
    import getpass

    from pydantic import ValidationError

    from runner.templates.registry import MultiRunSpec
    from runner.triggers.multirun import MultiRunDeclaration, declare

    runs: list[int] = []
    try:
        for part in filter(None, (p.strip() for p in runs_text.split(","))):
            first, _, last = part.partition("-")
            runs += list(range(int(first), int(last or first) + 1))
        declaration = MultiRunDeclaration(
            instrument=instrument, rb_number=rb, declared_by=getpass.getuser(),
            spec=MultiRunSpec(name=name, template=template, runs=runs,
                              parameters=dict(parse_param(p) for p in params)))
        declaration.spec.run_numbers()
    except (ValueError, ValidationError) as exc:
        raise click.ClickException(f"invalid declaration: {exc}") from None
    declare(broker_settings(), declaration)
    click.echo(f"declared {declaration.key}: runs {runs[0]}..{runs[-1]} ({len(runs)}) -> template {template}")


@click.command()
@click.option("--json", "as_json", is_flag=True)
def triggers(as_json) -> None:
    """Health of the triggers: last heartbeat, last run seen, errors (a stalled watcher shows here)."""
    from runner.triggers import trigger_health

    show(trigger_health(broker_settings()), as_json, "no trigger has reported yet",
          lambda r: " ".join(f"{k}={v}" for k, v in r.model_dump(mode="json", exclude_none=True).items()))
