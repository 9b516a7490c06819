"""The run simulator: ISIS archive layout, NeXus content, physics of the events, publishing to the real broker."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import h5py
import numpy as np
import pytest
import scipp as sc
import scippnexus as snx
from scippneutron.conversion.graph import beamline, tof

from runner import sim
from runner.bus.clients import read_topic
from runner.bus.models import RunCompletion
from runner.bus.topics import RUN_COMPLETIONS
from runner.config import Settings
from runner.isis.layout import LastRunError, current_cycle, lastrun_file, read_lastrun
from runner.sim import nexus
from runner.templates.registry import InstrumentConfig, TemplateError

MARI = InstrumentConfig(name="MARI", technique="direct geometry spectroscopy", file_prefix="MAR", run_digits=5)
WISH = InstrumentConfig(name="WISH", technique="powder diffraction", file_prefix="WISH", run_digits=8)


@pytest.fixture
def notebooks(tmp_path: Path) -> Path:
    """A notebooks folder of its own, so the tests never depend on (or touch) the real templates."""
    root = tmp_path / "notebooks"
    for config in (MARI, WISH):
        folder = root / config.name
        folder.mkdir(parents=True)
        (folder / "instrument.toml").write_text(f'technique = "{config.technique}"\n'
                                                f'file_prefix = "{config.file_prefix}"\n'
                                                f"run_digits = {config.run_digits}\n")
        (folder / "reduce.ipynb").write_text("{}")
    return root


def _events(group: h5py.Group) -> dict[str, np.ndarray]:
    return {name: group[name][()] for name in ("event_id", "event_time_offset", "event_time_zero", "event_index")}


def test_write_run_uses_isis_layout_and_lastrun(tmp_path: Path):
    path = sim.write_run(tmp_path, MARI, 25581, "2612345", events=2000, title="CeAuAl3 5K", cycle="25_3", seed=1)

    assert path == tmp_path / "NDXMARI/Instrument/data/cycle_25_3/MAR25581.nxs"
    lastrun = tmp_path / "NDXMARI/Instrument/logs/lastrun.txt"
    assert lastrun.read_text() == "MAR 25581 0\n"
    fields = lastrun.read_text().split()
    assert len(fields) == 3 and int(fields[1]) == 25581
    assert read_lastrun(lastrun) == 25581
    # atomic writes leave no temporary files behind
    assert sorted(p.name for p in path.parent.iterdir()) == ["MAR25581.nxs"]
    assert sorted(p.name for p in lastrun.parent.iterdir()) == ["lastrun.txt"]

    default = sim.write_run(tmp_path, WISH, 38237, "2612345", events=1000, title="Si", seed=1)
    assert default.parent.name == current_cycle()
    assert default.name == "WISH00038237.nxs"
    assert (tmp_path / "NDXWISH/Instrument/logs/lastrun.txt").read_text() == "WISH 00038237 0\n"


def test_current_cycle_and_lastrun_parsing(tmp_path: Path):
    assert current_cycle(datetime(2026, 11, 25)) == "cycle_26_4"
    assert current_cycle(datetime(2025, 1, 3)) == "cycle_25_1"
    lastrun = tmp_path / "lastrun.txt"
    with pytest.raises(LastRunError):
        read_lastrun(lastrun, retries=0)
    lastrun.write_text("WISH 00038237 0")
    assert read_lastrun(lastrun) == 38237
    lastrun.write_text("WISH 0003")  # caught while being rewritten
    with pytest.raises(LastRunError):
        read_lastrun(lastrun, retries=0)


def test_nexus_file_content(tmp_path: Path):
    path = sim.write_run(tmp_path, MARI, 25581, "2612345", events=20_000, title="CeAuAl3 5K, run 25581", seed=3)
    model = sim.instrument_model(MARI)
    with h5py.File(path) as f:
        entry = f["raw_data_1"]
        assert entry.attrs["NX_class"] == "NXentry"
        assert entry["run_number"][()] == 25581
        assert entry["experiment_identifier"][()].decode() == "2612345"
        assert entry["title"][()].decode() == "CeAuAl3 5K, run 25581"
        start = datetime.fromisoformat(entry["start_time"][()].decode())
        end = datetime.fromisoformat(entry["end_time"][()].decode())
        assert entry["duration"].attrs["units"] == "second"
        assert (end - start).total_seconds() == pytest.approx(entry["duration"][()], abs=1)
        assert entry["proton_charge"][()] > 0

        instrument = entry["instrument"]
        assert instrument.attrs["NX_class"] == "NXinstrument"
        assert instrument["name"][()].decode() == "MARI"
        assert instrument["source"].attrs["NX_class"] == "NXsource"
        assert instrument["fermi"].attrs["NX_class"] == "NXfermi_chopper"
        assert instrument["fermi/energy"][()] == model.incident_energy
        assert instrument["fermi/energy"].attrs["units"] == "meV"
        assert entry["sample"].attrs["NX_class"] == "NXsample"
        assert entry["sample/name"][()].decode() == model.sample

        detector = instrument["detector_1"]
        assert detector.attrs["NX_class"] == "NXdetector"
        assert detector["x_pixel_offset"].attrs["units"] == "m"
        data = detector["events"]
        assert data.attrs["NX_class"] == "NXevent_data"
        assert data["event_time_offset"].attrs["units"] == "us"
        assert data["event_time_zero"].attrs["units"] == "ns"
        events = _events(data)
        assert events["event_id"].size == 20_000
        assert np.isin(events["event_id"], detector["detector_number"][()]).all()
        low, high = model.tof_window
        assert ((events["event_time_offset"] >= low) & (events["event_time_offset"] <= high)).all()
        index = events["event_index"]
        assert index[0] == 0 and (np.diff(index) >= 0).all() and index[-1] <= 20_000
        pulse_times = events["event_time_zero"]
        assert (np.diff(pulse_times) == int(1e9 / model.source_frequency)).all()
        assert abs(pulse_times[0] / 1e9 - start.timestamp()) < 1

        for name in ("monitor_1", "monitor_2"):
            monitor = entry[name]
            assert monitor.attrs["NX_class"] == "NXmonitor"
            assert monitor["data"].shape[0] + 1 == monitor["time_of_flight"].shape[0]
            assert monitor["data"][()].sum() > 0


def test_positions_load_with_scippnexus(tmp_path: Path):
    path = sim.write_run(tmp_path, MARI, 1, "2612345", events=1000, title="t", seed=1)
    with snx.File(path) as f:
        entry = snx.compute_positions(f["raw_data_1"][()])
    model = sim.instrument_model(MARI)
    events = entry["instrument"]["detector_1"]["events"]
    assert events.sizes == {"detector_number": 132 * 8}
    assert entry["instrument"]["source"]["position"] == sc.vector([0, 0, -model.l1], unit="m")
    assert entry["sample"]["position"] == sc.vector([0, 0, 0], unit="m")
    l2 = sc.norm(events.coords["position"])
    assert np.allclose(sc.min(l2).value, model.l2, rtol=1e-3)
    two_theta = np.degrees(np.arccos(events.coords["position"].fields.z.values / l2.values))
    assert two_theta.min() == pytest.approx(3.0, abs=0.1) and two_theta.max() == pytest.approx(134.0, abs=0.1)
    assert events.bins.size().sum().value == 1000
    monitor = entry["monitor_2"]
    assert monitor["position"].fields.z.value == pytest.approx(5.261)


def test_powder_events_are_bragg_peaks_of_silicon(tmp_path: Path):
    """Converted with scippneutron, the strongest bank-5 peaks sit at silicon's d-spacings."""
    path = sim.write_run(tmp_path, WISH, 1, "2612345", events=60_000, title="Si", seed=5)
    with snx.File(path) as f:
        entry = snx.compute_positions(f["raw_data_1"][()])
    events = entry["instrument"]["bank_5"]["events"]
    events = events.bins.assign_coords(tof=events.bins.coords["event_time_offset"].to(dtype="float64"))
    events = events.assign_coords(source_position=entry["instrument"]["source"]["position"],
                                  sample_position=entry["sample"]["position"])
    d = events.transform_coords("dspacing", graph={**beamline.beamline(scatter=True), **tof.elastic("tof")})
    values = d.bins.concat().value.coords["dspacing"].values
    values = values[(values > 1.0) & (values < 3.5)]
    expected, _ = sim.diamond_reflections(sim.SILICON_A, d_min=1.0)
    distance = np.abs(values[:, None] / expected[None, :] - 1).min(axis=1)
    # most events sit within 0.5 % of a reflection (bank 5 resolves ~0.1 %); the rest is flat background
    assert (distance < 0.005).mean() > 0.6
    pattern = d.bins.concat().hist(dspacing=sc.linspace("dspacing", 1.0, 3.5, 1251, unit="angstrom"))
    centres = sc.midpoints(pattern.coords["dspacing"]).values
    strongest = centres[np.argsort(pattern.values)[-20:]]
    assert np.abs(strongest[:, None] - expected[None, :]).min(axis=1).max() < 0.005
    for d_hkl in (3.1356, 1.9202, 1.6375):
        assert np.abs(strongest - d_hkl).min() < 0.003


def test_reflections_of_silicon():
    d, intensity = sim.diamond_reflections(sim.SILICON_A, d_min=1.0)
    assert np.allclose(d[:6], [3.1356, 1.9202, 1.6375, 1.3578, 1.2460, 1.1086], atol=1e-4)
    assert intensity.argmax() == 0  # (111) is the strongest line of silicon


def test_same_seed_same_events_and_chunking(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    first = sim.write_run(tmp_path / "a", WISH, 7, "2612345", events=30_000, title="Si", seed=11)
    monkeypatch.setattr(nexus, "CHUNK_EVENTS", 997)  # many chunks, none aligned with a bank boundary
    second = sim.write_run(tmp_path / "b", WISH, 7, "2612345", events=30_000, title="Si", seed=11)
    third = sim.write_run(tmp_path / "c", WISH, 7, "2612345", events=30_000, title="Si", seed=12)
    with h5py.File(first) as a, h5py.File(second) as b, h5py.File(third) as c:
        banks = [name for name in a["raw_data_1/instrument"] if name.startswith("bank_")]
        assert len(banks) == 5
        total = 0
        for name in banks:
            one = _events(a[f"raw_data_1/instrument/{name}/events"])
            two = _events(b[f"raw_data_1/instrument/{name}/events"])
            assert np.array_equal(one["event_index"], two["event_index"])
            assert one["event_id"].size == two["event_id"].size
            total += two["event_id"].size
            # chunked generation draws differently, but the same pixels and frame are covered
            assert set(np.unique(two["event_id"])) <= set(a[f"raw_data_1/instrument/{name}/detector_number"][()])
        assert total == 30_000
        assert not np.array_equal(a["raw_data_1/instrument/bank_1/events/event_id"][()],
                                  c["raw_data_1/instrument/bank_1/events/event_id"][()])
    again = sim.write_run(tmp_path / "d", WISH, 7, "2612345", events=30_000, title="Si", seed=12)
    with h5py.File(third) as c, h5py.File(again) as d:
        for key in ("event_id", "event_time_offset"):
            assert np.array_equal(c[f"raw_data_1/instrument/bank_3/events/{key}"][()],
                                  d[f"raw_data_1/instrument/bank_3/events/{key}"][()])


def test_model_by_technique_for_other_instruments():
    assert isinstance(sim.instrument_model(InstrumentConfig(name="MERLIN", technique="Direct geometry spectroscopy")),
                      sim.ChopperSpectrometer)
    assert isinstance(sim.instrument_model(InstrumentConfig(name="GEM", technique="powder diffraction")),
                      sim.PowderDiffractometer)


def test_simulate_without_publishing_starts_at_a_realistic_run(settings: Settings, notebooks: Path):
    settings = settings.model_copy(update={"notebooks": notebooks})
    messages = sim.simulate(settings, "MARI", runs=2, events=1000, rb_number="1910001", publish=False)
    assert [m.run_number for m in messages] == [25581, 25582]
    assert all(Path(m.data).is_file() for m in messages)
    assert read_lastrun(lastrun_file(settings.data_roots, "MARI")) == 25582
    with pytest.raises(TemplateError):
        sim.simulate(settings, "NOPE", runs=1, publish=False)
    with pytest.raises(ValueError):
        sim.simulate(settings, "MARI", runs=0, publish=False)


@pytest.mark.broker
def test_simulate_publishes_run_completions(broker: Settings, notebooks: Path):
    settings = broker.model_copy(update={"notebooks": notebooks})
    lastrun = lastrun_file(settings.data_roots, "WISH")
    lastrun.parent.mkdir(parents=True)
    lastrun.write_text("WISH 00038240 0\n")

    messages = sim.simulate(settings, "WISH", runs=3, events=2000)

    assert [m.run_number for m in messages] == [38241, 38242, 38243]
    assert lastrun.read_text() == "WISH 00038243 0\n"
    received = [(msg.key(), RunCompletion.from_bytes(msg.value())) for msg in read_topic(settings, RUN_COMPLETIONS)]
    # keyed by message id: one instrument's runs spread over the runners of a group
    assert all(key == m.message_id.encode() for key, m in received)
    by_run = {m.run_number: m for _, m in received}
    assert sorted(by_run) == [38241, 38242, 38243]
    rbs = {m.rb_number for m in by_run.values()}
    assert len(rbs) == 1 and len(rbs.pop()) == 7
    assert len({m.message_id for m in by_run.values()}) == 3
    for run, message in by_run.items():
        assert message.instrument == "WISH" and message.facility == "ISIS" and message.started_by == 0
        assert message.data == str(settings.data_roots[0] / f"NDXWISH/Instrument/data/{current_cycle()}"
                                                            f"/WISH{run:08d}.nxs")
        assert str(run) in message.run_title
        with h5py.File(message.data) as f:
            assert f["raw_data_1/run_number"][()] == run
            assert f["raw_data_1/experiment_identifier"][()].decode() == message.rb_number
            assert f["raw_data_1/title"][()].decode() == message.run_title
