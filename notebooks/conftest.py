"""Sample data for ``pytest --nbval-lax notebooks/``: every template runs on a simulated run of its instrument.

nbval executes each template with its default parameters and the notebook's folder as working
directory, so the file a template's ``data_file`` default names (under ``sample_data/``, which git
ignores) is written here by the run simulator before the session starts. Templates whose default
points elsewhere are left alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from runner.sim import instrument_model, write_run_file
from runner.templates.registry import TemplateError, TemplateRegistry

NOTEBOOKS = Path(__file__).resolve().parent
SAMPLE_DIR = "sample_data"
SAMPLE_EVENTS = 200_000
SAMPLE_RB = "1234567"


def _default(parameters: dict[str, dict], name: str):
    """A parameter's default as a Python value (papermill reports defaults as source text)."""
    try:
        return ast.literal_eval(parameters[name]["default"])
    except (KeyError, ValueError, SyntaxError):
        return None


def write_sample_data(root: Path = NOTEBOOKS) -> list[Path]:
    """Simulate the default ``data_file`` of each template that keeps it under ``sample_data/``.

    An instrument's own template gets a run of that instrument; a technique family's shared template
    (``techniques/<family>/``) a run of the family's first instrument (alphabetically).
    """
    registry = TemplateRegistry(root)
    written = []
    seen: set[Path] = set()
    for instrument in registry.instruments():
        try:
            template = registry.resolve(instrument)
        except TemplateError:
            continue
        if template.path in seen:
            continue
        seen.add(template.path)
        parameters = template.parameters()
        data_file = _default(parameters, "data_file")
        if not isinstance(data_file, str) or Path(data_file).parts[:1] != (SAMPLE_DIR,):
            continue
        run = _default(parameters, "run_number")
        run = run if isinstance(run, int) and run > 0 else 1
        # fixed seed: every session reduces the same events, so a failure can be reproduced
        written.append(write_run_file(template.path.parent / data_file, template.config, run, SAMPLE_RB,
                                      events=SAMPLE_EVENTS, title=instrument_model(template.config).title(run),
                                      seed=run))
    return written


def pytest_sessionstart(session: pytest.Session) -> None:
    write_sample_data()
