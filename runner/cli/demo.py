"""``nbreduce demo``: the whole platform on embedded defaults, with simulated runs on every instrument."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable

import click

from runner.bus.embedded import EmbeddedBroker
from runner.bus.models import StatusEvent
from runner.bus.status import StatusView
from runner.bus.topics import RUN_COMPLETIONS
from runner.cli.common import install_stop_signals, load_settings
from runner.config import Settings
from runner.pipeline.consumer import Runner
from runner.pipeline.reduce import job_id_for
from runner.templates.registry import TemplateRegistry

COLOURS = {"succeeded": "green", "failed": "red", "timed_out": "red", "rejected": "red", "skipped": "yellow",
           "running": "cyan", "queued": "white"}


def run_demo(settings: Settings, runs: int, events: int | None, hub: int | None, exit_when_done: bool,
             stop: threading.Event) -> bool:
    """Returns True when every simulated run was reduced successfully; ``hub`` is JupyterHub's port."""
    from runner.sim.runs import simulate

    cleanups: list[Callable[[], None]] = []
    try:
        embedded = EmbeddedBroker(settings)
        if settings.broker.bootstrap_servers is None and not embedded.status()["running"]:
            state = embedded.start()
            cleanups.append(embedded.stop)
            click.echo(f"broker    {state['bootstrap']} (durable storage in {settings.broker_dir})")
        else:
            click.echo(f"broker    {settings.bootstrap()} (already running)")

        runner_stop = threading.Event()
        ready = threading.Event()
        runner = Runner(settings)
        thread = threading.Thread(target=runner.run, args=(runner_stop, ready.set), name="runner", daemon=True)
        thread.start()
        cleanups.append(lambda: (runner_stop.set(), thread.join(120)))
        if not ready.wait(60):
            click.echo("runner did not start", err=True)
            return False
        click.echo(f"runner    {settings.runner.max_parallel} reductions in parallel, archive {settings.archive}")

        if hub is not None:
            cleanups.append(_start_hub(settings, hub))

        registry = TemplateRegistry(settings.notebooks)
        expected: dict[str, str] = {}
        for instrument in registry.instruments():
            try:
                messages = simulate(settings, instrument, runs, **({"events": events} if events else {}))
            except Exception as exc:  # an instrument the simulator does not model
                click.echo(f"simulate  {instrument}: skipped ({exc})")
                continue
            for m in messages:
                expected[job_id_for(RUN_COMPLETIONS, -1, -1, m.message_id)] = f"{m.instrument} run {m.run_number}"
                click.echo(f"simulate  {m.instrument} run {m.run_number} RB{m.rb_number} -> {m.data}")
        return _show_progress(settings, expected, exit_when_done, stop)
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


def _show_progress(settings: Settings, expected: dict[str, str], exit_when_done: bool,
                   stop: threading.Event) -> bool:
    finished: dict[str, StatusEvent] = {}
    done = threading.Event()

    def on_change(event: StatusEvent) -> None:
        label = expected.get(event.job_id, f"{event.instrument} run {event.run_number}")
        detail = event.notebook if event.state.value in ("running", "succeeded") else (event.reason or "")
        click.echo(click.style(f"{event.state.value:10}", fg=COLOURS.get(event.state.value)) + f"{label}  {detail}")
        if event.job_id in expected and event.state.final:
            finished[event.job_id] = event
            if finished.keys() >= expected.keys():
                done.set()

    StatusView(settings).start(stop, on_change)
    while not stop.is_set() and not done.is_set():
        time.sleep(0.2)
    ok = bool(expected) and all(e.state.value == "succeeded" for e in finished.values()) and done.is_set()
    if done.is_set():
        click.echo("\nExecuted notebooks (open them in JupyterLab, or with `jupyter lab` in the archive):")
        for event in sorted(finished.values(), key=lambda e: (e.instrument or "", e.runs)):
            click.echo(f"  {settings.archive / (event.notebook or '?')}")
            for output in event.output_files:
                click.echo(f"      {settings.archive / output}")
    if not exit_when_done and not stop.is_set():
        click.echo("\nPlatform running; new runs and reruns show up here. Ctrl-C stops everything.")
        stop.wait()
    stop.set()
    return ok


def _start_hub(settings: Settings, port: int) -> Callable[[], None]:
    """JupyterHub with the portal; its log goes to $NBREDUCE_HOME/hub/hub.log."""
    from runner.bus.embedded import free_port, port_open
    from runner.hub.launch import hub_dir, start_hub, stop_hub

    if port_open(port):
        port = free_port()
    log_file = hub_dir(settings) / "hub.log"
    log_file.parent.mkdir(parents=True, exist_ok=True)
    process = start_hub(settings, port=port, log_file=log_file)
    click.echo(f"hub       http://127.0.0.1:{port}/  (demo users and password: docs/hub.md; log {log_file})")
    click.echo(f"portal    http://127.0.0.1:{port}/services/portal/")
    return lambda: stop_hub(process)


@click.command()
@click.option("--runs", "count", default=2, show_default=True, help="Runs per instrument.")
@click.option("--events", default=None, type=int)
@click.option("--no-hub", is_flag=True, help="Do not start JupyterHub and the portal.")
@click.option("--hub-port", default=8000, show_default=True, help="Port of JupyterHub (free one picked if taken).")
@click.option("--exit-when-done", is_flag=True, help="Stop once the simulated runs are reduced (for CI).")
def demo(count, events, no_hub, hub_port, exit_when_done) -> None:
    """Start broker and runner, simulate runs on every instrument, show progress (Ctrl-C stops)."""
    stop = threading.Event()
    install_stop_signals(stop)
    ok = run_demo(load_settings(), count, events, hub=None if no_hub else hub_port, exit_when_done=exit_when_done,
                  stop=stop)
    sys.exit(0 if ok else 1)

