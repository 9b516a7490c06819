"""The Notifications page: a user's subscriptions to experiments and instruments they may see, and how their
e-mails and webhooks fared (``nbreduce notify`` records each channel's last delivery and last failure)."""

from __future__ import annotations

import logging

from pydantic import ValidationError
from tornado import web

from runner.bus.topics import NOTIFICATIONS
from runner.notify.subscriptions import OUTCOMES, DeliveryTable, Subscription, SubscriptionTable, webhook_allowed
from runner.portal.app import BaseHandler
from runner.templates.params import describe_errors

log = logging.getLogger(__name__)


class NotificationsHandler(BaseHandler):
    @property
    def subscriptions(self) -> SubscriptionTable:
        return self.portal.subscriptions

    @property
    def deliveries(self) -> DeliveryTable:
        return self.portal.deliveries

    def targets(self) -> list[tuple[str, str, str]]:
        """(scope, target, label) a user may subscribe to: their experiments and instruments."""
        found = [("rb", rb, f"Experiment RB{rb}") for rb in sorted(self.access.rbs)]
        found += [("instrument", inst, f"Instrument {inst} (all experiments)")
                  for inst in sorted(self.access.instruments)]
        if self.access.admin:
            found += [("instrument", inst, f"Instrument {inst} (all experiments)")
                      for inst in self.portal.index.instruments(self.access) if inst not in self.access.instruments]
        return found

    def show(self, status: int = 200, errors: dict[str, str] | None = None, form: dict[str, str] | None = None,
             saved: str | None = None) -> None:
        mine = self.subscriptions.of_user(self.username)
        self.page("notifications.html", status=status, subscriptions=mine, targets=self.targets(), outcomes=OUTCOMES,
                  deliveries={(s.subscription_id, c): self.deliveries.of(s.subscription_id, c)
                              for s in mine for c in s.channels},
                  errors=errors or {}, form=form or {"target": self.get_argument("target", "")},
                  saved=saved or self.get_argument("saved", None), table_error=self.subscriptions.error)

    @web.authenticated
    def get(self) -> None:
        self.show()

    @web.authenticated
    async def post(self) -> None:
        delete = self.get_body_argument("delete", "").strip()
        if delete:
            sub = self.subscriptions.get(delete)
            if sub is None or sub.user != self.username:
                raise web.HTTPError(404, "no such subscription of yours")
            await self.portal.publish([(NOTIFICATIONS, None, sub.key)])
            self.subscriptions.apply(sub.key.encode(), None)
            self.redirect(self.url("notifications", saved="deleted"))
            return
        form = {k: self.get_body_argument(k, "").strip() for k in ("target", "email", "webhook")}
        scope, _, target = form["target"].partition(":")
        outcomes = [o for o in OUTCOMES if self.get_body_argument(f"on_{o}", None)]
        errors: dict[str, str] = {}
        if (scope, target) not in {(s, t) for s, t, _ in self.targets()}:
            errors["target"] = "choose one of your experiments or instruments"
        if not outcomes:
            errors["outcomes"] = "choose at least one: finishes, finishes with warnings, fails"
        if form["webhook"] and not webhook_allowed(form["webhook"], self.portal.settings.notify.webhook_hosts):
            errors["webhook"] = "an http(s) URL on a host this facility allows for webhooks"
        if not errors:
            try:
                sub = Subscription(user=self.username, scope=scope, target=target, outcomes=outcomes,
                                   email=form["email"] or None, webhook=form["webhook"] or None, access=self.access)
            except ValidationError as exc:
                errors["_form"] = describe_errors(exc)
        if errors:
            self.show(400, errors, form)
            return
        await self.portal.publish([(NOTIFICATIONS, sub, sub.key)])
        self.subscriptions.put(sub, sub.key.removeprefix("sub:"))
        log.info("%s subscribed to %s (%s)", self.username, sub.label, ", ".join(sub.outcomes))
        self.redirect(self.url("notifications", saved="saved"))
