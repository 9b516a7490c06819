"""The ISIS data archive as triggers see it: where run files and ``lastrun.txt`` live, the RB of a file.

Layout: ``<root>/NDX<INST>/Instrument/data/cycle_YY_N/<file>`` and ``<root>/NDX<INST>/Instrument/logs/lastrun.txt``.
Cycle folders roll over several times a year, so a finished run is looked for newest cycle first; a file
not written yet is expected in the newest cycle (the runner waits for it).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

from pydantic import TypeAdapter, ValidationError

from runner.atomic import write_atomic
from runner.bus.models import RBNumber
from runner.config import Settings
from runner.isis.nexus import rb_from_nexus
from runner.templates.registry import InstrumentConfig, TemplateError, TemplateRegistry

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


class LastRunError(ValueError):
    """``lastrun.txt`` could not be read or understood (after retries)."""


def current_cycle(today: datetime | None = None) -> str:
    """ISIS-like cycle folder name for a date: ``cycle_YY_N`` with one cycle per quarter."""
    day = today or datetime.now(UTC)
    return f"cycle_{day:%y}_{(day.month - 1) // 3 + 1}"


def parse_lastrun(text: str) -> int:
    """Run number of a ``lastrun.txt`` line such as ``MAR 25581 0`` (three fields, the second is the run)."""
    fields = text.split()
    if len(fields) != 3 or not fields[1].isdigit() or int(fields[1]) <= 0:
        raise LastRunError(f"expected '<INST> <run> <n>', got {text.strip()[:80]!r}")
    return int(fields[1])


def read_lastrun(path: Path, retries: int = 5, delay: float = 0.2,
                 sleep: Callable[[float], None] = time.sleep) -> int:
    """Current run of ``path``; read errors and half-written contents are retried ``retries`` times
    (the instrument rewrites the file in place), then :class:`LastRunError`."""
    problem: Exception | None = None
    for attempt in range(retries + 1):
        if attempt:
            sleep(delay)
        try:
            return parse_lastrun(path.read_text(encoding="ascii"))
        except (OSError, ValueError) as exc:  # ValueError covers bad bytes and half-written lines
            problem = exc
    raise LastRunError(f"{path}: unreadable after {retries + 1} attempts: {type(problem).__name__}: {problem}") \
        from problem


def write_lastrun(path: Path, prefix: str, run: int, digits: int) -> None:
    """What the instrument's data acquisition writes at the end of a run (atomically replaced)."""
    write_atomic(path, f"{prefix} {run:0{digits}d} 0\n")
