"""The ISIS data archive as triggers see it: where run files and ``lastrun.txt`` live, the RB of a file.

Layout: ``<root>/NDX<INST>/Instrument/data/cycle_YY_N/<file>`` and ``<root>/NDX<INST>/Instrument/logs/lastrun.txt``.
Cycle folders roll over several times a year, so a finished run is looked for newest cycle first; a file
not written yet is expected in the newest cycle (the runner waits for it).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from runner.config import Settings
from runner.datafiles import rb_from_nexus
from runner.models import RBNumber
from runner.templates import InstrumentConfig, TemplateError, TemplateRegistry

log = logging.getLogger(__name__)

_RB = TypeAdapter(RBNumber)


def instrument_dir(root: Path, instrument: str) -> Path:
    return root / f"NDX{instrument}" / "Instrument"


def _cycle_order(path: Path) -> tuple[int, ...]:
    """``cycle_24_1`` -> (2024, 1); two-digit years from 80 on are 19YY (the archive reaches back to 1998)."""
    numbers = [int(n) for n in re.findall(r"\d+", path.name)] or [0]
    year = numbers[0]
    if year < 100:
        year += 1900 if year >= 80 else 2000
    return (year, *numbers[1:])


def cycle_dirs(roots: Sequence[Path], instrument: str) -> list[Path]:
    """Cycle folders of ``instrument`` under every data root, newest first."""
    found = [p for root in roots for p in (instrument_dir(root, instrument) / "data").glob("cycle_*") if p.is_dir()]
    return sorted(found, key=_cycle_order, reverse=True)


def find_data_file(roots: Sequence[Path], instrument: str, file_name: str) -> Path:
    """Full path of a run file: an absolute name as given, else the newest cycle holding it, else the newest cycle."""
    if Path(file_name).is_absolute():
        return Path(file_name)
    name = Path(file_name).name
    cycles = cycle_dirs(roots, instrument)
    for cycle in cycles:
        if (cycle / name).is_file():
            return cycle / name
    if cycles:
        return cycles[0] / name
    return instrument_dir(roots[0], instrument) / "data" / name


def lastrun_file(roots: Sequence[Path], instrument: str) -> Path:
    """``lastrun.txt`` of ``instrument``: under the first data root that has one (else where it would be)."""
    candidates = [instrument_dir(root, instrument) / "logs" / "lastrun.txt" for root in roots]
    return next((c for c in candidates if c.exists()), candidates[0])


def instrument_config(settings: Settings, instrument: str) -> InstrumentConfig:
    """File naming of ``instrument`` from its template folder; ISIS defaults when it has none (yet)."""
    try:
        return TemplateRegistry(settings.notebooks).config(instrument)
    except TemplateError as exc:
        log.debug("%s: using default file naming (%s)", instrument, exc)
        return InstrumentConfig(name=instrument)


def valid_rb(value: object, source: str) -> str | None:
    """``value`` as an RB number, or None (logged) when it is not one, e.g. a calibration placeholder."""
    if value is None or value == "":
        return None
    try:
        return _RB.validate_python(str(value))
    except ValidationError:
        log.warning("ignoring invalid RB number %r from %s", value, source)
        return None


def experiment_number(path: Path) -> str | None:
    """RB number recorded in the NeXus file at ``path``, when the file exists and is readable."""
    if not path.is_file():
        return None
    try:
        raw = rb_from_nexus(path)
    except Exception as exc:  # a file still being written can fail in many ways; the runner reports a missing RB
        log.info("cannot read the RB from %s yet: %s", path, exc)
        return None
    return valid_rb(raw, str(path))
