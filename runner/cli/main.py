"""``nbreduce``: the command line of the platform (broker, runner, submissions, views, demo)."""

from __future__ import annotations

import importlib
import logging

import click

from runner.config import BrokerNotConfigured


class NbreduceGroup(click.Group):
    """Every command lives in its own module, imported only when used (the hub's imports alone cost
    ~0.4 s and tens of MB, which a runner or ``nbreduce runs`` should not pay): click's lazy-group pattern."""

    lazy = {
        "archive": "runner.cli.archive:archive_commands",
        "broker": "runner.cli.broker:broker",
        "config": "runner.cli.config:config",
        "dead-letters": "runner.cli.jobs:dead_letters",
        "diff": "runner.cli.live:diff",
        "demo": "runner.cli.demo:demo",
        "env": "runner.cli.env:env_commands",
        "hub": "runner.cli.hub:hub_command",
        "logs": "runner.cli.live:logs",
        "multirun": "runner.cli.triggers:multirun",
        "notify": "runner.cli.notify:notify",
        "prune": "runner.cli.archive:prune_command",
        "replay": "runner.cli.replay:replay_command",
        "runner": "runner.cli.runner:runner",
        "runners": "runner.cli.runner:runners",
        "runs": "runner.cli.jobs:runs",
        "simulate": "runner.cli.sim:simulate",
        "submit": "runner.cli.jobs:submit",
        "template": "runner.cli.template:template_commands",
        "topics": "runner.cli.broker:topics",
        "trigger": "runner.cli.triggers:trigger",
        "triggers": "runner.cli.triggers:triggers",
        "watch": "runner.cli.triggers:watch",
    }

    def list_commands(self, ctx):
        return sorted([*super().list_commands(ctx), *self.lazy])

    def get_command(self, ctx, name):
        if name in self.lazy:
            module, _, attribute = self.lazy[name].partition(":")
            return getattr(importlib.import_module(module), attribute)
        return super().get_command(ctx, name)

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BrokerNotConfigured as exc:
            raise click.ClickException(str(exc)) from None
        except Exception as exc:  # the broker went away during the command: one line, no traceback
            from confluent_kafka import KafkaException

            from runner.bus.clients import BrokerUnavailable

            if isinstance(exc, BrokerUnavailable):
                raise click.ClickException(str(exc)) from None
            if isinstance(exc, KafkaException):
                error = exc.args[0] if exc.args else exc
                raise click.ClickException(f"broker error: {getattr(error, 'str', lambda: error)()}") from None
            raise


@click.group(cls=NbreduceGroup)
@click.option("-v", "--verbose", count=True, help="More logging (-vv for debug).")
def main(verbose: int) -> None:
    """Notebook-first automatic data reduction: trigger -> broker -> runner -> archive -> hub."""
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if verbose == 0:  # librdkafka's own connection lines: the command says what matters in one line
        logging.getLogger("nbreduce.librdkafka").setLevel(logging.CRITICAL)
