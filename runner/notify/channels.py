"""How a notification reaches a user: pluggable channels with one method, :meth:`Channel.send`.

E-mail goes through the facility's SMTP server (smtplib); a webhook is an HTTP POST of the status event
as JSON, retried with exponential backoff on connection errors and HTTP 429/5xx by urllib3's ``Retry``.
"""

from __future__ import annotations

import smtplib
import ssl
from email.message import EmailMessage
from typing import ClassVar

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from runner.bus.models import StatusEvent
from runner.config import NotifySettings
from runner.notify.subscriptions import Subscription, webhook_allowed


class DeliveryFailed(Exception):
    """A channel could not deliver; ``attempts`` says how often it tried."""

    def __init__(self, message: str, attempts: int = 1):
        super().__init__(message)
        self.attempts = attempts


def run_label(event: StatusEvent) -> str:
    runs = event.runs
    run = f"{runs[0]}-{runs[-1]}" if len(runs) > 1 else str(runs[0]) if runs else event.job_id[:12]
    return f"{event.instrument or '?'} run {run}"


class Channel:
    """One way of telling a subscriber; returns the number of attempts, raises :class:`DeliveryFailed`."""

    name: ClassVar[str]

    def __init__(self, settings: NotifySettings):
        self.settings = settings

    def send(self, subscription: Subscription, event: StatusEvent, link: str) -> int:
        raise NotImplementedError


class EmailChannel(Channel):
    name = "email"

    def message(self, subscription: Subscription, event: StatusEvent, link: str) -> EmailMessage:
        msg = EmailMessage()
        version = f" v{event.version}" if event.version else ""
        msg["Subject"] = f"[nbreduce] {run_label(event)}{version} (RB{event.rb_number}) {event.outcome}"
        msg["From"] = self.settings.smtp_from
        msg["To"] = subscription.email or ""
        lines = [f"{run_label(event)}{version}, experiment RB{event.rb_number}: {event.outcome}."]
        if event.run_title:
            lines += ["", f"Title: {event.run_title}"]
        if event.warnings:
            lines += ["", "Warnings:", *(f"  - {w}" for w in event.warnings)]
        if event.reason and event.state.value != "succeeded":
            lines += ["", f"Reason: {event.reason}"]
        if event.error:
            lines += [f"Error: {event.error.ename}: {event.error.evalue}"]
        lines += ["", f"Run page: {link}", "",
                  f"You receive this because you subscribed to {subscription.label} in the nbreduce portal."]
        msg.set_content("\n".join(lines))
        return msg

    def send(self, subscription: Subscription, event: StatusEvent, link: str) -> int:
        s = self.settings
        try:
            if s.smtp_security == "tls":
                smtp: smtplib.SMTP = smtplib.SMTP_SSL(s.smtp_host, s.smtp_port, timeout=s.timeout_seconds,
                                                      context=ssl.create_default_context())
            else:
                smtp = smtplib.SMTP(s.smtp_host, s.smtp_port, timeout=s.timeout_seconds)
            with smtp:
                if s.smtp_security == "starttls":
                    smtp.starttls(context=ssl.create_default_context())
                if s.smtp_user:
                    smtp.login(s.smtp_user, s.smtp_password.get_secret_value() if s.smtp_password else "")
                smtp.send_message(self.message(subscription, event, link))
        except (OSError, smtplib.SMTPException) as exc:
            raise DeliveryFailed(f"SMTP {s.smtp_host}:{s.smtp_port}: {type(exc).__name__}: {exc}") from None
        return 1


class WebhookChannel(Channel):
    name = "webhook"

    def __init__(self, settings: NotifySettings):
        super().__init__(settings)
        retry = Retry(total=settings.webhook_retries, connect=settings.webhook_retries,
                      read=settings.webhook_retries, status=settings.webhook_retries,
                      backoff_factor=settings.webhook_backoff_seconds, status_forcelist=(429, 500, 502, 503, 504),
                      allowed_methods=frozenset({"POST"}), raise_on_status=False, respect_retry_after_header=True)
        self.session = requests.Session()
        adapter = HTTPAdapter(max_retries=retry)
        self.session.mount("http://", adapter)
        self.session.mount("https://", adapter)

    def send(self, subscription: Subscription, event: StatusEvent, link: str) -> int:
        url = subscription.webhook or ""
        if not webhook_allowed(url, self.settings.webhook_hosts):
            raise DeliveryFailed(f"{url}: not an allowed webhook host (NBREDUCE_NOTIFY__WEBHOOK_HOSTS)")
        headers = {"Content-Type": "application/json", "User-Agent": "nbreduce-notify",
                   "X-Nbreduce-Event": event.outcome, "X-Nbreduce-Link": link,
                   "X-Nbreduce-Subscription": subscription.subscription_id}
        try:
            reply = self.session.post(url, data=event.to_bytes(), headers=headers,
                                      timeout=self.settings.timeout_seconds, allow_redirects=False)
        except requests.RequestException as exc:
            reason = str(exc.args[0].reason if exc.args and hasattr(exc.args[0], "reason") else exc)
            reason = reason.split("): ", 1)[-1]  # urllib3 prefixes the connection object's repr
            raise DeliveryFailed(f"{url}: {reason}", self.settings.webhook_retries + 1) from None
        attempts = len(reply.raw.retries.history) + 1 if reply.raw is not None and reply.raw.retries else 1
        if not 200 <= reply.status_code < 300:
            raise DeliveryFailed(f"{url}: HTTP {reply.status_code} {reply.reason}", attempts)
        return attempts


CHANNELS: dict[str, type[Channel]] = {"email": EmailChannel, "webhook": WebhookChannel}
