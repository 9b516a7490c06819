"""Default parameters set by instrument scientists, kept on ``topics.PARAMETER_DEFAULTS``.

One message per key — ``instrument:<INST>`` or ``rb:<RB>`` — holds the whole set of defaults for
that scope; the newest message per key wins (readers fold, the embedded broker never compacts), an
empty set clears the scope and a tombstone (no value) deletes it. The runner follows
:class:`DefaultsTable` live and asks it for every job; precedence is documented in ``runner.pipeline.parameterize``
(template < instrument.toml < instrument defaults < RB defaults < the request's overrides).
"""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any, Literal

from pydantic import Field, model_validator

from runner.bus.clients import Publisher
from runner.bus.models import InstrumentName, RBNumber, WireModel, utcnow
from runner.bus.table import TopicTable
from runner.bus.topics import PARAMETER_DEFAULTS
from runner.config import Settings

log = logging.getLogger(__name__)

Scope = Literal["instrument", "rb"]


class ParameterDefaults(WireModel):
    """The defaults of one scope; message key :attr:`key`."""

    kind: Literal["parameter-defaults"] = "parameter-defaults"
    scope: Scope
    #: The template the parameters belong to; RB defaults apply only to runs of this instrument.
    instrument: InstrumentName
    rb_number: RBNumber | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)
    set_by: str = "unknown"
    timestamp: datetime = Field(default_factory=utcnow)

    @model_validator(mode="after")
    def _rb_for_rb_scope(self) -> ParameterDefaults:
        if (self.scope == "rb") != (self.rb_number is not None):
            raise ValueError("rb_number is required for scope 'rb' and not allowed for scope 'instrument'")
        return self

    @property
    def key(self) -> str:
        return defaults_key(self.scope, self.instrument, self.rb_number)


def defaults_key(scope: Scope, instrument: str, rb_number: str | None = None) -> str:
    return f"rb:{rb_number}" if scope == "rb" else f"instrument:{instrument.upper()}"


class DefaultsTable(TopicTable[ParameterDefaults]):
    """Current defaults of every scope, folded from the topic (tombstones delete a scope)."""

    def __init__(self, settings: Settings):
        super().__init__(settings, PARAMETER_DEFAULTS, ParameterDefaults, key=lambda message: message.key)

    def merged(self, instrument: str, rb_number: str | None) -> dict[str, Any]:
        """Instrument defaults overlaid with the RB's (when they were set for this instrument)."""
        merged: dict[str, Any] = {}
        inst = self.get(defaults_key("instrument", instrument))
        if inst is not None:
            merged.update(inst.parameters)
        if rb_number:
            rb = self.get(defaults_key("rb", instrument, rb_number))
            if rb is not None and rb.instrument == instrument.upper():
                merged.update(rb.parameters)
        return merged


def defaults_for(settings: Settings, instrument: str, rb_number: str | None) -> dict[str, Any]:
    """The defaults the runner applies to a new run of ``instrument`` in experiment ``rb_number``."""
    return DefaultsTable(settings).load().merged(instrument, rb_number)


def publish_defaults(publisher: Publisher, message: ParameterDefaults) -> None:
    publisher.publish(PARAMETER_DEFAULTS, message, key=message.key)
