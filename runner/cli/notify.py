"""``nbreduce notify``: e-mails and webhooks to the subscribers of finished runs (runner.notify.service)."""

from __future__ import annotations

import logging
import threading

import click

from runner.cli.common import install_stop_signals, load_settings


@click.command("notify")
@click.option("--no-hub", is_flag=True, help="Do not ask JupyterHub for users' groups even when run as its service.")
def notify(no_hub: bool) -> None:
    """Notify subscribers (portal: Notifications) when runs finish, fail or finish with warnings."""
    from runner.notify.service import HubAccess, Notifier

    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s notify %(levelname)s %(message)s")
    settings = load_settings()
    stop = threading.Event()
    install_stop_signals(stop)
    hub = None if no_hub else HubAccess(settings.portal.auth_cache_seconds)
    if hub is not None and not hub.available:
        click.echo("not a JupyterHub service: access is checked against each subscription's own record", err=True)
        hub = None
    s = settings.notify
    click.echo(f"notify: SMTP {s.smtp_host}:{s.smtp_port} ({s.smtp_security}), webhooks with "
               f"{s.webhook_retries} retries", err=True)
    Notifier(settings, access=hub).run(stop)
