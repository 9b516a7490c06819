"""The muon family (MUSR, EMU, HIFI, ARGUS, CHRONUS): simulated ISIS muon NeXus runs reduced end to end.

Runs are written by the simulator (known field, Kubo–Toyabe width, asymmetry and balance α) in both muon
NeXus versions, announced to the real broker, and reduced by the runner in the ``muon`` environment's kernel;
the physics is checked through the scraps the shared template glues.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import h5py
import numpy as np
import pytest
from pipeline_support import running_platform

from runner import sim
from runner.bus.models import JobState, StatusEvent
from runner.config import Settings
from runner.pipeline.submit import submit_request, wait_for_jobs
from runner.sim.muon import GAMMA_MU_MHZ_PER_G, MuonSpectrometer, kubo_toyabe
from runner.templates.registry import InstrumentConfig, TemplateRegistry

REPO = Path(__file__).resolve().parent.parent
EVENTS = 2_000_000
RB = "2610011"
#: (instrument, run, muon NeXus version): odd runs are transverse field, even runs zero field.
RUNS = (("MUSR", 95001, 2), ("MUSR", 95002, 1), ("EMU", 110002, 2), ("HIFI", 160001, 1), ("ARGUS", 78001, 2),
        ("CHRONUS", 12002, 2))
DETECTORS = {"MUSR": 64, "EMU": 96, "HIFI": 64, "ARGUS": 192, "CHRONUS": 606}

pytestmark = pytest.mark.slow


def config_for(registry: TemplateRegistry, instrument: str, version: int) -> InstrumentConfig:
    config = registry.config(instrument)
    return config.model_copy(update={"simulation": {**config.simulation, "nexus_version": version}})


# -- the simulated files ------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_simulated_file_follows_the_muon_nexus_definition(tmp_path: Path, version: int) -> None:
    model = MuonSpectrometer(name="EMU", detectors=96, nexus_version=version)
    path = model.write(tmp_path / "EMU00000001.nxs", run=1, rb_number=RB, short_name="EMU", events=500_000,
                       title=model.title(1), seed=1)
    with h5py.File(path) as f:
        if version == 2:
            entry = f["raw_data_1"]
            assert entry["IDF_version"][()].tolist() == [2]
            assert entry["definition"][()].tolist() == [b"pulsedTD"]
            detector = entry["instrument/detector_1"]
            counts = detector["counts"]
            assert counts.shape == (1, 96, model.bins)
            assert detector["resolution"][()].tolist() == [16000]
            assert detector["resolution"].attrs["units"] == b"picoseconds"
            assert detector["dead_time"].shape == (96,) and detector["grouping"][()].tolist() == [1] * 48 + [2] * 48
            assert entry["detector_1/counts"].id == counts.id  # the NXdata view links the same data
            assert entry["sample/magnetic_field_state"][()].tolist() == [b"TF"]
            assert entry["experiment_identifier"][()].tolist() == [RB.encode()]
            time_zero = float(detector["time_zero"][0])
        else:
            entry = f["run"]
            assert entry["IDF_version"][()].tolist() == [1]
            counts = entry["histogram_data_1/counts"]
            assert counts.shape == (96, model.bins)
            assert entry["instrument/detector/deadtimes"].shape == (96,)
            assert entry["histogram_data_1/grouping"][()].tolist() == [1] * 48 + [2] * 48
            assert entry["instrument/beam/frames_good"][()].tolist() == [model.truth(1, 500_000).good_frames]
            time_zero = float(entry["histogram_data_1/time_zero"][0])
        assert time_zero == pytest.approx(model.time_zero_us)
        first_good = int(counts.attrs["first_good_bin"])
        assert first_good * model.bin_width >= model.first_good_us > time_zero
        data = counts[()].reshape(96, model.bins)
        assert abs(data.sum() - 500_000) < 5 * np.sqrt(500_000) + 0.01 * 500_000  # dead time loses a little
        t0_bin = int(counts.attrs["t0_bin"])
        assert data[:, t0_bin + 2].sum() > 20 * data[:, : t0_bin - 1].mean(axis=1).sum()  # the muon pulse arrives


def test_kubo_toyabe_shape() -> None:
    assert kubo_toyabe(np.array([0.0]), 0.4)[0] == pytest.approx(1.0)
    assert kubo_toyabe(np.array([np.sqrt(3) / 0.4]), 0.4)[0] == pytest.approx(1 / 3 - 2 / 3 * 2 * np.exp(-1.5))
    assert kubo_toyabe(np.array([100.0]), 0.4)[0] == pytest.approx(1 / 3)


# -- end to end through the broker and the runner ------------------------------------------------
@pytest.fixture(scope="module")
def muon_platform(build_environment: Callable[[str], Settings],
                  tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Settings, dict]]:
    """The runner on a home where the muon environment is built; one job per run of RUNS, plus a neutron file."""
    home = build_environment("muon").home
    notebooks = tmp_path_factory.mktemp("notebooks") / "notebooks"
    shutil.copytree(REPO / "notebooks", notebooks, ignore=shutil.ignore_patterns("sample_data", "conftest.py"))
    data = tmp_path_factory.mktemp("muon-data")
    registry = TemplateRegistry(notebooks)
    with running_platform(home, NBREDUCE_NOTEBOOKS=str(notebooks), NBREDUCE_DATA_ROOTS=str(data)) as settings:
        jobs = {}
        for instrument, run, version in RUNS:
            config = config_for(registry, instrument, version)
            path = sim.write_run(data, config, run, RB, events=EVENTS, title=f"{instrument} test run {run}", seed=run)
            jobs[(instrument, run)] = submit_request(settings, instrument=instrument, run_number=run, data=str(path),
                                                     rb_number=RB)
        neutron = sim.write_run(data, registry.config("WISH"), 38301, RB, events=2000, title="Si", seed=1)
        jobs[("MUSR", 38301)] = submit_request(settings, instrument="MUSR", run_number=38301, data=str(neutron),
                                               rb_number=RB)
        events = wait_for_jobs(settings, set(jobs.values()), 600)
        yield settings, {key: events.get(job) for key, job in jobs.items()}


def finished(event: StatusEvent | None) -> StatusEvent:
    assert event is not None, "job did not finish"
    assert event.state is JobState.SUCCEEDED, f"{event.state}: {event.reason}"
    assert event.environment == "muon" and event.kernel and event.kernel.startswith("nbreduce-muon")
    assert "nbreduce_warnings" not in event.scraps, event.scraps["nbreduce_warnings"]
    return event


@pytest.mark.parametrize(("instrument", "run", "version"), RUNS)
def test_muon_run_is_reduced_in_the_muon_environment(muon_platform, instrument: str, run: int, version: int) -> None:
    settings, events = muon_platform
    event = finished(events[(instrument, run)])
    scraps = event.scraps
    model = sim.instrument_model(TemplateRegistry(settings.notebooks).config(instrument))
    truth = model.truth(run, EVENTS)
    assert scraps["nexus_version"] == version
    assert scraps["detectors"] == DETECTORS[instrument]
    assert scraps["forward_detectors"] == scraps["backward_detectors"] == DETECTORS[instrument] // 2
    assert scraps["good_frames"] == truth.good_frames
    assert scraps["dead_time_corrected"] and scraps["dead_time_max_correction_percent"] > 0.5
    assert scraps["asymmetry"] == pytest.approx(truth.asymmetry, rel=0.05)
    assert scraps["alpha"] == pytest.approx(truth.alpha, rel=0.02)
    if truth.experiment == "tf":
        assert scraps["model"] == "precession" and scraps["field_state"] == "TF"
        assert scraps["frequency_MHz"] == pytest.approx(truth.frequency_mhz, rel=0.005)
        assert scraps["field_gauss"] == pytest.approx(truth.field_gauss, rel=0.005)
        assert scraps["frequency_MHz"] == pytest.approx(GAMMA_MU_MHZ_PER_G * scraps["field_gauss"])
        assert scraps["relaxation_rate_per_us"] == pytest.approx(truth.relaxation, rel=0.1)
    else:
        assert scraps["model"] == "kubo-toyabe" and scraps["field_state"] == "ZF"
        assert scraps["kt_delta_per_us"] == pytest.approx(truth.delta, rel=0.05)
    assert scraps["chi2_reduced"] < 1.5
    stem = f"{instrument}{run:08d}"
    assert sorted(scraps["output_files"]) == sorted(f"{stem}_asymmetry.{ext}" for ext in ("h5", "png", "txt"))
    assert sorted(Path(p).name for p in event.output_files) == sorted(scraps["output_files"])
    [text] = [p for p in event.output_files if p.endswith(".txt")]
    table = np.loadtxt(settings.archive / text)
    assert table.shape[1] == 3 and table[0, 0] == pytest.approx(scraps["fit_range_us"][0], abs=0.1)


def test_neutron_event_file_announced_for_a_muon_instrument_fails_clearly(muon_platform) -> None:
    _, events = muon_platform
    event = events[("MUSR", 38301)]
    assert event is not None and event.state is JobState.FAILED
    assert "not a muon histogram file" in event.reason and "neutron event NeXus file" in event.reason
    assert "KeyError" not in event.reason
