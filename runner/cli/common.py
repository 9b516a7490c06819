"""What every ``nbreduce`` command shares: settings, stop signals, ``NAME=VALUE`` options, list output."""

from __future__ import annotations

import json
import signal
import threading
from typing import Any

import click

from runner.config import Settings


def load_settings() -> Settings:
    return Settings.from_env()


def broker_settings() -> Settings:
    """The settings of a command that talks to the broker, once the broker answered: a broker that is away
    fails the command within ``broker.timeout_seconds`` with one line (see ``main``), not after minutes of
    retries with a traceback."""
    from runner.bus.clients import check_broker

    settings = load_settings()
    check_broker(settings)
    return settings


def install_stop_signals(stop: threading.Event) -> None:
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


def show(items: list, as_json: bool, empty: str, line) -> None:
    """Print models as a JSON list (``--json``) or one formatted line each."""
    if as_json:
        click.echo(json.dumps([i.model_dump(mode="json", exclude_none=True) for i in items], indent=2))
        return
    if not items:
        click.echo(empty)
    for item in items:
        click.echo(line(item))
