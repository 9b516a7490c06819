"""The imaging family (IMAT): simulated FITS run folders reduced end to end, and run-folder readiness.

White-beam runs image an iron step wedge of known attenuation, time-of-flight runs an α-Fe plate with Bragg
edges at 2 d_hkl; the runs go through the real broker and the runner, in the ``imaging`` environment's kernel.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from pipeline_support import running_platform

from runner import sim
from runner.bus.models import JobState, StatusEvent
from runner.config import Settings
from runner.pipeline.datafiles import is_ready
from runner.pipeline.submit import submit_request, wait_for_jobs
from runner.sim.imaging import FITS_BLOCK, ImagingInstrument, bcc_reflections, fits_bytes
from runner.templates.registry import TemplateRegistry

REPO = Path(__file__).resolve().parent.parent
RB = "2610012"
WHITE, TOF, NO_OPEN_BEAM, MUON_FILE = 25001, 25002, 25003, 95003


# -- files and folders ----------------------------------------------------------------------------
def test_fits_images_are_whole_records_with_unsigned_16_bit_data() -> None:
    image = np.arange(12, dtype=np.uint16).reshape(3, 4) * 6000
    raw = fits_bytes(image, {"INSTRUME": "IMAT", "EXPTIME": 30.0})
    assert len(raw) % FITS_BLOCK == 0
    header = raw[:FITS_BLOCK].decode("ascii")
    cards = [header[i:i + 80] for i in range(0, len(header), 80)]
    assert cards[0].startswith("SIMPLE  =                    T")
    assert any(c.startswith("BITPIX  =                   16") for c in cards)
    assert any(c.startswith("NAXIS1  =                    4") for c in cards)
    assert any(c.startswith("BZERO   =                32768") for c in cards)
    assert any(c.startswith("INSTRUME= 'IMAT    '") for c in cards)
    data = np.frombuffer(raw[FITS_BLOCK:FITS_BLOCK + image.size * 2], dtype=">i2").astype(np.int32) + 32768
    assert data.reshape(3, 4).tolist() == image.tolist()  # big-endian, x fastest


def test_bcc_iron_edges() -> None:
    d, multiplicity = bcc_reflections()
    assert 2 * d[:3] == pytest.approx([4.0538, 2.8665, 2.3405], abs=1e-4)  # (110), (200), (211)
    assert multiplicity[:3].tolist() == [12, 6, 24]


def test_run_folder_layouts(tmp_path: Path) -> None:
    model = ImagingInstrument()
    white = model.write(tmp_path / "IMAT00000001.nxs", run=1, rb_number=RB, short_name="IMAT", events=0,
                        title=model.title(1), seed=1)
    assert white == tmp_path / "IMAT00000001"
    assert sorted(p.name for p in white.iterdir()) == [
        "Dark_After", "Dark_Before", "Flat_After", "Flat_After_log.txt", "Flat_Before", "Flat_Before_log.txt",
        "Tomo", "Tomo_log.txt"]
    assert len(list((white / "Tomo").glob("IMAT00000001_*_Tomo_*.fits"))) == model.projections
    log = (white / "Tomo_log.txt").read_text().splitlines()
    assert "Monitor 3 before:" in log[2] and len(log) == 2 + model.projections
    tof = model.write(tmp_path / "IMAT00000002", run=2, rb_number=RB, short_name="IMAT", events=0,
                      title=model.title(2), seed=2)
    channels = model.wavelengths().size
    for kind in ("Sample", "Flat_Before"):
        files = sorted(p.name for p in (tof / kind).iterdir())
        assert sum(name.endswith(".fits") for name in files) == channels
        assert {name.rsplit("_", 1)[-1] for name in files if name.endswith(".txt")} == {
            "Spectra.txt", "ShutterCount.txt", "ShutterTimes.txt"}
    spectra = np.loadtxt(next((tof / "Sample").glob("*_Spectra.txt")))
    assert spectra.shape == (channels, 2)
    # rewriting a run replaces its folder whole, leaving nothing else behind
    model.write(tmp_path / "IMAT00000002", run=2, rb_number=RB, short_name="IMAT", events=0, title="again", seed=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["IMAT00000001", "IMAT00000002"]


def test_run_folder_readiness(tmp_path: Path) -> None:
    folder = tmp_path / "IMAT00000009"
    assert is_ready(folder) == (False, "does not exist yet")
    (folder / "Tomo").mkdir(parents=True)
    assert is_ready(folder) == (False, "is an empty folder")
    image = folder / "Tomo" / "IMAT00000009_Tomo_000.fits"
    whole = fits_bytes(np.zeros((8, 8), dtype=np.uint16))
    image.write_bytes(whole[:-100])
    ready, reason = is_ready(folder)
    assert not ready and "incomplete FITS image (Tomo/IMAT00000009_Tomo_000.fits" in reason
    image.write_bytes(whole)
    partial = folder / "Tomo" / ".IMAT00000009_Tomo_001.fits.1a2b.tmp"
    partial.write_bytes(b"SIMPLE")
    ready, reason = is_ready(folder)
    assert not ready and "still being written" in reason
    partial.unlink()
    assert is_ready(folder) == (True, "ready")


# -- end to end through the broker and the runner --------------------------------------------------
@pytest.fixture(scope="module")
def imaging_platform(build_environment: Callable[[str], Settings],
                     tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, dict]]:
    """The runner on a home where the imaging environment is built; a white-beam and a time-of-flight run, a run
    without open beam and a muon file announced for IMAT."""
    home = build_environment("imaging").home
    notebooks = tmp_path_factory.mktemp("notebooks") / "notebooks"
    shutil.copytree(REPO / "notebooks", notebooks, ignore=shutil.ignore_patterns("sample_data", "conftest.py"))
    data = tmp_path_factory.mktemp("imaging-data")
    registry = TemplateRegistry(notebooks)
    config = registry.config("IMAT")
    with running_platform(home, NBREDUCE_NOTEBOOKS=str(notebooks), NBREDUCE_DATA_ROOTS=str(data)) as settings:
        paths = {run: sim.write_run(data, config, run, RB, events=0, title=f"IMAT test run {run}", seed=run)
                 for run in (WHITE, TOF, NO_OPEN_BEAM)}
        for flat in ("Flat_Before", "Flat_After"):
            shutil.rmtree(paths[NO_OPEN_BEAM] / flat)
            (paths[NO_OPEN_BEAM] / f"{flat}_log.txt").unlink()
        paths[MUON_FILE] = sim.write_run(data, registry.config("MUSR"), MUON_FILE, RB, events=100_000,
                                         title="muon", seed=1)
        jobs = {run: submit_request(settings, instrument="IMAT", run_number=run, data=str(path), rb_number=RB)
                for run, path in paths.items()}
        events = wait_for_jobs(settings, set(jobs.values()), 600)
        yield settings, {run: events.get(job) for run, job in jobs.items()}


def finished(event: StatusEvent | None) -> StatusEvent:
    assert event is not None, "job did not finish"
    assert event.state is JobState.SUCCEEDED, f"{event.state}: {event.reason}"
    assert event.environment == "imaging" and event.kernel and event.kernel.startswith("nbreduce-imaging")
    assert "nbreduce_warnings" not in event.scraps, event.scraps["nbreduce_warnings"]
    return event


def test_white_beam_transmission_of_the_step_wedge(imaging_platform) -> None:
    settings, events = imaging_platform
    scraps = finished(events[WHITE]).scraps
    model = sim.instrument_model(TemplateRegistry(settings.notebooks).config("IMAT"))
    assert scraps["mode"] == "white-beam" and scraps["monitor_normalised"]
    assert scraps["images"] == {"sample": model.projections, "open_beam": 2 * model.flats, "dark": 2 * model.darks}
    truth = [float(np.exp(-model.attenuation * d / 10)) for d in model.steps_mm] + [1.0]  # the last ROI is open
    # the template's default regions lie inside the steps of the simulated wedge (and an open strip)
    rois = default_rois(settings)
    for (_, (x0, y0, x1, y1)), roi in zip(model.wedge_steps(), rois[:-1], strict=True):
        assert x0 <= roi[0] < roi[2] <= x1 and y0 <= roi[1] < roi[3] <= y1
    assert rois[-1][2] <= model.wedge_steps()[0][1][0]
    assert scraps["roi_mean_transmission"] == pytest.approx(truth, rel=0.01)
    assert all(std < 0.01 for std in scraps["roi_pixel_std"])
    stem = f"IMAT{WHITE:08d}"
    assert sorted(scraps["output_files"]) == sorted(
        [f"{stem}_transmission.fits", f"{stem}_transmission.h5", f"{stem}_transmission.png", f"{stem}_rois.csv"])


def default_rois(settings: Settings) -> list[list[int]]:
    return ast.literal_eval(TemplateRegistry(settings.notebooks).resolve("IMAT").parameters()["rois"]["default"])


def test_time_of_flight_bragg_edges_of_iron(imaging_platform) -> None:
    settings, events = imaging_platform
    scraps = finished(events[TOF]).scraps
    model = sim.instrument_model(TemplateRegistry(settings.notebooks).config("IMAT"))
    assert scraps["mode"] == "time-of-flight" and scraps["overlap_corrected"]
    assert scraps["channels"] == model.wavelengths().size
    d, _ = bcc_reflections(model.lattice)
    truth = 2 * d[:2]  # (110) at 4.0538 Å, (200) at 2.8665 Å
    assert scraps["edge_wavelengths_angstrom"] == pytest.approx(truth.tolist(), rel=0.005)
    assert scraps["edge_d_spacings_angstrom"] == pytest.approx(d[:2].tolist(), rel=0.005)
    assert all(error < 0.01 for error in scraps["edge_errors_angstrom"])
    stem = f"IMAT{TOF:08d}"
    assert sorted(scraps["output_files"]) == [f"{stem}_spectrum.h5", f"{stem}_spectrum.png", f"{stem}_spectrum.txt"]
    [text] = [p for p in finished(events[TOF]).output_files if p.endswith(".txt")]
    spectrum = np.loadtxt(settings.archive / text)
    above = spectrum[(spectrum[:, 0] > 4.15) & (spectrum[:, 0] < 4.5), 2].mean()
    below = spectrum[(spectrum[:, 0] > 3.6) & (spectrum[:, 0] < 3.95), 2].mean()
    assert above > below + 0.15  # neutrons beyond the (110) edge are no longer Bragg scattered


def test_missing_open_beam_fails_clearly(imaging_platform) -> None:
    _, events = imaging_platform
    event = events[NO_OPEN_BEAM]
    assert event is not None and event.state is JobState.FAILED
    assert "no open-beam (flat) images" in event.reason and "Flat_Before/" in event.reason


def test_muon_file_announced_for_an_imaging_instrument_fails_clearly(imaging_platform) -> None:
    _, events = imaging_platform
    event = events[MUON_FILE]
    assert event is not None and event.state is JobState.FAILED
    assert "is an ISIS muon histogram NeXus file, not a folder of FITS images" in event.reason
    assert "KeyError" not in event.reason
