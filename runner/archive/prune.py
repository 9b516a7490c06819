"""``nbreduce prune``: remove old versions from the archive, never ones the portal may still list.

The status topic is the job database and keeps every job for its retention (400 days by default);
the portal links each listed job to its version folder. Pruning versions younger than that would
leave links to notebooks that no longer exist, so the cut-off has a floor: ``NBREDUCE_RETENTION__ARCHIVE_MIN_AGE_DAYS``,
by default the status topic's retention. Only complete versions (``job.json`` present) are removed,
whole; in-progress reservations, ``.staging`` and anything that is not part of the documented layout
are left alone, and symbolic links are never followed, so nothing outside the archive can be touched.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

from pydantic import BaseModel, Field, computed_field

from runner.archive.layout import RECORD, version_dirs
from runner.bus.models import StatusEvent, utcnow
from runner.bus.topics import REDUCTION_STATUS, TOPICS
from runner.config import Settings

MIN_AGE_SETTING = "NBREDUCE_RETENTION__ARCHIVE_MIN_AGE_DAYS"
_DURATION = re.compile(r"^\s*(\d+)\s*([dwy])\s*$")
_UNIT_DAYS = {"d": 1, "w": 7, "y": 365}


class PruneRefused(ValueError):
    """The requested cut-off would remove versions the retention policy protects."""


def parse_duration(text: str) -> timedelta:
    """``<n>d``, ``<n>w`` or ``<n>y`` (365 days): whole units only, so a cut-off is never ambiguous."""
    match = _DURATION.match(text)
    if not match:
        raise ValueError(f"{text!r} is not a duration: use <n>d, <n>w or <n>y (days, weeks, 365-day years)")
    return timedelta(days=int(match.group(1)) * _UNIT_DAYS[match.group(2)])


def min_age(settings: Settings) -> timedelta:
    """The youngest a version may be when pruned: the configured floor, else the status topic's retention.

    Tying the default to the status retention keeps the portal consistent when an operator extends
    that retention (``retention.topic_days``) and forgets the archive.
    """
    configured = settings.retention.archive_min_age_days
    if configured is not None:
        return timedelta(days=configured)
    status = next(spec for spec in TOPICS if spec.name == REDUCTION_STATUS)
    retention_ms = status.retention_ms(settings.retention.topic_days)
    if retention_ms < 0:
        raise PruneRefused(
            f"{REDUCTION_STATUS} keeps jobs forever, so the portal may link to any version; "
            f"set {MIN_AGE_SETTING} to the age below which versions must be kept"
        )
    return timedelta(milliseconds=retention_ms)


class PrunedVersion(BaseModel):
    """One version folder that is (or, in a dry run, would be) removed."""

    path: str = Field(description="relative to the archive root")
    job_id: str | None = None
    finished_at: datetime
    #: ``job.json`` when the record names the finish time, ``mtime`` when it had to be guessed.
    age_from: str
    bytes: int
    removed: bool = False
    error: str | None = None


class PruneReport(BaseModel):
    archive: Path
    cutoff: datetime
    dry_run: bool
    instrument: str | None = None
    versions: list[PrunedVersion] = Field(default_factory=list)
    #: Version folders without ``job.json``: a job still running (or one that crashed and will be redelivered).
    in_progress: list[str] = Field(default_factory=list)
    removed_folders: list[str] = Field(default_factory=list)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_versions(self) -> int:
        """Versions removed (or, in a dry run, that would be)."""
        return sum(1 for v in self.versions if self.dry_run or v.removed)

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_bytes(self) -> int:
        return sum(v.bytes for v in self.versions if self.dry_run or v.removed)

    @property
    def errors(self) -> list[PrunedVersion]:
        return [v for v in self.versions if v.error]


def _finished_at(version: Path) -> tuple[str | None, datetime, str] | None:
    """Job id, finish time and where it came from; ``None`` for a version still in progress."""
    record = version / RECORD
    try:
        info = record.lstat()
    except OSError:
        return None
    if not stat.S_ISREG(info.st_mode):  # a symlinked record is not ours to trust
        return None
    try:
        event = StatusEvent.model_validate_json(record.read_bytes())
    except (OSError, ValueError):
        event = None
    if event is not None and event.finished_at is not None:
        finished = event.finished_at if event.finished_at.tzinfo else event.finished_at.replace(tzinfo=UTC)
        return event.job_id, finished, RECORD
    return (event.job_id if event else None), datetime.fromtimestamp(info.st_mtime, UTC), "mtime"


def _size(folder: Path) -> int:
    """Bytes of the files in ``folder`` (a symlink counts as itself, never as its target)."""
    total = 0
    for dirpath, _dirnames, filenames in os.walk(folder):  # os.walk does not descend into symlinked folders
        for name in filenames:
            with contextlib.suppress(OSError):  # removed meanwhile
                total += (Path(dirpath) / name).lstat().st_size
    return total


def _remove_version(version: Path) -> None:
    """Give the owner write permission back (published versions are read-only), then delete the folder.

    ``chmod`` is applied to real files and folders only: on a symlink it would change its target.
    """
    for dirpath, dirnames, filenames in os.walk(version):
        for name in [*dirnames, *filenames, ""]:
            path = Path(dirpath) / name if name else Path(dirpath)
            mode = path.lstat().st_mode
            if not stat.S_ISLNK(mode):
                path.chmod(stat.S_IMODE(mode) | stat.S_IWUSR | (stat.S_IXUSR if stat.S_ISDIR(mode) else 0))
    shutil.rmtree(version)


def _remove_empty_parents(folder: Path, root: Path) -> list[Path]:
    """Remove ``folder`` and its parents up to (excluding) ``root`` while they are empty."""
    removed = []
    while folder != root and folder.is_relative_to(root):
        try:
            folder.rmdir()
        except OSError:  # not empty (other versions, a new reservation): keep it and everything above
            break
        removed.append(folder)
        folder = folder.parent
    return removed


def prune(settings: Settings, older_than: timedelta, dry_run: bool = False, instrument: str | None = None,
          now: datetime | None = None) -> PruneReport:
    """Remove complete versions that finished before ``now - older_than``; see the module docstring."""
    floor = min_age(settings)
    if older_than < floor:
        raise PruneRefused(
            f"--older-than {older_than.days}d is shorter than the archive's minimum age of {floor.days}d: "
            f"the status topic keeps jobs for {floor.days} days and the portal links them to their versions. "
            f"Use at least {floor.days}d (or lower {MIN_AGE_SETTING}, accepting dead links in the portal)"
        )
    now = now or utcnow()
    root = settings.archive
    report = PruneReport(archive=root, cutoff=now - older_than, dry_run=dry_run,
                         instrument=instrument.strip().upper() if instrument else None)
    touched: list[Path] = []
    for version in version_dirs(root, report.instrument):
        run_dir = version.parent
        relative = str(version.relative_to(root))
        found = _finished_at(version)
        if found is None:
            report.in_progress.append(relative)
            continue
        job_id, finished, source = found
        if finished >= report.cutoff:
            continue
        entry = PrunedVersion(path=relative, job_id=job_id, finished_at=finished, age_from=source,
                              bytes=_size(version))
        report.versions.append(entry)
        if dry_run:
            continue
        try:
            _remove_version(version)
            entry.removed = True
            touched.append(run_dir)
        except OSError as exc:
            entry.error = f"{type(exc).__name__}: {exc}"
    for run_dir in dict.fromkeys(touched):
        report.removed_folders += [str(p.relative_to(root)) for p in _remove_empty_parents(run_dir, root)]
    return report


def human_size(size: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")
