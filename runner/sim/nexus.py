"""ISIS event NeXus files as the data acquisition writes them (``raw_data_1``, banks of NXevent_data, monitors).

Scalars are written the way ISIS files hold them; files are written under a temporary name and renamed,
so a watcher never sees half a file. Events are generated and written in chunks: 10^7 events take a
few seconds and ~100 MB of working memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from runner.atomic import atomic_path
from runner.sim.physics import InstrumentModel

#: Events generated (and held in memory) at a time; bounds memory for any run size.
CHUNK_EVENTS = 500_000


def nx_group(parent: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    return group


def nx_field(parent: h5py.Group, name: str, value: Any, units: str | None = None, **attrs: Any) -> h5py.Dataset:
    dataset = parent.create_dataset(name, data=value)
    if units is not None:
        dataset.attrs["units"] = units
    for key, attr in attrs.items():
        dataset.attrs[key] = attr
    return dataset


def transformation(group: h5py.Group, name: str, kind: str, value: float, units: str,
                    vector: tuple[float, float, float], depends_on: str) -> str:
    nx_field(group, name, value, units, transformation_type=kind, vector=np.array(vector, dtype=float),
           depends_on=depends_on)
    return f"{group.name}/{name}"


def place(group: h5py.Group, distance: float, rotation: float = 0.0) -> None:
    """NXtransformations chain: translate ``distance`` along the beam, then rotate about the vertical."""
    transformations = nx_group(group, "transformations", "NXtransformations")
    base = "."
    if rotation:
        base = transformation(transformations, "rotation", "rotation", rotation, "deg", (0, 1, 0), ".")
    nx_field(group, "depends_on", transformation(transformations, "translation", "translation", distance, "m",
                                                (0, 0, 1), base))


def iso_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def write_nexus(path: Path, model: InstrumentModel, name: str, short_name: str, run: int, rb_number: str, *,
                events: int, title: str, seed: int | None = None) -> Path:
    """Write one ISIS-style NeXus event file at ``path`` (atomically: temp name in the same folder, then rename)."""
    rng = np.random.default_rng(seed)
    # one independent stream per bank: pulse structure and events do not depend on the chunk size
    bank_rngs = rng.spawn(len(model.banks))
    end = datetime.now(UTC)  # the run has just ended
    duration = float(np.clip(events / model.event_rate, 10.0, 86400.0))
    start = end - timedelta(seconds=duration)
    pulses = max(int(duration * model.source_frequency), 1)
    proton_charge = model.proton_current * duration / 3600  # µA·h
    banks = model.banks
    per_bank = rng.multinomial(events, model.bank_fractions())

    with atomic_path(path) as tmp, h5py.File(tmp, "w") as f:
        f.attrs["file_name"] = path.name
        f.attrs["file_time"] = iso_time(end)
        f.attrs["creator"] = "nbreduce simulate"
        entry = nx_group(f, "raw_data_1", "NXentry")
        f.attrs["default"] = "raw_data_1"
        nx_field(entry, "definition", "TOFRAW")
        nx_field(entry, "name", name)
        nx_field(entry, "beamline", name)
        nx_field(entry, "run_number", np.int32(run))
        nx_field(entry, "experiment_identifier", rb_number)
        nx_field(entry, "title", title)
        nx_field(entry, "start_time", iso_time(start))
        nx_field(entry, "end_time", iso_time(end))
        nx_field(entry, "duration", np.float32(duration), "second")
        nx_field(entry, "proton_charge", np.float32(proton_charge), "uAh")
        nx_field(entry, "good_frames", np.int32(pulses))
        nx_field(entry, "total_counts", np.int64(events), "counts")
        nx_field(entry, "program_name", "nbreduce.simulate")

        instrument = nx_group(entry, "instrument", "NXinstrument")
        nx_field(instrument, "name", name, short_name=short_name)
        source = nx_group(instrument, "source", "NXsource")
        nx_field(source, "name", "ISIS")
        nx_field(source, "type", "Spallation Neutron Source")
        nx_field(source, "probe", "neutron")
        nx_field(source, "frequency", model.source_frequency, "Hz")
        place(source, -model.l1)

        sample = nx_group(entry, "sample", "NXsample")
        nx_field(sample, "name", model.sample)
        nx_field(sample, "depends_on", ".")

        pulse_times = (np.int64(start.timestamp() * 1e9)
                       + (np.arange(pulses) * (1e9 / model.source_frequency)).astype(np.int64))
        for index, (bank, n_bank) in enumerate(zip(banks, per_bank, strict=True)):
            detector = nx_group(instrument, bank.name, "NXdetector")
            nx_field(detector, "detector_number", bank.detector_number)
            for axis, name in enumerate(("x_pixel_offset", "y_pixel_offset", "z_pixel_offset")):
                nx_field(detector, name, bank.offsets[:, axis], "m")
            place(detector, bank.distance, bank.rotation)
            data = nx_group(detector, "events", "NXevent_data")
            bank_rng = bank_rngs[index]
            counts = bank_rng.multinomial(n_bank, np.full(pulses, 1 / pulses))
            nx_field(data, "event_index", np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))
            nx_field(data, "event_time_zero", pulse_times, "ns", offset="1970-01-01T00:00:00Z")
            ids = data.create_dataset("event_id", shape=(n_bank,), dtype=np.int32)
            tofs = data.create_dataset("event_time_offset", shape=(n_bank,), dtype=np.float32)
            tofs.attrs["units"] = "us"
            for lo, hi in chunks(int(n_bank), CHUNK_EVENTS):
                ids[lo:hi], tofs[lo:hi] = model.events(bank_rng, index, hi - lo)

        for monitor in model.monitors(rng, events):  # ISIS keeps monitors at entry level
            monitor_group = nx_group(entry, monitor.name, "NXmonitor")
            monitor_group.attrs["signal"] = "data"
            monitor_group.attrs["axes"] = ["time_of_flight"]
            nx_field(monitor_group, "data", monitor.counts, "counts")
            nx_field(monitor_group, "time_of_flight", monitor.tof_edges, "us")
            place(monitor_group, monitor.distance - model.l1)

        model.write_extras(entry, instrument)
    return path


class EventNexusRuns:
    """Mixin of event-mode instrument models: each run is an ISIS event NeXus file."""

    def write(self: InstrumentModel, path: Path, *, run: int, rb_number: str, short_name: str, events: int,
              title: str, seed: int | None = None) -> Path:
        return write_nexus(path, self, self.name, short_name, run, rb_number, events=events, title=title, seed=seed)
