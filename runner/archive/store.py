"""The archive: one documented layout, versions never overwritten, files published read-only.

Layout::

    <archive>/<INSTRUMENT>/RB<rb>/<run>/v<k>/<INSTRUMENT>_<run>.ipynb   executed notebook
                                            /job.json                  final status + provenance
                                            /<output files>            written by the template

A job reserves ``v<k>`` (``mkdir`` is the atomic lock) and its template writes output files there
(so ``output_dir`` in the executed notebook is the real folder). The notebook itself is executed in
``<archive>/.staging/<job_id>/`` and renamed into place at the end; ``job.json`` is written last,
so a version is complete exactly when it has ``job.json``. The reservation is recorded in the
staging folder: a job redelivered after a crash finds its version again instead of taking a new one.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from runner.archive.integrity import VersionRecord, digest_version
from runner.archive.layout import RECORD, STAGING, run_label
from runner.archive.permissions import ArchivePermissions, OpenPermissions
from runner.atomic import write_atomic
from runner.bus.models import StatusEvent

_RESERVATION = ".reservation.json"


class ReservationBusy(RuntimeError):
    """Another runner holds this job right now (a rebalance handed its message to us as well)."""


@dataclass(frozen=True)
class Reservation:
    job_id: str
    version: int
    staging: Path
    final: Path
    notebook_name: str
    #: open file holding an exclusive ``flock`` on the job for as long as the reservation lives
    lock: IO[bytes] | None = None

    @property
    def staged_notebook(self) -> Path:
        return self.staging / self.notebook_name

    @property
    def notebook(self) -> Path:
        return self.final / self.notebook_name


class Archive:
    """Reserve, stage and publish versions under one archive root."""

    def __init__(self, root: Path, permissions: ArchivePermissions | None = None):
        self.root = Path(root)
        #: Applied to every instrument and experiment folder this archive creates (runner.archive.permissions).
        self.permissions = permissions or OpenPermissions()

    def _experiment_dir(self, instrument: str, rb_number: str) -> None:
        """Create ``<INST>/RB<rb>`` with the permissions of the policy before anything is written into it."""
        inst_dir = self.root / instrument
        rb_dir = inst_dir / f"RB{rb_number}"
        if rb_dir.is_dir():
            return
        new_instrument = not inst_dir.is_dir()
        rb_dir.mkdir(parents=True, exist_ok=True)
        if new_instrument:
            self.permissions.instrument(inst_dir, instrument)
        self.permissions.experiment(rb_dir, instrument, rb_number)

    def run_dir(self, instrument: str, rb_number: str, runs: list[int]) -> Path:
        path = (self.root / instrument / f"RB{rb_number}" / run_label(runs)).resolve()
        if not path.is_relative_to(self.root.resolve()):  # models validate names; this is the last guard
            raise ValueError(f"refusing to write outside the archive: {path}")
        return path

    def versions(self, instrument: str, rb_number: str, runs: list[int]) -> list[int]:
        run_dir = self.run_dir(instrument, rb_number, runs)
        return sorted(_version_numbers(run_dir)) if run_dir.is_dir() else []

    def staging_dir(self, job_id: str) -> Path:
        return self.root / STAGING / job_id

    def published(self, job_id: str, instrument: str, rb_number: str, runs: list[int]) -> StatusEvent | None:
        """The final record of ``job_id`` if it was already published (redelivery after a crash)."""
        run_dir = self.run_dir(instrument, rb_number, runs)
        for version in self.versions(instrument, rb_number, runs):
            record = run_dir / f"v{version}" / RECORD
            if record.is_file():
                try:
                    event = StatusEvent.model_validate_json(record.read_text())
                except ValueError:
                    continue
                if event.job_id == job_id:
                    return event
        return None

    def reserve(self, job_id: str, instrument: str, rb_number: str, runs: list[int]) -> Reservation:
        """A version for ``job_id``: the one reserved before a crash, or the next free one.

        The job is locked (``flock``) while reserved: if a rebalance delivered the same message to two
        runners, the second gets :class:`ReservationBusy` instead of clearing the first one's work.
        """
        run_dir = self.run_dir(instrument, rb_number, runs)
        staging = self.staging_dir(job_id)
        marker = staging / _RESERVATION
        name = f"{instrument}_{run_label(runs)}.ipynb"
        lock = _lock(self.root / STAGING / f"{job_id}.lock")
        try:
            self._experiment_dir(instrument, rb_number)
            return self._reserve(job_id, run_dir, staging, marker, name, lock)
        except BaseException:
            lock.close()
            raise

    def _reserve(self, job_id: str, run_dir: Path, staging: Path, marker: Path, name: str,
                 lock: IO[bytes]) -> Reservation:
        if marker.is_file():
            version = json.loads(marker.read_text())["version"]
            final = run_dir / f"v{version}"
            if final.is_dir() and not (final / RECORD).exists():  # interrupted before publication: start over
                _clear(staging, keep=marker)
                _clear(final)
                return Reservation(job_id, version, staging, final, name, lock)
        run_dir.mkdir(parents=True, exist_ok=True)
        version = max(_version_numbers(run_dir), default=0) + 1
        while True:
            try:
                (run_dir / f"v{version}").mkdir()
                break
            except FileExistsError:  # another runner took it
                version += 1
        try:
            if staging.exists():
                shutil.rmtree(staging)
            staging.mkdir(parents=True)
            # atomically: a marker cut short by a full disk would make every retry of the job fail to read it
            write_atomic(marker, json.dumps({"version": version, "run_dir": str(run_dir)}))
        except OSError:  # archive full or read-only: give the version back, the retry reserves it again
            with contextlib.suppress(OSError):
                (run_dir / f"v{version}").rmdir()
            raise
        return Reservation(job_id, version, staging, run_dir / f"v{version}", name, lock)

    def publish(self, reservation: Reservation, record: StatusEvent) -> Path:
        """Move the notebook in, write the record with every file's digest last (atomically), make the
        version read-only."""
        if reservation.staged_notebook.exists():
            os.replace(reservation.staged_notebook, reservation.notebook)
        stored = VersionRecord(**record.model_dump(), files=digest_version(reservation.final))
        write_atomic(reservation.final / RECORD, stored.model_dump_json(indent=2, exclude_none=True))
        make_read_only(reservation.final)
        self._unlock(reservation)
        return reservation.final

    def release(self, reservation: Reservation) -> None:
        """Give back a reservation that will not be used (the job was rejected before it ran)."""
        with contextlib.suppress(OSError):
            reservation.final.rmdir()
        self._unlock(reservation)

    @staticmethod
    def _unlock(reservation: Reservation) -> None:
        shutil.rmtree(reservation.staging, ignore_errors=True)
        if reservation.lock is not None:
            Path(reservation.lock.name).unlink(missing_ok=True)
            reservation.lock.close()

    def relative(self, path: Path) -> str:
        return str(Path(path).resolve().relative_to(self.root.resolve()))


def make_read_only(folder: Path, top: bool = True, children: bool = True) -> None:
    """Files r--r--r--, folders r-xr-xr-x: published versions are never modified in place."""
    write_bits = stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH
    if children:
        for dirpath, dirnames, filenames in os.walk(folder, topdown=False):
            for name in filenames + dirnames:
                path = Path(dirpath) / name
                if not path.is_symlink():
                    path.chmod(path.stat().st_mode & ~write_bits)
    if top:
        folder.chmod(folder.stat().st_mode & ~write_bits)


def _version_numbers(run_dir: Path) -> list[int]:
    return [int(p.name[1:]) for p in run_dir.iterdir() if p.name[:1] == "v" and p.name[1:].isdigit()]


def _lock(path: Path) -> IO[bytes]:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.parent.chmod(0o700)  # .staging: notebooks still being executed are nobody's business but the runner's
    handle = open(path, "ab")  # noqa: SIM115 - held for the life of the reservation
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise ReservationBusy(f"job {path.stem} is being run by another runner") from None
    return handle


def _clear(folder: Path, keep: Path | None = None) -> None:
    for child in folder.iterdir():
        if child != keep:
            shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
