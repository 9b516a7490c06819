"""``nbreduce template``: instrument templates; ``import`` converts an existing reduction script into one."""

from __future__ import annotations

import json
from pathlib import Path

import click

from runner.config import Settings


@click.group("template")
def template_commands() -> None:
    """Instrument templates (notebooks/<INSTRUMENT>/)."""


@template_commands.command("import")
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.option("--instrument", "-i", default=None,
              help="Instrument name (default: from the path, NDX<INST>/... or <INST>/reduce.py).")
@click.option("--environment", default="mantid", show_default=True,
              help="Processing environment named in instrument.toml (environments/<name>).")
@click.option("--notebooks", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Templates folder to write into (default: NBREDUCE_NOTEBOOKS).")
@click.option("--force", is_flag=True, help="Replace an existing template of the instrument.")
@click.option("--enable", is_flag=True,
              help="Write the template enabled if the conversion found no error (default: disabled until checked).")
@click.option("--json", "as_json", is_flag=True, help="Print the conversion report as JSON.")
def import_command(source: Path, instrument: str | None, environment: str, notebooks: Path | None, force: bool,
                   enable: bool, as_json: bool) -> None:
    """Convert a legacy autoreduction folder (reduce.py + reduce_vars.py [+ helper modules]) or a single
    reduce.py (FIA) into notebooks/<INSTRUMENT>/reduce.ipynb and instrument.toml, and print what was converted.

    Exit status: 0 written, 1 not converted (nothing written), 2 written with errors to fix by hand.
    """
    from runner.kernels.environments import discover
    from runner.templates.importer import ConversionError, import_template

    settings = Settings.from_env()
    target = notebooks or settings.notebooks
    try:
        report = import_template(source, target, instrument=instrument, environment=environment, force=force,
                                 enable=enable, known_environments=set(discover(settings.environments)))
    except ConversionError as exc:
        raise click.ClickException(str(exc)) from None
    click.echo(json.dumps(report.model_dump(mode="json"), indent=2) if as_json else report.text())
    if not report.runnable:
        raise SystemExit(2)
