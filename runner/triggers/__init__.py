"""Run-completion triggers: every external signal becomes a ``RunCompletion`` on ``nbreduce.run-completions``.

Built in: ``runinfo`` (ISIS run control pl72/6s4t on Kafka), ``legacy`` (the autoreduction ``data_ready``
message), ``lastrun`` (polling ``lastrun.txt``) and ``multirun`` (sum/stitch jobs over declared runs).
A facility plugs in its own source as a
:class:`~runner.triggers.base.Trigger` subclass, named ``package.module:Class`` or registered under the
``nbreduce.triggers`` entry-point group, the way JupyterHub finds spawners.
"""

from __future__ import annotations

import importlib
import threading
from importlib.metadata import entry_points
from typing import Any

from runner.config import Settings
from runner.triggers.base import Trigger, TriggerHealth, stop_on_signals, trigger_health
from runner.triggers.lastrun import LastRunWatcher, watch
from runner.triggers.legacy import LegacyDataReadyBridge
from runner.triggers.multirun import MultiRunTrigger
from runner.triggers.runinfo import RunInfoTrigger

ENTRY_POINT_GROUP = "nbreduce.triggers"
TRIGGERS: dict[str, type[Trigger]] = {
    RunInfoTrigger.kind: RunInfoTrigger,
    LegacyDataReadyBridge.kind: LegacyDataReadyBridge,
    LastRunWatcher.kind: LastRunWatcher,
    MultiRunTrigger.kind: MultiRunTrigger,
}


def trigger_class(kind: str) -> type[Trigger]:
    """The trigger class of ``kind``: built-in name, entry-point name or ``package.module:Class``."""
    if kind in TRIGGERS:
        return TRIGGERS[kind]
    found: Any = None
    plugins = entry_points(group=ENTRY_POINT_GROUP, name=kind)
    if plugins:
        found = next(iter(plugins)).load()
    elif ":" in kind:
        module, _, attribute = kind.partition(":")
        found = getattr(importlib.import_module(module), attribute, None)
    if isinstance(found, type) and issubclass(found, Trigger):
        return found
    known = ", ".join(sorted(TRIGGERS))
    raise ValueError(f"unknown trigger {kind!r}: use one of {known}, an entry point of {ENTRY_POINT_GROUP} "
                     "or package.module:Class naming a Trigger subclass")


def make_trigger(settings: Settings, kind: str, **options: Any) -> Trigger:
    return trigger_class(kind)(settings, **options)


def run_bridge(settings: Settings, kind: str, stop: threading.Event | None = None, **options: Any) -> None:
    """Run one trigger until ``stop`` is set (or SIGINT/SIGTERM); ``options`` go to the trigger class."""
    trigger = make_trigger(settings, kind, **options)
    with stop_on_signals(stop) as event:
        trigger.run(event)


__all__ = [
    "TRIGGERS",
    "LastRunWatcher",
    "LegacyDataReadyBridge",
    "MultiRunTrigger",
    "RunInfoTrigger",
    "Trigger",
    "TriggerHealth",
    "make_trigger",
    "run_bridge",
    "trigger_class",
    "trigger_health",
    "watch",
]
