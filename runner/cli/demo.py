"""``nbreduce demo``: the whole platform on embedded defaults, with simulated runs for the demo users.

Broker, the environments of the simulated instruments (built once, then from the uv cache), a runner,
JupyterHub with the portal, and one or more simulated runs of every experiment of the membership file
(one instrument of each technique family), so every demo user has runs of their own. As root, users'
servers run as their own unprivileged accounts and the archive is protected by experiment groups
(runner.archive.permissions); otherwise the demo says which of those guarantees it cannot give.
The hub is watched: the demo prints its URLs only once it serves, and stops with its log's tail (exit
status 1) if it dies. Ctrl-C stops everything it started.
"""

from __future__ import annotations

import os
import shutil
import stat
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import click

from runner.bus.embedded import EmbeddedBroker, port_open
from runner.bus.models import StatusEvent
from runner.bus.status import StatusView
from runner.bus.topics import RUN_COMPLETIONS
from runner.cli.common import install_stop_signals, load_settings
from runner.config import PACKAGE_DIR, Settings
from runner.pipeline.reduce import job_id_for

COLOURS = {"succeeded": "green", "failed": "red", "timed_out": "red", "rejected": "red", "skipped": "yellow",
           "running": "cyan", "queued": "white"}
SYSTEM_PYTHON = "/usr/bin/python3"


class DemoFailed(click.ClickException):
    """The demo cannot go on; the message says why (and what to do)."""


def _reachable_by_others(path: Path) -> Path | None:
    """The first folder on ``path``'s way that other accounts cannot traverse, or None."""
    for folder in [*reversed(path.resolve().parents), path.resolve()]:
        if folder.exists() and not folder.stat().st_mode & stat.S_IXOTH:
            return folder
    return None


def isolation(settings: Settings) -> tuple[Settings, list[str]]:
    """The settings the demo runs with, and what it could not guarantee (said to the user)."""
    if os.geteuid() != 0:
        return settings, [
            f"not root: every user's server and kernels run as {os.environ.get('USER', 'you')}; reductions/ is "
            "read-only through JupyterLab, but a kernel can read the whole archive (separating users needs root: "
            "one account and group per experiment)"]
    private = _reachable_by_others(settings.home) or _reachable_by_others(PACKAGE_DIR.parent)
    missing = [tool for tool in ("useradd", "setfacl") if shutil.which(tool) is None]
    if not Path(SYSTEM_PYTHON).exists():
        missing.append(SYSTEM_PYTHON)
    if private is not None or missing:
        reason = (f"{private} is private to root (set NBREDUCE_HOME to a folder other accounts can reach, e.g. "
                  f"/var/lib/nbreduce, and use a checkout outside it)") if private else f"missing {', '.join(missing)}"
        return settings.model_copy(update={"hub": settings.hub.model_copy(update={"system_users": False})}), [
            f"users' servers run as root, not as their own accounts: {reason}; reductions/ is read-only through "
            "JupyterLab, but a kernel can read the whole archive"]
    return settings.model_copy(update={
        "archive_permissions": "experiment-groups",
        "hub": settings.hub.model_copy(update={"system_users": True}),
        "kernels": settings.kernels.model_copy(update={"python": settings.kernels.python or SYSTEM_PYTHON}),
    }), []


def demo_experiments(settings: Settings, instruments: tuple[str, ...]) -> list[tuple[str, str, str]]:
    """(RB, instrument, title) of the experiments to simulate: the membership file's, optionally filtered."""
    from runner.hub.access import YamlMembership
    from runner.hub.launch import hub_config_dir

    membership = YamlMembership(settings.hub.membership or hub_config_dir() / "membership.yaml").table()
    wanted = {i.upper() for i in instruments}
    found = [(rb, e.instrument, e.title) for rb, e in membership.experiments.items()
             if not wanted or e.instrument in wanted]
    missing = wanted - {inst for _, inst, _ in found}
    if missing:  # an instrument no demo experiment uses: the first user's experiment number is lent to it
        lender = next((rb for u in membership.users.values() for rb in u.rbs), "1920001")
        found += [(lender, inst, "") for inst in sorted(missing)]
    return found


def build_environments(settings: Settings, names: list[str]) -> None:
    from runner.kernels.environments import build

    for name in names:
        click.echo(f"env       {name}: building (the first time takes a minute; later from uv's cache)…", nl=False)
        started = time.monotonic()
        [result] = build(settings, [name])
        click.echo(f"\renv       {name}: {result.status} in {time.monotonic() - started:.1f} s"
                   + (f" — {result.message}" if result.status not in ("built", "unchanged") else "") + " " * 20)
        if result.status not in ("built", "unchanged"):
            raise DemoFailed(f"environment {name} could not be built: {result.message}")


class HubWatch:
    """The hub process: started in the background, waited for until it serves, watched while the demo runs."""

    def __init__(self, settings: Settings, port: int):
        from runner.hub.launch import hub_dir, start_hub

        self.port = port
        self.log = hub_dir(settings) / "hub.log"
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self.log.write_text("")
        self.timeout = settings.hub.start_timeout_seconds + 60
        self.process = start_hub(settings, port=port, log_file=self.log)

    def tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def check(self) -> None:
        """Raise :class:`DemoFailed` with the log's tail when the hub has died."""
        if self.process.poll() is not None:
            raise DemoFailed(f"JupyterHub exited with status {self.process.returncode}; the end of {self.log}:\n"
                             f"{self.tail()}")

    def wait_serving(self, stop: threading.Event) -> None:
        import urllib.error
        import urllib.request

        base = f"http://127.0.0.1:{self.port}"
        deadline = time.monotonic() + self.timeout
        for url in (f"{base}/hub/health", f"{base}/services/portal/static/portal.css"):
            while not stop.is_set():
                self.check()
                try:
                    with urllib.request.urlopen(url, timeout=5) as reply:
                        if reply.status == 200:
                            break
                except (urllib.error.URLError, OSError):
                    pass
                if time.monotonic() > deadline:
                    raise DemoFailed(f"JupyterHub did not serve {url} within {self.timeout:.0f} s; the end of "
                                     f"{self.log}:\n{self.tail()}")
                time.sleep(0.5)

    def stop(self) -> None:
        from runner.hub.launch import stop_hub

        stop_hub(self.process)


def run_demo(settings: Settings, runs: int, events: int | None, hub: int | None, exit_when_done: bool,
             stop: threading.Event, instruments: tuple[str, ...] = ()) -> bool:
    """Returns True when every simulated run was reduced successfully; ``hub`` is JupyterHub's port."""
    from runner.pipeline.consumer import Runner
    from runner.sim.runs import simulate
    from runner.templates.registry import TemplateError, TemplateRegistry

    if hub is not None and port_open(hub):
        raise DemoFailed(f"port {hub} is busy (another hub or demo?): stop it, or choose another with --hub-port")
    settings, notes = isolation(settings)
    experiments = demo_experiments(settings, instruments)
    registry = TemplateRegistry(settings.notebooks)
    environments: list[str] = []
    for _, instrument, _ in experiments:
        try:
            environment = registry.resolve(instrument).config.environment
        except TemplateError as exc:
            raise DemoFailed(f"{instrument}: {exc}") from None
        if environment and environment not in environments:
            environments.append(environment)
    if settings.hub.system_users and hub is not None:
        environments.append("lab")

    cleanups: list[Callable[[], None]] = []
    try:
        embedded = EmbeddedBroker(settings)
        if settings.broker.bootstrap_servers is None and not embedded.status()["running"]:
            state = embedded.start()
            cleanups.append(embedded.stop)
            click.echo(f"broker    {state['bootstrap']} (durable storage in {settings.broker_dir})")
        else:
            click.echo(f"broker    {settings.bootstrap()} (already running)")
        build_environments(settings, environments)
        if settings.archive_permissions != "open":
            from runner.archive.permissions import archive_permissions

            settings.archive.mkdir(parents=True, exist_ok=True)
            archive_permissions(settings.archive_permissions).apply(settings.archive)

        runner_stop, ready = threading.Event(), threading.Event()
        runner = Runner(settings)
        thread = threading.Thread(target=runner.run, args=(runner_stop, ready.set), name="runner", daemon=True)
        thread.start()
        cleanups.append(lambda: (runner_stop.set(), thread.join(120)))
        if not ready.wait(120):
            raise DemoFailed("the runner did not start within 120 s")
        click.echo(f"runner    {settings.runner.max_parallel} reductions in parallel, archive {settings.archive}")

        watch = None
        if hub is not None:
            watch = HubWatch(settings, hub)
            cleanups.append(watch.stop)

        expected: dict[str, str] = {}
        for rb, instrument, _title in experiments:
            for m in simulate(settings, instrument, runs, rb_number=rb, **({"events": events} if events else {})):
                expected[job_id_for(RUN_COMPLETIONS, -1, -1, m.message_id)] = f"{m.instrument} run {m.run_number}"
                click.echo(f"simulate  {m.instrument} run {m.run_number} RB{m.rb_number} -> {m.data}")
        if watch is not None:
            watch.wait_serving(stop)
            click.echo(f"hub       http://127.0.0.1:{hub}/  (demo users and password: docs/hub.md; log {watch.log})")
            click.echo(f"portal    http://127.0.0.1:{hub}/services/portal/")
        for note in notes:
            click.echo(click.style(f"note      {note}", fg="yellow"))
        return _show_progress(settings, expected, exit_when_done, stop, watch)
    finally:
        for cleanup in reversed(cleanups):
            cleanup()


def _show_progress(settings: Settings, expected: dict[str, str], exit_when_done: bool, stop: threading.Event,
                   watch: HubWatch | None) -> bool:
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
        if watch is not None:
            watch.check()
        time.sleep(0.2)
    ok = bool(expected) and all(e.state.value == "succeeded" for e in finished.values()) and done.is_set()
    if done.is_set():
        click.echo("\nExecuted notebooks (open them from the portal, or in JupyterLab under reductions/):")
        for event in sorted(finished.values(), key=lambda e: (e.instrument or "", e.runs)):
            click.echo(f"  {settings.archive / (event.notebook or '?')}  [{event.kernel}]")
    if not exit_when_done and not stop.is_set():
        click.echo("\nPlatform running; new runs and reruns show up here. Ctrl-C stops everything.")
        while not stop.wait(0.5):
            if watch is not None:
                watch.check()
    stop.set()
    return ok


@click.command()
@click.option("--runs", "count", default=1, show_default=True, help="Runs per experiment.")
@click.option("--events", default=None, type=int, help="Neutron events per simulated run.")
@click.option("--instruments", "instruments", multiple=True,
              help="Simulate these instruments (repeatable; default: the membership file's experiments, one "
                   "instrument per technique family).")
@click.option("--no-hub", is_flag=True, help="Do not start JupyterHub and the portal.")
@click.option("--hub-port", default=8000, show_default=True, help="Port of JupyterHub (an error if it is busy).")
@click.option("--exit-when-done", is_flag=True, help="Stop once the simulated runs are reduced (for CI).")
def demo(count, events, instruments, no_hub, hub_port, exit_when_done) -> None:
    """Start broker, runner and hub; simulate runs for the demo users; show progress (Ctrl-C stops)."""
    stop = threading.Event()
    install_stop_signals(stop)
    ok = run_demo(load_settings(), count, events, hub=None if no_hub else hub_port, exit_when_done=exit_when_done,
                  stop=stop, instruments=tuple(i for part in instruments for i in part.split(",") if i))
    sys.exit(0 if ok else 1)

