"""``nbreduce broker``: the embedded Kafka-API broker."""

from __future__ import annotations

import json
import sys

import click

from runner.cli.common import broker_settings, load_settings


@click.group()
def broker() -> None:
    """The embedded Kafka-API broker (Tansu) of this NBREDUCE_HOME."""


@broker.command("start")
@click.option("--memory", is_flag=True, help="Throw-away storage (lost on stop) instead of durable S3 storage.")
def broker_start(memory: bool) -> None:
    from runner.bus.embedded import BrokerError, EmbeddedBroker

    try:
        state = EmbeddedBroker(load_settings()).start(memory=memory)
    except BrokerError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(f"broker running at {state['bootstrap']} ({state['storage']} storage)")


@broker.command("stop")
def broker_stop() -> None:
    from runner.bus.embedded import EmbeddedBroker

    if EmbeddedBroker(load_settings()).stop():
        click.echo("broker stopped")
    else:
        click.echo("no embedded broker was running")


@broker.command("status")
@click.option("--json", "as_json", is_flag=True)
def broker_status(as_json: bool) -> None:
    from runner.bus.embedded import EmbeddedBroker

    status = EmbeddedBroker(load_settings()).status()
    if as_json:
        click.echo(json.dumps(status, indent=2))
    elif status["running"]:
        click.echo(f"running at {status['bootstrap']} ({status['storage']} storage, since {status['started_at']})")
    else:
        click.echo(f"not running (NBREDUCE_HOME={status['home']})")
        sys.exit(3)


@click.group()
def topics() -> None:
    """nbreduce's Kafka topics, with their partitions, retention and cleanup policy."""


@topics.command("ensure")
def topics_ensure() -> None:
    """Create the topics that are missing (an init container does this before the platform starts)."""
    from runner.bus.clients import admin
    from runner.bus.topics import TOPICS, ensure_topics

    settings = broker_settings()
    created = ensure_topics(admin(settings), settings, timeout=settings.broker.timeout_seconds)
    click.echo(f"created: {', '.join(created) or 'none, all existed'}")
    click.echo(f"expected: {', '.join(spec.name for spec in TOPICS)}")


@topics.command("list")
def topics_list() -> None:
    """The topics nbreduce uses and their configured retention."""
    from runner.bus.topics import TOPICS

    overrides = load_settings().retention.topic_days
    for spec in TOPICS:
        ms = spec.retention_ms(overrides)
        kept = f"{ms // 86_400_000}d" if ms >= 0 else "forever"
        click.echo(f"{spec.name:32} partitions={spec.partitions:<2} retention={kept:>7}  {spec.cleanup_policy:14} "
                   f"{spec.purpose}")


@topics.command("wait")
@click.option("--timeout", default=0.0, help="Give up after this many seconds (0: wait for ever).")
def topics_wait(timeout: float) -> None:
    """Wait until every topic exists (what a component's init container does before it starts)."""
    import time

    from confluent_kafka import KafkaException

    from runner.bus.clients import admin
    from runner.bus.topics import TOPICS

    settings = load_settings()
    client = admin(settings)
    deadline = time.monotonic() + timeout if timeout else None
    while True:
        try:
            missing = sorted({t.name for t in TOPICS} - set(client.list_topics(timeout=10).topics))
        except KafkaException as exc:
            missing = [f"(broker not reachable: {exc})"]
        if not missing:
            click.echo("all topics exist")
            return
        if deadline is not None and time.monotonic() > deadline:
            raise click.ClickException(f"topics still missing after {timeout:.0f} s: {', '.join(missing)}")
        click.echo(f"waiting for topics: {', '.join(missing)}", err=True)
        time.sleep(5)
