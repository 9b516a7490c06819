"""Who wants to hear about what: subscriptions and delivery records on the notifications topic.

Keys: ``sub:<id>`` holds a :class:`Subscription` (a tombstone deletes it); ``delivery:<id>:<channel>:last``
the last :class:`Delivery` of a channel and ``delivery:<id>:<channel>:failure`` its last failure, so a user
sees a webhook that stopped working even after later notifications of other channels went out.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from runner.bus.models import JobState, StatusEvent, WireModel, new_id, utcnow
from runner.bus.table import TopicTable
from runner.bus.topics import NOTIFICATIONS
from runner.config import Settings
from runner.hub.access import Access, UserName

#: What a subscriber can ask to hear about.
Outcome = Literal["succeeded", "warnings", "failed"]
OUTCOMES: dict[str, str] = {"succeeded": "finishes", "warnings": "finishes with warnings", "failed": "fails"}
Channel = Literal["email", "webhook"]
_EMAIL = re.compile(r"^[^@\s<>,;]+@[^@\s<>,;]+\.[^@\s<>,;]+$")
SUB_PREFIX = "sub:"
DELIVERY_PREFIX = "delivery:"


def outcome_of(event: StatusEvent) -> Outcome | None:
    """What a final status means to a subscriber (None: nothing to tell, e.g. queued, running, skipped)."""
    if event.state is JobState.SUCCEEDED:
        return "warnings" if event.warnings else "succeeded"
    if event.state in (JobState.FAILED, JobState.TIMED_OUT, JobState.REJECTED):
        return "failed"
    return None


def webhook_allowed(url: str, hosts: list[str] | None) -> bool:
    """Whether ``url`` may receive webhooks: http(s), and on an allowed host when the facility lists them."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return False
    host = parts.hostname.lower()
    return hosts is None or any(host == h.lower() or (h.startswith(".") and host.endswith(h.lower()))
                                for h in hosts)


class Subscription(WireModel):
    """One user's wish to hear about the runs of one experiment (RB) or instrument."""

    kind: Literal["subscription"] = "subscription"
    subscription_id: str = Field(default_factory=new_id)
    user: UserName
    scope: Literal["rb", "instrument"]
    #: The RB number or the instrument name.
    target: str
    outcomes: list[Outcome] = Field(min_length=1)
    email: str | None = None
    webhook: str | None = None
    #: What the user could see when subscribing (checked again at every notification; see runner.notify.service).
    access: Access = Field(default_factory=Access)
    created_at: datetime = Field(default_factory=utcnow)

    @field_validator("target")
    @classmethod
    def _target(cls, value: str) -> str:
        value = value.strip().upper()
        if not re.fullmatch(r"[0-9]{1,12}|[A-Z][A-Z0-9_]{0,31}", value):
            raise ValueError("an RB number (digits) or an instrument name")
        return value

    @field_validator("email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        value = (value or "").strip() or None
        if value is not None and not _EMAIL.match(value):
            raise ValueError(f"{value!r} is not an e-mail address")
        return value

    @field_validator("webhook")
    @classmethod
    def _webhook(cls, value: str | None) -> str | None:
        value = (value or "").strip() or None
        if value is not None and not webhook_allowed(value, None):
            raise ValueError("a webhook is an http:// or https:// URL")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Subscription:
        if (self.scope == "rb") != self.target.isdigit():
            raise ValueError("an RB scope takes an RB number, an instrument scope an instrument name")
        if not self.email and not self.webhook:
            raise ValueError("give an e-mail address, a webhook URL or both")
        return self

    @property
    def key(self) -> str:
        return f"{SUB_PREFIX}{self.subscription_id}"

    @property
    def label(self) -> str:
        return f"RB{self.target}" if self.scope == "rb" else self.target

    @property
    def channels(self) -> list[Channel]:
        return [name for name, value in (("email", self.email), ("webhook", self.webhook)) if value]  # type: ignore[misc]

    def matches(self, event: StatusEvent) -> bool:
        """Whether the event is about this subscription's experiment or instrument and an outcome it wants."""
        if self.scope == "rb" and event.rb_number != self.target:
            return False
        if self.scope == "instrument" and (event.instrument or "").upper() != self.target:
            return False
        return outcome_of(event) in self.outcomes


class Delivery(WireModel):
    """The outcome of one notification on one channel."""

    kind: Literal["delivery"] = "delivery"
    subscription_id: str
    channel: Channel
    job_id: str
    run: str = ""
    ok: bool
    error: str | None = None
    attempts: int = 1
    timestamp: datetime = Field(default_factory=utcnow)

    def key(self, which: Literal["last", "failure"] = "last") -> str:
        return f"{DELIVERY_PREFIX}{self.subscription_id}:{self.channel}:{which}"


class SubscriptionTable(TopicTable[Subscription]):
    """Every subscription, by id."""

    def __init__(self, settings: Settings):
        super().__init__(settings, NOTIFICATIONS, Subscription, prefix=SUB_PREFIX)

    def of_user(self, user: str) -> list[Subscription]:
        return sorted((s for s in self.snapshot() if s.user == user), key=lambda s: s.created_at)


class DeliveryTable(TopicTable[Delivery]):
    """Last delivery and last failure of every subscription's channels, keyed ``<id>:<channel>:last|failure``."""

    def __init__(self, settings: Settings):
        super().__init__(settings, NOTIFICATIONS, Delivery, prefix=DELIVERY_PREFIX)

    def of(self, subscription_id: str, channel: str) -> tuple[Delivery | None, Delivery | None]:
        return self.get(f"{subscription_id}:{channel}:last"), self.get(f"{subscription_id}:{channel}:failure")
