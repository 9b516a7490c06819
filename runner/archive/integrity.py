"""Proof that published versions never change: every file's sha256 and size, recorded at publication.

``job.json`` of a version is a :class:`VersionRecord`: the job's final status plus the digest of every
file the version holds (the executed notebook, the outputs). :func:`verify` compares the archive with
those records — files changed, missing, or added since — for ``nbreduce archive verify`` and the run
page's integrity line. File modes and the operating system stop writers; this makes any change visible.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from functools import lru_cache
from pathlib import Path

from pydantic import BaseModel, Field

from runner.archive.layout import RECORD, version_dirs
from runner.bus.models import StatusEvent

_CHUNK = 1 << 20


class FileDigest(BaseModel):
    sha256: str
    size: int


class VersionRecord(StatusEvent):
    """``job.json``: the final status of the job and the digest of every file of its version."""

    #: Path relative to the version folder -> digest. Absent in versions published before integrity records.
    files: dict[str, FileDigest] | None = None


class VersionCheck(BaseModel):
    """How a version compares with its record."""

    version: str
    changed: list[str] = Field(default_factory=list)
    missing: list[str] = Field(default_factory=list)
    extra: list[str] = Field(default_factory=list)
    #: No digest was recorded (published before integrity records, or job.json unreadable).
    unrecorded: bool = False
    files: int = 0

    @property
    def ok(self) -> bool:
        return not (self.changed or self.missing or self.extra or self.unrecorded)

    def summary(self) -> str:
        if self.unrecorded:
            return "no integrity record"
        if self.ok:
            return f"unchanged since publication ({self.files} files verified)"
        parts = [f"{label}: {', '.join(names)}" for label, names in
                 (("changed", self.changed), ("missing", self.missing), ("added", self.extra)) if names]
        return "MODIFIED since publication — " + "; ".join(parts)


def digest(path: Path) -> FileDigest:
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            sha.update(chunk)
    return FileDigest(sha256=sha.hexdigest(), size=path.stat().st_size)


def _files(folder: Path) -> Iterator[str]:
    """Files of a version, relative, the record itself excluded; symbolic links count as files (never followed)."""
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames.sort()
        for name in sorted(filenames):
            relative = str((Path(dirpath) / name).relative_to(folder))
            if relative != RECORD:
                yield relative


def digest_version(folder: Path) -> dict[str, FileDigest]:
    """The digest of every file of a version folder (what :class:`VersionRecord` records)."""
    return {name: digest(folder / name) for name in _files(folder)}


def check_version(folder: Path, root: Path | None = None) -> VersionCheck:
    """Compare one version folder with its record."""
    label = str(folder.relative_to(root)) if root else str(folder)
    try:
        record = VersionRecord.model_validate_json((folder / RECORD).read_bytes())
    except (OSError, ValueError):
        record = None
    present = set(_files(folder))
    if record is None or record.files is None:
        return VersionCheck(version=label, unrecorded=True, files=len(present))
    check = VersionCheck(version=label, files=len(record.files))
    check.missing = sorted(set(record.files) - present)
    check.extra = sorted(present - set(record.files))
    for name in sorted(set(record.files) & present):
        path = folder / name
        expected = record.files[name]
        if path.is_symlink() or path.stat().st_size != expected.size or digest(path).sha256 != expected.sha256:
            check.changed.append(name)
    return check


def cached_check(folder: Path) -> VersionCheck:
    """:func:`check_version`, recomputed only when a file of the version changed (the run page asks often)."""
    stamp = tuple((name, (folder / name).lstat().st_mtime_ns, (folder / name).lstat().st_size)
                  for name in _files(folder))
    return _cached(str(folder), stamp)


@lru_cache(maxsize=512)
def _cached(folder: str, stamp: tuple) -> VersionCheck:
    return check_version(Path(folder))


class VerifyReport(BaseModel):
    archive: Path
    versions: list[VersionCheck] = Field(default_factory=list)

    @property
    def problems(self) -> list[VersionCheck]:
        return [v for v in self.versions if not v.ok]


def verify(root: Path, instrument: str | None = None, rb_number: str | None = None) -> VerifyReport:
    """Every complete version (one with a record) under ``root``, compared with its record."""
    report = VerifyReport(archive=root)
    for folder in version_dirs(root, instrument, rb_number):
        if (folder / RECORD).is_file():
            report.versions.append(check_version(folder, root))
    return report
