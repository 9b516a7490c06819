"""Published versions carry the digest of every file; ``nbreduce archive verify`` finds any change."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from click.testing import CliRunner

from runner.archive.integrity import VersionRecord, cached_check, check_version, verify
from runner.archive.store import Archive
from runner.bus.models import JobState, StatusEvent
from runner.cli.archive import verify_command
from runner.config import Settings


def publish(archive: Archive, job: str, run: int, files: dict[str, bytes]) -> Path:
    reservation = archive.reserve(job, "MARI", "1920001", [run])
    reservation.staged_notebook.write_text("{}")
    for name, content in files.items():
        (reservation.final / name).parent.mkdir(parents=True, exist_ok=True)
        (reservation.final / name).write_bytes(content)
    archive.publish(reservation, StatusEvent(job_id=job, state=JobState.SUCCEEDED, instrument="MARI", run_number=run,
                                             rb_number="1920001"))
    return reservation.final


def writable(path: Path) -> None:
    """What an intruder with write permission would do first (versions are published read-only)."""
    for p in [path, *path.rglob("*")]:
        p.chmod(p.stat().st_mode | stat.S_IWUSR)


def test_record_lists_every_file_with_its_digest(settings: Settings) -> None:
    version = publish(Archive(settings.archive), "j1", 1, {"cut.txt": b"1 2 3", "maps/sqw.h5": b"\x89HDF"})
    record = VersionRecord.model_validate_json((version / "job.json").read_text())
    assert sorted(record.files) == ["MARI_1.ipynb", "cut.txt", "maps/sqw.h5"]
    assert record.files["cut.txt"].size == 5 and len(record.files["cut.txt"].sha256) == 64
    assert StatusEvent.model_validate_json((version / "job.json").read_text()).job_id == "j1"  # still a status
    assert check_version(version).ok and cached_check(version).summary().startswith("unchanged since publication")


def test_verify_reports_changed_missing_and_extra_files(settings: Settings) -> None:
    archive = Archive(settings.archive)
    good = publish(archive, "j1", 1, {"cut.txt": b"1 2 3"})
    bad = publish(archive, "j2", 2, {"cut.txt": b"1 2 3", "old.png": b"png"})
    writable(bad)
    (bad / "cut.txt").write_bytes(b"1 2 4")  # same size, other content
    (bad / "old.png").unlink()
    (bad / "MARI_2.ipynb").write_text('{"rewritten": true}')
    (bad / ".ipynb_checkpoints").mkdir()
    (bad / ".ipynb_checkpoints" / "MARI_2-checkpoint.ipynb").write_text("{}")
    report = verify(settings.archive)
    assert [v.version for v in report.versions] == ["MARI/RB1920001/1/v1", "MARI/RB1920001/2/v1"]
    [problem] = report.problems
    assert problem.changed == ["MARI_2.ipynb", "cut.txt"] and problem.missing == ["old.png"]
    assert problem.extra == [".ipynb_checkpoints/MARI_2-checkpoint.ipynb"]
    assert check_version(good).ok

    result = CliRunner().invoke(verify_command, ["--instrument", "MARI"], env={**os.environ})
    assert result.exit_code == 1 and "MARI/RB1920001/2/v1: MODIFIED" in result.output
    assert "2 version(s) checked, 1 with problems" in result.output
    assert CliRunner().invoke(verify_command, ["--rb", "1920001", "--json"]).exit_code == 1
    assert verify(settings.archive, rb_number="1930000").versions == []
