"""``nbreduce simulate``: runs of a simulated instrument written into the ISIS archive layout and announced.

For each run: the NeXus file in ``NDX<INST>/Instrument/data/cycle_YY_N/``, then the ``lastrun.txt``
line a watcher polls, then the ``data_ready``-compatible run completion on Kafka.
"""

from __future__ import annotations

import dataclasses
import logging
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path

import numpy as np

from runner.bus.clients import Publisher
from runner.bus.models import RunCompletion, new_id
from runner.bus.topics import RUN_COMPLETIONS
from runner.config import Settings
from runner.isis.layout import LastRunError, current_cycle, instrument_dir, lastrun_file, read_lastrun, write_lastrun
from runner.sim.diffraction import PowderDiffractometer
from runner.sim.engineering import EngineeringDiffractometer
from runner.sim.imaging import ImagingInstrument
from runner.sim.indirect import IndirectSpectrometer
from runner.sim.muon import MuonSpectrometer
from runner.sim.physics import SimulatedInstrument
from runner.sim.reflectometry import Reflectometer
from runner.sim.sans import SansInstrument
from runner.sim.spectroscopy import ChopperSpectrometer
from runner.templates.registry import InstrumentConfig, TemplateRegistry

log = logging.getLogger(__name__)

DEFAULT_EVENTS = 200_000

#: Simulation model of each technique family (``family`` in instrument.toml).
FAMILIES: dict[str, type[SimulatedInstrument]] = {
    "powder-diffraction": PowderDiffractometer,
    "engineering-diffraction": EngineeringDiffractometer,
    "direct-spectroscopy": ChopperSpectrometer,
    "indirect-spectroscopy": IndirectSpectrometer,
    "sans": SansInstrument,
    "reflectometry": Reflectometer,
    "muon": MuonSpectrometer,
    "imaging": ImagingInstrument,
}
#: Models of instruments with a notebook of their own and no family, by name.
MODELS: dict[str, type[SimulatedInstrument]] = {
    "WISH": PowderDiffractometer,
    "MARI": ChopperSpectrometer,
}


class UnknownInstrument(LookupError):
    """No simulation model for an instrument: its ``family`` is not simulated."""


def instrument_model(config: InstrumentConfig) -> SimulatedInstrument:
    """The simulation model of ``config``'s instrument; its ``[constants]`` and ``[simulation]`` tables set the
    model's fields of the same names (unknown names are ignored: templates may need more constants)."""
    return _model(config.model_dump_json(include={"name", "family", "technique", "constants", "simulation"}))


@lru_cache(maxsize=64)
def _model(config_json: str) -> SimulatedInstrument:
    # cached: geometry and rate tables are built once per instrument, not once per run
    config = InstrumentConfig.model_validate_json(config_json)
    cls = FAMILIES.get(config.family or "") or MODELS.get(config.name)
    if cls is None:  # legacy configurations without a family: by technique text
        technique = config.technique.lower()
        cls = ChopperSpectrometer if "spectro" in technique or "inelastic" in technique else PowderDiffractometer
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    values = {k: v for k, v in {**config.constants, **config.simulation}.items() if k in known}
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in values.items()}  # frozen dataclasses
    if config.name not in MODELS and "first_run" not in values:
        values["first_run"] = 1
    return cls(name=config.name, **values)


def write_run_file(path: Path, config: InstrumentConfig, run: int, rb_number: str, *, events: int, title: str,
                   seed: int | None = None) -> Path:
    """The data file of one run of ``config``'s instrument, at ``path``, in the format its real files have."""
    return instrument_model(config).write(path, run=run, rb_number=rb_number,
                                          short_name=config.file_prefix or config.name, events=events, title=title,
                                          seed=seed)


def write_run(data_root: Path, config: InstrumentConfig, run: int, rb_number: str, *, events: int, title: str,
              cycle: str | None = None, seed: int | None = None) -> Path:
    """Write run ``run`` into the ISIS archive layout under ``data_root`` and advance ``lastrun.txt``.

    The data file is complete before ``lastrun.txt`` names it, so a polling watcher never starts early.
    """
    folder = cycle or current_cycle()
    folder = folder if folder.startswith("cycle_") else f"cycle_{folder}"
    base = instrument_dir(Path(data_root), config.name)
    path = write_run_file(base / "data" / folder / config.data_file_name(run), config, run, rb_number,
                          events=events, title=title, seed=seed)
    write_lastrun(lastrun_file([Path(data_root)], config.name), config.file_prefix or config.name, run,
                  config.run_digits)
    return path


def random_rb(rng: np.random.Generator | None = None) -> str:
    """A plausible 7-digit RB number: two-digit year of the proposal round, then five digits."""
    rng = rng or np.random.default_rng()
    return f"{datetime.now(UTC):%y}{int(rng.integers(10000, 100000)):05d}"


def simulate(settings: Settings, instrument: str, runs: int, events: int = DEFAULT_EVENTS, *,
             rb_number: str | None = None, first_run: int | None = None,
             publish: bool = True) -> list[RunCompletion]:
    """Simulate ``runs`` consecutive runs of ``instrument``; publish one run completion per run.

    Run numbers continue from the instrument's ``lastrun.txt`` (like the real instrument) unless
    ``first_run`` is given. All runs share one experiment (RB) number.
    """
    if runs < 1 or events < 1:
        raise ValueError("runs and events must be positive")
    config = TemplateRegistry(settings.notebooks).config(instrument)
    data_root = settings.data_roots[0]
    try:
        last: int | None = read_lastrun(lastrun_file([Path(data_root)], config.name), retries=0)
    except LastRunError:  # no run yet (or an unreadable file): start at the model's first run
        last = None
    model = instrument_model(config)
    run = first_run or (last + 1 if last else model.first_run)
    rb = rb_number or random_rb()
    publisher = Publisher(settings) if publish else None
    messages: list[RunCompletion] = []
    try:
        for number in range(run, run + runs):
            title = model.title(number)
            path = write_run(data_root, config, number, rb, events=events, title=title)
            message = RunCompletion(message_id=new_id(), instrument=config.name, run_number=number, rb_number=rb,
                                    data=str(path), run_title=title, facility="ISIS", started_by=0)
            if publisher:
                publisher.publish(RUN_COMPLETIONS, message, key=message.message_id)  # spread over the runners
            log.info("simulated %s run %d (%d events): %s", config.name, number, events, path)
            messages.append(message)
    finally:
        if publisher:
            publisher.close()
    return messages
