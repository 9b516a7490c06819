"""``nbreduce simulate``: ISIS-style runs of a simulated instrument."""

from __future__ import annotations

import click

from runner.cli.common import broker_settings, load_settings


@click.command()
@click.option("--instrument", "-i", required=True)
@click.option("--runs", "count", default=1, show_default=True, help="Number of runs to simulate.")
@click.option("--events", default=None, type=int, help="Neutron events per run.")
@click.option("--rb", default=None, help="Experiment (RB) number.")
@click.option("--no-publish", is_flag=True, help="Only write the files, publish no run-completion message.")
def simulate(instrument, count, events, rb, no_publish) -> None:
    """Write ISIS-style NeXus event files and publish their run-completion messages."""
    from runner.sim.runs import simulate as run_simulation

    kwargs = {"events": events} if events else {}
    settings = load_settings() if no_publish else broker_settings()
    messages = run_simulation(settings, instrument.upper(), count, rb_number=rb, publish=not no_publish,
                              **kwargs)
    for m in messages:
        click.echo(f"{m.instrument} run {m.run_number} RB{m.rb_number}: {m.data}")
