"""Notifications against real servers: the embedded broker, an aiosmtpd SMTP server and a local HTTP server.

The browser test (tests/browser/test_live_browser.py) subscribes through the portal and the hub; here the
service's rules are checked one by one: matching, access, outcomes, retries with backoff, failure records.
"""

from __future__ import annotations

import email
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from aiosmtpd.controller import Controller

from runner.bus.clients import Publisher
from runner.bus.embedded import free_port
from runner.bus.models import JobState, StatusEvent, utcnow
from runner.bus.topics import NOTIFICATIONS, REDUCTION_STATUS
from runner.config import Settings
from runner.hub.access import Access
from runner.notify.subscriptions import DeliveryTable, Subscription, outcome_of, webhook_allowed

pytestmark = pytest.mark.broker


@dataclass
class Mailbox:
    """A real SMTP server on loopback (aiosmtpd) keeping what it receives."""

    messages: list[email.message.Message] = field(default_factory=list)
    arrived: threading.Condition = field(default_factory=threading.Condition)

    async def handle_DATA(self, server, session, envelope):
        with self.arrived:
            self.messages.append(email.message_from_bytes(envelope.content))
            self.arrived.notify_all()
        return "250 OK"

    def wait(self, count: int, timeout: float = 30) -> list[email.message.Message]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.messages) >= count, timeout), self.messages
            return list(self.messages)


class Hooks(ThreadingHTTPServer):
    """A real HTTP server receiving webhooks; ``fail_first`` answers 503 to that many requests first."""

    def __init__(self, fail_first: int = 0):
        self.calls: list[tuple[dict, dict]] = []
        self.fail_first = fail_first
        self.arrived = threading.Condition()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                with server.arrived:
                    if server.fail_first > 0:
                        server.fail_first -= 1
                        self.send_response(503)
                    else:
                        server.calls.append((dict(self.headers), json.loads(body)))
                        self.send_response(204)
                    self.end_headers()
                    server.arrived.notify_all()

            def log_message(self, *args):
                pass

        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/hook"

    def wait(self, count: int, timeout: float = 30) -> list[tuple[dict, dict]]:
        with self.arrived:
            assert self.arrived.wait_for(lambda: len(self.calls) >= count, timeout), self.calls
            return list(self.calls)


@pytest.fixture
def mailbox() -> Iterator[tuple[Mailbox, int]]:
    box = Mailbox()
    controller = Controller(box, hostname="127.0.0.1", port=free_port())
    controller.start()
    yield box, controller.port
    controller.stop()


@pytest.fixture
def hooks() -> Iterator[Hooks]:
    server = Hooks(fail_first=1)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()


def event(job: str, state: JobState = JobState.SUCCEEDED, rb: str = "1920001", instrument: str = "MARI",
          **fields) -> StatusEvent:
    return StatusEvent(job_id=job, state=state, instrument=instrument, rb_number=rb, run_number=25581, version=2,
                       run_title="vanadium", finished_at=utcnow(), **fields)


def test_outcomes_and_webhook_hosts() -> None:
    assert outcome_of(event("a")) == "succeeded"
    assert outcome_of(event("a", warnings=["no elastic line found"])) == "warnings"
    assert outcome_of(event("a", JobState.TIMED_OUT)) == "failed"
    assert outcome_of(event("a", JobState.RUNNING)) is None and outcome_of(event("a", JobState.SKIPPED)) is None
    assert webhook_allowed("https://hooks.example.org/x", [".example.org"])
    assert not webhook_allowed("https://evil.org/x", [".example.org"]) and not webhook_allowed("file:///etc", None)
    with pytest.raises(ValueError, match="e-mail address, a webhook URL or both"):
        Subscription(user="alice", scope="rb", target="1920001", outcomes=["failed"])
    with pytest.raises(ValueError, match="RB scope takes an RB number"):
        Subscription(user="alice", scope="rb", target="MARI", outcomes=["failed"], email="a@b.org")


def test_notifications_by_email_and_webhook(broker: Settings, mailbox, hooks: Hooks) -> None:
    from runner.notify.service import Notifier

    box, smtp_port = mailbox
    settings = Settings.from_env({**broker.to_env(), "NBREDUCE_NOTIFY__SMTP_HOST": "127.0.0.1",
                                  "NBREDUCE_NOTIFY__SMTP_PORT": str(smtp_port),
                                  "NBREDUCE_NOTIFY__SMTP_FROM": "reductions@isis.example",
                                  "NBREDUCE_NOTIFY__WEBHOOK_BACKOFF_SECONDS": "0.2",
                                  "NBREDUCE_NOTIFY__PORTAL_URL": "https://data.isis.example/portal/"})
    alice = Access(rbs=frozenset({"1920001"}))
    subs = [
        Subscription(user="alice", scope="rb", target="1920001", outcomes=["warnings", "failed"],
                     email="alice@isis.example", webhook=hooks.url, access=alice),
        # mallory subscribed to MARI while she was its instrument scientist; the hub now says she is not
        Subscription(user="mallory", scope="instrument", target="MARI", outcomes=["succeeded", "warnings", "failed"],
                     email="mallory@isis.example", access=Access(instruments=frozenset({"MARI"}))),
        Subscription(user="bob", scope="rb", target="1920001", outcomes=["failed"], webhook="http://127.0.0.1:9/x",
                     access=Access(rbs=frozenset({"1920001"}))),
    ]
    publisher = Publisher(settings)
    for sub in subs:
        publisher.publish(NOTIFICATIONS, sub, key=sub.key)
    now = {"alice": alice, "bob": Access(rbs=frozenset({"1920001"})), "mallory": Access()}
    notifier = Notifier(settings, access=now.get)
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=notifier.run, args=(stop, ready.set), daemon=True)
    thread.start()
    try:
        assert ready.wait(60)
        suspect = event("job-suspect", warnings=["no elastic line found"])
        for e in (event("job-running", JobState.RUNNING), event("job-clean"), suspect,
                  suspect,  # a re-announcement is not news
                  event("job-other-rb", JobState.FAILED, rb="1930003"), event("job-failed", JobState.FAILED,
                                                                               reason="ZeroDivisionError")):
            publisher.publish(REDUCTION_STATUS, e, key=e.job_id)
        box.wait(2)
        hooks.wait(2)
        deliveries = DeliveryTable(settings)
        deadline = time.monotonic() + 60
        while deliveries.load().get(f"{subs[2].subscription_id}:webhook:failure") is None:
            assert time.monotonic() < deadline, deliveries.rows
            time.sleep(0.2)
            deliveries = DeliveryTable(settings)
    finally:
        stop.set()
        thread.join(30)
        publisher.close()
    time.sleep(0.5)  # anything wrongly sent would have arrived by now
    assert [m["To"] for m in box.messages] == ["alice@isis.example"] * 2  # not mallory, not the clean run
    subjects = sorted(m["Subject"] for m in box.messages)
    assert subjects == ["[nbreduce] MARI run 25581 v2 (RB1920001) failed",
                        "[nbreduce] MARI run 25581 v2 (RB1920001) succeeded with warnings"]
    warned = next(m for m in box.messages if "warnings" in m["Subject"])
    body = warned.get_payload(decode=True).decode()
    assert "no elastic line found" in body and "https://data.isis.example/portal/jobs/job-suspect" in body
    assert warned["From"] == "reductions@isis.example"
    assert [body["job_id"] for _, body in hooks.calls] == ["job-suspect", "job-failed"] or \
        [body["job_id"] for _, body in hooks.calls] == ["job-failed", "job-suspect"]
    headers, body = next(c for c in hooks.calls if c[1]["job_id"] == "job-suspect")
    assert StatusEvent.model_validate(body).warnings == ["no elastic line found"]  # the status event itself
    assert headers["X-Nbreduce-Event"] == "succeeded with warnings"
    last, failure = deliveries.of(subs[0].subscription_id, "webhook")
    assert last.ok and failure is None
    # the first webhook call was answered 503 and retried with backoff: both notifications still arrived
    assert hooks.fail_first == 0 and len(hooks.calls) == 2
    bob_last, bob_failure = deliveries.of(subs[2].subscription_id, "webhook")
    assert bob_failure is not None and not bob_failure.ok and bob_failure.attempts == 4
    assert "127.0.0.1:9" in bob_failure.error and bob_failure.job_id == "job-failed"
    assert bob_last == bob_failure
    assert deliveries.of(subs[1].subscription_id, "email") == (None, None)  # mallory: never tried
