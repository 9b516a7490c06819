"""Archive pruning: only complete versions older than the cut-off go, and never younger than the floor."""

from __future__ import annotations

import os
from datetime import timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from runner.archive.prune import PruneRefused, parse_duration, prune
from runner.archive.store import Archive
from runner.bus.models import JobState, StatusEvent, utcnow
from runner.cli.archive import prune_command
from runner.config import Settings


def publish_version(archive: Archive, job_id: str, run: int, age_days: float | None, instrument: str = "MARI",
                    rb: str = "1920001", size: int = 1000) -> Path:
    """A complete version as the runner leaves it; ``age_days=None``: a record without ``finished_at``."""
    reservation = archive.reserve(job_id, instrument, rb, [run])
    reservation.staged_notebook.write_bytes(b"n" * size)
    finished = utcnow() - timedelta(days=age_days) if age_days is not None else None
    archive.publish(reservation, StatusEvent(job_id=job_id, state=JobState.SUCCEEDED, instrument=instrument,
                                             run_number=run, rb_number=rb, version=reservation.version,
                                             finished_at=finished))
    return reservation.final


@pytest.fixture
def archive(settings: Settings) -> Archive:
    return Archive(settings.archive)


def test_durations() -> None:
    assert parse_duration("400d") == timedelta(days=400)
    assert parse_duration("60w") == timedelta(weeks=60)
    assert parse_duration("2y") == timedelta(days=730)
    for bad in ("18mo", "1.5y", "-3d", "d", ""):
        with pytest.raises(ValueError, match="<n>d, <n>w or <n>y"):
            parse_duration(bad)


def test_refuses_a_cutoff_younger_than_the_status_retention(settings: Settings, archive: Archive,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    young = publish_version(archive, "young", 100, age_days=100)
    with pytest.raises(PruneRefused, match="minimum age of 400d"):
        prune(settings, timedelta(days=90))
    result = CliRunner().invoke(prune_command, ["--older-than", "30d"])
    assert result.exit_code == 2 and "minimum age of 400d" in result.output
    assert young.is_dir()

    monkeypatch.setenv("NBREDUCE_RETENTION__TOPIC_DAYS__REDUCTION_STATUS", "730")  # portal lists jobs longer
    with pytest.raises(PruneRefused, match="minimum age of 730d"):
        prune(Settings(), timedelta(days=400))
    monkeypatch.setenv("NBREDUCE_RETENTION__ARCHIVE_MIN_AGE_DAYS", "30")  # an explicit floor wins
    assert prune(Settings(), timedelta(days=90)).total_versions == 1
    assert not young.exists()


def test_dry_run_lists_with_sizes_and_deletes_nothing(settings: Settings, archive: Archive) -> None:
    old = publish_version(archive, "old", 100, age_days=500, size=5000)
    publish_version(archive, "new", 101, age_days=10)
    before = sorted(p for p in settings.archive.rglob("*"))

    report = prune(settings, timedelta(days=400), dry_run=True)
    assert [v.path for v in report.versions] == ["MARI/RB1920001/100/v1"]
    assert report.versions[0].job_id == "old" and report.versions[0].age_from == "job.json"
    assert report.total_versions == 1 and report.total_bytes == report.versions[0].bytes > 5000
    assert sorted(p for p in settings.archive.rglob("*")) == before and old.is_dir()

    result = CliRunner().invoke(prune_command, ["--older-than", "400d", "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "would remove MARI/RB1920001/100/v1" in result.output and "KiB" in result.output
    assert "would remove 1 version(s)" in result.output
    assert old.is_dir()


def test_removes_only_old_complete_versions_and_empty_folders(settings: Settings, archive: Archive,
                                                              tmp_path: Path) -> None:
    old_run = publish_version(archive, "a1", 100, age_days=800).parent       # whole run goes
    keep_v1 = publish_version(archive, "b1", 200, age_days=900)              # run keeps a younger version
    keep_v2 = publish_version(archive, "b2", 200, age_days=30)
    other_instrument = publish_version(archive, "c1", 300, age_days=800, instrument="WISH", rb="1920002")
    no_finish = publish_version(archive, "d1", 400, age_days=None)           # age from job.json's mtime
    old = (utcnow() - timedelta(days=700)).timestamp()
    os.utime(no_finish / "job.json", (old, old))
    in_progress = archive.reserve("e1", "MARI", "1920001", [500])            # running: no job.json
    (in_progress.final / "partial.h5").write_bytes(b"x")
    os.utime(in_progress.final, (old, old))
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "precious.txt").write_text("keep")
    keep_v1.chmod(0o755)
    os.symlink(outside, keep_v1 / "link-out")   # inside an old version: the link goes, its target stays
    keep_v1.chmod(0o555)
    os.symlink(outside, settings.archive / "LINKED")  # an instrument folder that is a symlink: never entered
    (outside / "RB1" / "1" / "v1").mkdir(parents=True)
    (outside / "RB1" / "1" / "v1" / "job.json").write_text("{}")
    os.utime(outside / "RB1" / "1" / "v1" / "job.json", (old, old))

    report = prune(settings, timedelta(days=400), instrument="mari")
    assert sorted(v.path for v in report.versions) == [
        "MARI/RB1920001/100/v1", "MARI/RB1920001/200/v1", "MARI/RB1920001/400/v1"]
    assert all(v.removed and v.error is None for v in report.versions)
    assert {v.path: v.age_from for v in report.versions}["MARI/RB1920001/400/v1"] == "mtime"
    assert report.in_progress == ["MARI/RB1920001/500/v1"]
    assert not old_run.exists() and not keep_v1.exists() and keep_v2.is_dir()
    assert "MARI/RB1920001/100" in report.removed_folders and "MARI/RB1920001/400" in report.removed_folders
    assert in_progress.final.is_dir() and in_progress.staging.is_dir()  # the running job is untouched
    assert other_instrument.is_dir()  # --instrument limits the scope
    assert (outside / "precious.txt").read_text() == "keep" and (outside / "RB1" / "1" / "v1").is_dir()

    # the last WISH version goes: run, RB and instrument folders go with it
    report = prune(settings, timedelta(days=400))
    assert [v.path for v in report.versions] == ["WISH/RB1920002/300/v1"]
    assert not (settings.archive / "WISH").exists()
    assert report.removed_folders == ["WISH/RB1920002/300", "WISH/RB1920002", "WISH"]
    assert (settings.archive / ".staging").is_dir() and (settings.archive / "MARI").is_dir()
