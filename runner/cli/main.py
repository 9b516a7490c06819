"""``nbreduce``: the command line of the platform (broker, runner, submissions, views, demo)."""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from typing import Any

import click

from runner.config import BrokerNotConfigured, Settings


def _settings() -> Settings:
    return Settings.from_env()


def _install_stop_signals(stop: threading.Event) -> None:
    """SIGINT/SIGTERM ask for a clean stop (Kubernetes sends SIGTERM); a second one exits at once."""

    def handler(signum, frame):
        if stop.is_set():
            raise SystemExit(130)
        click.echo("stopping… (again to force)", err=True)
        stop.set()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def parse_param(text: str) -> tuple[str, Any]:
    """``k=v`` with v read as JSON when it is JSON (numbers, true/false, lists), else as a string."""
    if "=" not in text:
        raise click.BadParameter(f"{text!r} is not NAME=VALUE")
    name, value = text.split("=", 1)
    try:
        return name.strip(), json.loads(value)
    except ValueError:
        return name.strip(), value


def _show(items: list, as_json: bool, empty: str, line) -> None:
    """Print models as a JSON list (``--json``) or one formatted line each."""
    if as_json:
        click.echo(json.dumps([i.model_dump(mode="json", exclude_none=True) for i in items], indent=2))
        return
    if not items:
        click.echo(empty)
    for item in items:
        click.echo(line(item))


class NbreduceGroup(click.Group):
    """Commands defined in other modules are imported only when used (the hub's imports alone cost
    ~0.4 s and tens of MB, which a runner or ``nbreduce runs`` should not pay): click's lazy-group pattern."""

    lazy = {
        "env": "runner.cli.env:env_commands",
        "hub": "runner.cli.hub:hub_command",
        "prune": "runner.cli.prune:prune_command",
        "replay": "runner.cli.replay:replay_command",
        "template": "runner.cli.template:template_commands",
    }

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx, name):
        if name in self.lazy:
            import importlib

            module, _, attribute = self.lazy[name].partition(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokerNotConfigured as exc:
            raise click.ClickException(str(exc)) from None


@click.group(cls=NbreduceGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """Notebook-first automatic data reduction: trigger -> broker -> runner -> archive -> hub."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


# -- broker -------------------------------------------------------------------------------------
@main.group()
def broker() -> None:
    """The embedded Kafka-API broker (Tansu) of this NBREDUCE_HOME."""


@broker.command("start")
@click.option("--memory", is_flag=True, help="Throw-away storage (lost on stop) instead of durable S3 storage.")
def broker_start(memory: bool) -> None:
    from runner.bus.embedded import BrokerError, EmbeddedBroker

    try:
        state = EmbeddedBroker(_settings()).start(memory=memory)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"broker running at {state['bootstrap']} ({state['storage']} storage)")


@broker.command("stop")
def broker_stop() -> None:
    from runner.bus.embedded import EmbeddedBroker

    if EmbeddedBroker(_settings()).stop():
        click.echo("broker stopped")
    else:
        click.echo("no embedded broker was running")


@broker.command("status")
@click.option("--json", "as_json", is_flag=True)
def broker_status(as_json: bool) -> None:
    from runner.bus.embedded import EmbeddedBroker

    status = EmbeddedBroker(_settings()).status()
    if as_json:
        click.echo(json.dumps(status, indent=2))
    elif status["running"]:
        click.echo(f"running at {status['bootstrap']} ({status['storage']} storage, since {status['started_at']})")
    else:
        click.echo(f"not running (NBREDUCE_HOME={status['home']})")
        sys.exit(3)


# -- runner -------------------------------------------------------------------------------------
@main.command()
@click.option("--parallel", type=int, default=None, help="Reductions run at once (default NBREDUCE_MAX_PARALLEL=2).")
def runner(parallel: int | None) -> None:
    """Consume run completions and requests, run templates, publish to the archive."""
    from runner.pipeline.consumer import Runner

    settings = _settings()
    if parallel:
        settings = settings.model_copy(update={"max_parallel": parallel})
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    stop = threading.Event()
    _install_stop_signals(stop)
    Runner(settings).run(stop, on_ready=lambda: click.echo(f"runner ready (group {settings.runner_group})", err=True))


# -- submissions and views ----------------------------------------------------------------------
@main.command()
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

    try:
        overrides = dict(parse_param(p) for p in params)
        job_id = submit_request(
            _settings(),
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
        event = wait_for_job(_settings(), job_id, timeout)
        if event is None:
            raise click.ClickException(f"job {job_id} not finished after {timeout:.0f} s")
        click.echo(f"{event.state.value}: {event.notebook or ''} {event.reason or ''}".rstrip())
        sys.exit(0 if event.state.value == "succeeded" else 1)


@main.command()
@click.option("--instrument", "-i", default=None)
@click.option("--state", default=None, help="Only jobs in this state.")
@click.option("--limit", default=50, show_default=True)
@click.option("--json", "as_json", is_flag=True)
def runs(instrument, state, limit, as_json) -> None:
    """Jobs and their states, newest first (folded from the status topic)."""
    from runner.bus.status import StatusView

    jobs = sorted(StatusView.rebuild(_settings()).snapshot(), key=lambda e: e.timestamp, reverse=True)
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
    click.echo(f"{'JOB':10} {'INSTR':7} {'RUN':>12} {'RB':>9} {'V':>3} {'STATE':10} {'UPDATED':20} DETAIL")
    for j in jobs:
        run = "-".join(str(r) for r in j.runs[:1] + j.runs[-1:]) if len(j.runs) > 1 else str(j.run_number or "")
        detail = j.notebook or ""
        if j.reason and j.state.value != "succeeded":
            detail = j.reason
        click.echo(f"{j.job_id[:10]:10} {j.instrument or '?':7} {run:>12} {j.rb_number or '':>9} "
                   f"{j.version or '':>3} {j.state.value:10} {j.timestamp:%Y-%m-%d %H:%M:%S}  {detail}")


@main.command("dead-letters")
@click.option("--json", "as_json", is_flag=True)
def dead_letters(as_json) -> None:
    """Messages that were rejected, with their reason and original bytes."""
    from runner.bus.clients import read_topic
    from runner.bus.models import DeadLetter
    from runner.bus.topics import DEAD_LETTER

    def line(d: DeadLetter) -> str:
        preview = d.value[:80].decode(errors="replace").replace("\n", " ")
        return f"{d.timestamp:%Y-%m-%d %H:%M:%S} {d.source_topic}[{d.partition}]@{d.offset}: {d.reason}\n    {preview}"

    _show([DeadLetter.from_bytes(m.value()) for m in read_topic(_settings(), DEAD_LETTER)], as_json,
          "no dead letters", line)


# -- triggers -----------------------------------------------------------------------------------
@main.command()
@click.option("--instrument", "-i", "instruments", multiple=True, help="Instrument to watch (default: all templates).")
@click.option("--interval", default=10.0, show_default=True, help="Seconds between polls of lastrun.txt.")
@click.option("--from", "start_from", multiple=True, help="INSTRUMENT=RUN: first run to publish when no state exists.")
@click.option("--max-backfill", default=1000, show_default=True, help="Larger gaps are reported, not published.")
def watch(instruments, interval, start_from, max_backfill) -> None:
    """Poll ISIS lastrun.txt files; publish every new run, backfilling gaps after downtime."""
    from runner.triggers import watch as run_watch

    starts = {k.upper(): int(v) for k, v in (parse_param(s) for s in start_from)}
    stop = threading.Event()
    _install_stop_signals(stop)
    run_watch(_settings(), [i.upper() for i in instruments] or None, interval, stop, start_from=starts,
              max_backfill=max_backfill)


@main.command()
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
    _install_stop_signals(stop)
    run_bridge(_settings(), kind, stop, **options)


@main.group()
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
    declare(_settings(), declaration)
    click.echo(f"declared {declaration.key}: runs {runs[0]}..{runs[-1]} ({len(runs)}) -> template {template}")


@main.command()
@click.option("--json", "as_json", is_flag=True)
def triggers(as_json) -> None:
    """Health of the triggers: last heartbeat, last run seen, errors (a stalled watcher shows here)."""
    from runner.triggers import trigger_health

    _show(trigger_health(_settings()), as_json, "no trigger has reported yet",
          lambda r: " ".join(f"{k}={v}" for k, v in r.model_dump(mode="json", exclude_none=True).items()))


# -- simulation and demo ------------------------------------------------------------------------
@main.command()
@click.option("--instrument", "-i", required=True)
@click.option("--runs", "count", default=1, show_default=True, help="Number of runs to simulate.")
@click.option("--events", default=None, type=int, help="Neutron events per run.")
@click.option("--rb", default=None, help="Experiment (RB) number.")
@click.option("--no-publish", is_flag=True, help="Only write the files, publish no run-completion message.")
def simulate(instrument, count, events, rb, no_publish) -> None:
    """Write ISIS-style NeXus event files and publish their run-completion messages."""
    from runner.sim.runs import simulate as run_simulation

    kwargs = {"events": events} if events else {}
    messages = run_simulation(_settings(), instrument.upper(), count, rb_number=rb, publish=not no_publish, **kwargs)
    for m in messages:
        click.echo(f"{m.instrument} run {m.run_number} RB{m.rb_number}: {m.data}")


@main.command()
@click.option("--runs", "count", default=2, show_default=True, help="Runs per instrument.")
@click.option("--events", default=None, type=int)
@click.option("--no-hub", is_flag=True, help="Do not start JupyterHub and the portal.")
@click.option("--hub-port", default=8000, show_default=True, help="Port of JupyterHub (free one picked if taken).")
@click.option("--exit-when-done", is_flag=True, help="Stop once the simulated runs are reduced (for CI).")
def demo(count, events, no_hub, hub_port, exit_when_done) -> None:
    """Start broker and runner, simulate runs on every instrument, show progress (Ctrl-C stops)."""
    from runner.cli.demo import run_demo

    stop = threading.Event()
    _install_stop_signals(stop)
    ok = run_demo(_settings(), count, events, hub=None if no_hub else hub_port, exit_when_done=exit_when_done,
                  stop=stop)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":  # pragma: no cover
    main()
