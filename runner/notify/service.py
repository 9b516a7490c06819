"""``nbreduce notify``: tell subscribers when runs of their experiments or instruments finish.

Why a consumer group (:class:`~runner.bus.work.WorkConsumer`, group ``nbreduce-notify``) and not a followed
:class:`~runner.bus.table.TopicTable` of the status topic: a table replays the whole topic at every start,
so the service would have to remember on its own which of a year of final states it had already told
someone about. The group's committed offset is that memory: a status event's offset is committed only after
all its notifications were sent (or failed for good, recorded), so a crash or restart resends at most the
few events in flight and never skips one — exactly once, or twice around a crash, which is enough for a
notification. A new group starts at the end of the topic (``auto.offset.reset=latest``), so the first
start does not mail a year of history. Within one process, a job's outcome is announced once even when
the runner re-announces it (a redelivered job).

Access: every notification is checked against what the subscriber may see *now*: their hub groups when
the service runs under JupyterHub (a hub service with the ``read:users:groups`` scope), else what they could
see when they subscribed (checked by the portal).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from confluent_kafka import Message
from pydantic import ValidationError

from runner.bus.clients import Publisher
from runner.bus.models import StatusEvent
from runner.bus.topics import NOTIFICATIONS, REDUCTION_STATUS
from runner.bus.work import WorkConsumer
from runner.config import Settings
from runner.hub.access import Access
from runner.notify.channels import CHANNELS, Channel, DeliveryFailed, run_label
from runner.notify.subscriptions import Delivery, Subscription, SubscriptionTable, outcome_of

log = logging.getLogger(__name__)
GROUP = "nbreduce-notify"
#: Access of a user by name (None: unknown to the hub, e.g. removed): how the hub says what a user may see now.
AccessLookup = Callable[[str], Access | None]


def portal_link(settings: Settings, job_id: str) -> str:
    base = settings.notify.portal_url or f"http://{settings.hub.ip}:{settings.hub.port}/services/portal/"
    return f"{base.rstrip('/')}/jobs/{job_id}"


class HubAccess:
    """Users' current access from the hub's REST API (the service's own token), cached for a while."""

    def __init__(self, cache_seconds: float = 60):
        from jupyterhub.services.auth import HubAuth

        self.auth = HubAuth()
        self.cache_seconds = cache_seconds
        self._cache: dict[str, tuple[float, Access | None]] = {}

    @property
    def available(self) -> bool:
        return bool(self.auth.api_token)

    def __call__(self, user: str) -> Access | None:
        import requests

        now = time.monotonic()
        cached = self._cache.get(user)
        if cached is not None and now - cached[0] < self.cache_seconds:
            return cached[1]
        reply = requests.get(f"{self.auth.api_url}/users/{user}", timeout=10,
                             headers={"Authorization": f"token {self.auth.api_token}"})
        if reply.status_code == 404:
            access = None
        else:
            reply.raise_for_status()
            model = reply.json()
            access = Access.from_groups(model.get("groups") or [])
            if model.get("admin"):
                access = access.model_copy(update={"admin": True})
        self._cache[user] = (now, access)
        return access


class Notifier:
    """Consumes final status events and notifies the matching subscribers; ``run`` until ``stop``."""

    def __init__(self, settings: Settings, access: AccessLookup | None = None,
                 channels: dict[str, Channel] | None = None):
        self.settings = settings
        self.access = access
        self.channels = channels or {name: cls(settings.notify) for name, cls in CHANNELS.items()}
        self.subscriptions = SubscriptionTable(settings)
        self._announced: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._lock = threading.Lock()
        self.sent = 0

    def run(self, stop: threading.Event, on_ready: Callable[[], None] | None = None) -> None:
        publisher = Publisher(self.settings)
        followers = threading.Event()
        self.subscriptions.start(followers)
        self.subscriptions.caught_up.wait(self.settings.broker.timeout_seconds * 3)
        work = WorkConsumer(self.settings, GROUP, [REDUCTION_STATUS], name="notify",
                            **{"auto.offset.reset": "latest"})
        capacity = self.settings.notify.max_parallel
        running: dict[Future[None], Message] = {}
        ready = False
        try:
            with ThreadPoolExecutor(capacity, thread_name_prefix="notify") as pool:
                while not stop.is_set():
                    for future in [f for f in running if f.done()]:
                        work.done(running.pop(future))
                    for msg in work.poll(capacity - len(running), timeout=0.2):
                        running[pool.submit(self.handle, msg.value() or b"", publisher)] = msg
                    work.commit()
                    if not ready and work.assignment():
                        ready = True
                        log.info("notify: %d subscriptions, following %s", len(self.subscriptions), REDUCTION_STATUS)
                        if on_ready:
                            on_ready()
                while running:  # let notifications in flight finish, then commit them
                    for future in [f for f in running if f.done()]:
                        work.done(running.pop(future))
                    work.poll(0, timeout=0.2)
        finally:
            work.close()
            followers.set()
            publisher.close()

    # -- one status event ----------------------------------------------------------------------------
    def handle(self, raw: bytes, publisher: Publisher) -> None:
        """Notify every subscriber of this event who wants it and may see it (worker thread; never raises)."""
        try:
            event = StatusEvent.from_bytes(raw)
        except (ValidationError, ValueError):
            return  # not a status event: nothing anyone subscribed to
        outcome = outcome_of(event)
        if outcome is None or not self._first(event.job_id, event.outcome):
            return
        for subscription in self.subscriptions.snapshot():
            if not subscription.matches(event):
                continue
            if not self.may_see(subscription, event):
                log.info("not notifying %s of %s: no longer allowed to see it", subscription.user, event.job_id[:8])
                continue
            for channel in subscription.channels:
                self.deliver(subscription, channel, event, publisher)

    def may_see(self, subscription: Subscription, event: StatusEvent) -> bool:
        access: Access | None = subscription.access
        if self.access is not None:
            try:
                access = self.access(subscription.user)
            except Exception as exc:  # the hub is away: fall back on what the portal checked
                log.warning("hub access of %s unavailable (%s): using the subscription's", subscription.user, exc)
        return access is not None and access.can_see(event.instrument, event.rb_number)

    def deliver(self, subscription: Subscription, channel: str, event: StatusEvent, publisher: Publisher) -> Delivery:
        link = portal_link(self.settings, event.job_id)
        label = run_label(event) + (f" v{event.version}" if event.version else "")
        try:
            attempts = self.channels[channel].send(subscription, event, link)
            record = Delivery(subscription_id=subscription.subscription_id, channel=channel,  # type: ignore[arg-type]
                              job_id=event.job_id, run=label, ok=True, attempts=attempts)
            self.sent += 1
        except DeliveryFailed as exc:
            record = Delivery(subscription_id=subscription.subscription_id, channel=channel,  # type: ignore[arg-type]
                              job_id=event.job_id, run=label, ok=False, error=str(exc), attempts=exc.attempts)
            log.warning("notify %s by %s about %s failed: %s", subscription.user, channel, label, exc)
        except Exception as exc:  # a channel's bug must not stop the others
            log.exception("notify %s by %s failed", subscription.user, channel)
            record = Delivery(subscription_id=subscription.subscription_id, channel=channel,  # type: ignore[arg-type]
                              job_id=event.job_id, run=label, ok=False, error=f"{type(exc).__name__}: {exc}")
        try:
            publisher.publish(NOTIFICATIONS, record, key=record.key("last"))
            if not record.ok:
                publisher.publish(NOTIFICATIONS, record, key=record.key("failure"))
        except Exception as exc:  # the notification itself went out (or not): only its record is missing
            log.warning("delivery record not published: %s", exc)
        return record

    def _first(self, job_id: str, outcome: str) -> bool:
        """True the first time this process sees the job with this outcome (re-announcements are not news)."""
        with self._lock:
            key = (job_id, outcome)
            if key in self._announced:
                return False
            self._announced[key] = None
            if len(self._announced) > 100_000:
                self._announced.popitem(last=False)
            return True
