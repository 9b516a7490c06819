"""``nbreduce runner``: a runner of the consumer group."""

from __future__ import annotations

import logging
import threading

import click

from runner.cli.common import broker_settings, install_stop_signals, load_settings, show


@click.command()
@click.option("--parallel", type=int, default=None,
              help="Reductions run at once (default: NBREDUCE_RUNNER__MAX_PARALLEL).")
def runner(parallel: int | None) -> None:
    """Consume run completions and requests, run templates, publish to the archive."""
    from runner.pipeline.consumer import Runner

    settings = load_settings()
    if parallel:
        settings = settings.model_copy(update={"runner": settings.runner.model_copy(update={"max_parallel": parallel})})
    logging.getLogger().setLevel(min(logging.getLogger().level, logging.INFO))
    stop = threading.Event()
    install_stop_signals(stop)
    Runner(settings).run(stop, on_ready=lambda: click.echo(f"runner ready (group {settings.runner.group})", err=True))


@click.command()
@click.option("--all", "show_all", is_flag=True, help="Also runners that stopped or went silent.")
@click.option("--json", "as_json", is_flag=True)
def runners(show_all: bool, as_json: bool) -> None:
    """Live runners: group, environments, running jobs, partitions and warm kernels (from their heartbeats)."""
    from runner.bus.health import RunnerHealth, health_table

    beats = sorted(health_table(broker_settings(), RunnerHealth).load().snapshot(), key=lambda h: h.name)
    if not show_all:
        beats = [b for b in beats if b.state != "stopped" and not b.stale()]

    def line(h: RunnerHealth) -> str:
        state = "stale" if h.stale() else h.state
        warm = ", ".join(f"{k}={v}" for k, v in (h.kernels.get("warm") or {}).items()) or "-"
        return (f"{h.name:28} {state:18} group={h.group} envs={','.join(h.environments or ['all'])} "
                f"running={len(h.running)}/{h.max_parallel} done={h.jobs_done} warm[{warm}] "
                f"partitions={len(h.partitions)} seen {h.timestamp:%H:%M:%S}"
                + (f"\n    {h.problem}" if h.problem else ""))

    show(beats, as_json, "no live runner (start one with `nbreduce runner`)", line)
