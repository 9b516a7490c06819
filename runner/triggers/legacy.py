"""Bridge for the legacy ISIS autoreduction ``data_ready`` JSON message, accepted as it is.

Run detection and manual-submission scripts that already publish ``data_ready`` keep working unchanged:
each message is validated as a :class:`RunCompletion` (its field names are the legacy ones) and
republished for the runner. Legacy messages carry no id, so the id is derived from where the message
sits in the source topic: a redelivered message is the same job downstream.
"""

from __future__ import annotations

import json

from confluent_kafka import Message
from pydantic import ValidationError

from runner.bus.clients import Publisher
from runner.bus.models import RunCompletion
from runner.config import Settings
from runner.triggers.base import ConsumerTrigger, describe, message_time, stable_id


class LegacyDataReadyBridge(ConsumerTrigger):
    """``data_ready`` (or another configured topic) -> ``nbreduce.run-completions``."""

    kind = "legacy"

    def __init__(self, settings: Settings, *, topic: str | None = None, group: str | None = None,
                 name: str | None = None, publisher: Publisher | None = None):
        topic = topic or settings.triggers.legacy_topic
        super().__init__(settings, topics=[topic], group=group, name=name or f"legacy-{topic}", publisher=publisher)

    def handle(self, msg: Message) -> None:
        completion = self.convert(msg)
        if completion is not None:
            self.emit(completion)

    def convert(self, msg: Message) -> RunCompletion | None:
        """The completion a legacy message stands for; None (message dead-lettered) when it is invalid."""
        try:
            payload = json.loads(msg.value() or b"")
        except ValueError as exc:
            self.dead_letter_message(msg, f"data_ready message is not JSON: {describe(exc)}")
            return None
        if not isinstance(payload, dict):
            self.dead_letter_message(msg, f"data_ready message is a JSON {type(payload).__name__}, not an object")
            return None
        try:
            # legacy writers serialise every field, unset ones as null: null means "not given" here
            completion = RunCompletion.model_validate({k: v for k, v in payload.items() if v is not None})
        except ValidationError as exc:
            self.dead_letter_message(msg, f"invalid data_ready message: {describe(exc)}")
            return None
        update: dict[str, object] = {}
        if not completion.message_id:
            update["message_id"] = stable_id("legacy", msg.topic(), msg.partition(), msg.offset())
        if "timestamp" not in completion.model_fields_set:
            # when the message was sent, the same on every redelivery (legacy messages carry no time)
            update["timestamp"] = message_time(msg) or completion.timestamp
        return completion.model_copy(update=update)
