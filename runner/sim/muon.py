"""Pulsed-source muon spectrometers (MUSR, EMU, HIFI, ARGUS, CHRONUS): histogram NeXus files of known physics.

Each detector sees decay positrons N_i(t) = N0_i e^{-t/τμ} [1 + A_g P(t)] + B_i after the muon pulse at time
zero (before it, only the background B_i), with A_g = +A in the forward group and -A in the backward group.
The muon polarisation P(t) is either a transverse-field precession at a known field (frequency γμB/2π,
Gaussian or exponential damping) or the zero-field static Gaussian Kubo–Toyabe function of known width Δ.
Counts are counted with a non-paralysable dead time per detector (recorded in the file, as the instrument's
calibration) and drawn from Poisson statistics.

Files follow the ISIS muon NeXus definitions as the data acquisition writes them (scalars as 1-element
arrays, strings as bytes): version 2 (``raw_data_1``, IDF_version 2, definition ``pulsedTD``; see Mantid's
LoadMuonNexusV2 and ISIS MuonDataLib) or the older version 1 (``run/histogram_data_1``; Mantid's
LoadMuonNexus v1).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from runner.atomic import atomic_path

#: Muon lifetime (µs).
MUON_LIFETIME = 2.1969811
#: Muon gyromagnetic ratio γμ/2π (MHz per tesla).
GAMMA_MU_MHZ_PER_T = 135.538817
#: γμ/2π in MHz per gauss.
GAMMA_MU_MHZ_PER_G = GAMMA_MU_MHZ_PER_T * 1e-4

EXPERIMENTS = ("tf", "zf", "alternate")


def kubo_toyabe(t: np.ndarray, delta: float) -> np.ndarray:
    """Static Gaussian Kubo–Toyabe relaxation: 1/3 + 2/3 (1 - Δ²t²) exp(-Δ²t²/2)."""
    x = (delta * np.asarray(t)) ** 2
    return 1 / 3 + 2 / 3 * (1 - x) * np.exp(-x / 2)


def precession(t: np.ndarray, frequency: float, rate: float, damping: str, phase: float = 0.0) -> np.ndarray:
    """Transverse-field precession cos(2πft + φ) with a Gaussian exp(-σ²t²/2) or exponential exp(-λt) envelope."""
    t = np.asarray(t)
    envelope = np.exp(-0.5 * (rate * t) ** 2) if damping == "gaussian" else np.exp(-rate * t)
    return envelope * np.cos(2 * np.pi * frequency * t + phase)


def _text(value: str) -> np.ndarray:
    """A string as ISIS files hold it: a 1-element array of fixed-length bytes."""
    data = value.encode()
    return np.array([data], dtype=f"S{max(len(data), 1)}")


def _field(group: h5py.Group, name: str, value: Any, units: str | None = None, dtype: Any = None,
           **attrs: Any) -> h5py.Dataset:
    """A dataset the way the ISIS DAE writes it: scalars as 1-element arrays, strings as bytes."""
    if isinstance(value, str):
        data = _text(value)
    else:
        data = np.asarray(value, dtype=dtype)
        if data.ndim == 0:
            data = data.reshape(1)
    dataset = group.create_dataset(name, data=data)
    if units is not None:
        dataset.attrs["units"] = np.bytes_(units)
    for key, attr in attrs.items():
        dataset.attrs[key] = np.bytes_(attr) if isinstance(attr, str) else attr
    return dataset


def _group(parent: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = np.bytes_(nx_class)
    return group


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S")


@dataclass(frozen=True)
class MuonRunTruth:
    """What a simulated run was drawn from: the numbers a reduction must recover."""

    experiment: str  # "tf" or "zf"
    field_gauss: float
    frequency_mhz: float
    relaxation: float  # TF damping rate σ or λ (µs⁻¹)
    damping: str
    delta: float  # ZF Kubo–Toyabe width Δ (µs⁻¹)
    asymmetry: float
    alpha: float  # forward/backward balance: Σ N0 (forward) / Σ N0 (backward)
    good_frames: int


@dataclass(frozen=True)
class MuonSpectrometer:
    """An ISIS pulsed muon spectrometer: forward and backward detector rings around the sample.

    ``detectors`` is the instrument's constant (MUSR 64, EMU 96, HIFI 64, ARGUS 192, CHRONUS 606); the first
    half of the detectors forms the forward group, the second half the backward group (``grouping`` 1 and 2).
    """

    name: str = "MUSR"
    detectors: int = 64
    first_run: int = 1
    #: Time bins of each histogram and their width (the file's ``resolution``, picoseconds).
    bins: int = 2048
    resolution_ps: int = 16000
    #: Arrival of the muon pulse and first bin clear of it (µs of raw time).
    time_zero_us: float = 0.16
    first_good_us: float = 0.35
    #: "tf" (transverse-field precession), "zf" (zero-field Kubo–Toyabe) or "alternate" (odd runs TF, even ZF).
    experiment: str = "alternate"
    #: Muon NeXus version written: 2 (raw_data_1, as the DAE writes now) or 1 (the older run/histogram_data_1).
    nexus_version: int = 2
    tf_field_gauss: float = 100.0
    tf_relaxation: float = 0.25
    tf_damping: str = "gaussian"
    tf_sample: str = "Ag"
    tf_temperature: float = 20.0
    zf_delta: float = 0.35
    zf_sample: str = "Cu"
    zf_temperature: float = 50.0
    asymmetry: float = 0.22
    #: Efficiency of the backward detectors relative to the forward ones (sets α).
    backward_efficiency: float = 0.88
    #: Spread of the detectors' efficiencies and dead times (relative), and the mean dead time (ns).
    efficiency_spread: float = 0.05
    dead_time_ns: float = 10.0
    dead_time_spread: float = 0.2
    #: Flat background per bin, relative to a detector's count rate at time zero.
    background: float = 0.001
    #: Positrons detected per good frame (sets the dead-time losses and the number of good frames).
    counts_per_frame: float = 300.0
    frequency: float = 40.0  # Hz, muon pulses reaching the instrument

    def __post_init__(self) -> None:
        if self.experiment not in EXPERIMENTS:
            raise ValueError(f"{self.name}: experiment must be one of {EXPERIMENTS}, not {self.experiment!r}")
        if self.nexus_version not in (1, 2):
            raise ValueError(f"{self.name}: nexus_version must be 1 or 2, not {self.nexus_version!r}")
        if self.detectors < 2 or self.detectors % 2:
            raise ValueError(f"{self.name}: needs an even number of detectors (forward and backward halves)")

    # -- the instrument ------------------------------------------------------------------------
    @property
    def bin_width(self) -> float:
        """Bin width (µs)."""
        return self.resolution_ps * 1e-6

    @property
    def raw_time(self) -> np.ndarray:
        """Left edges of the time bins (µs of raw time), as ``raw_time`` holds them."""
        return np.arange(self.bins) * self.bin_width

    def _calibration_rng(self) -> np.random.Generator:
        # the detectors' efficiencies and dead times belong to the instrument, not to the run
        return np.random.default_rng(int.from_bytes(hashlib.sha256(self.name.encode()).digest()[:8], "little"))

    @property
    def grouping(self) -> np.ndarray:
        half = self.detectors // 2
        return np.repeat(np.array([1, 2], dtype=np.int32), half)

    def calibration(self) -> tuple[np.ndarray, np.ndarray]:
        """Relative efficiency and dead time (µs) of each detector."""
        rng = self._calibration_rng()
        efficiency = 1 + self.efficiency_spread * rng.standard_normal(self.detectors)
        efficiency[self.grouping == 2] *= self.backward_efficiency
        dead_time = self.dead_time_ns * 1e-3 * (1 + self.dead_time_spread * rng.standard_normal(self.detectors))
        return np.clip(efficiency, 0.5, None), np.clip(dead_time, 0.0, None)

    # -- runs ----------------------------------------------------------------------------------
    def experiment_of(self, run: int) -> str:
        if self.experiment == "alternate":
            return "tf" if run % 2 else "zf"
        return self.experiment

    def title(self, run: int) -> str:
        if self.experiment_of(run) == "tf":
            return f"{self.tf_sample} TF{self.tf_field_gauss:g} G, {self.tf_temperature:g} K, run {run}"
        return f"{self.zf_sample} ZF, {self.zf_temperature:g} K (nuclear dipolar fields), run {run}"

    def truth(self, run: int, events: int) -> MuonRunTruth:
        efficiency, _ = self.calibration()
        forward = self.grouping == 1
        tf = self.experiment_of(run) == "tf"
        return MuonRunTruth(
            experiment="tf" if tf else "zf", field_gauss=self.tf_field_gauss if tf else 0.0,
            frequency_mhz=GAMMA_MU_MHZ_PER_G * self.tf_field_gauss if tf else 0.0,
            relaxation=self.tf_relaxation if tf else 0.0, damping=self.tf_damping, delta=0.0 if tf else self.zf_delta,
            asymmetry=self.asymmetry, alpha=float(efficiency[forward].sum() / efficiency[~forward].sum()),
            good_frames=max(round(events / self.counts_per_frame), 1),
        )

    def polarisation(self, run: int, t: np.ndarray) -> np.ndarray:
        """Polarisation averaged over each time bin (the counters integrate: a fast precession is smoothed)."""
        if self.experiment_of(run) == "tf":
            frequency = GAMMA_MU_MHZ_PER_G * self.tf_field_gauss
            return np.sinc(frequency * self.bin_width) * precession(t, frequency, self.tf_relaxation, self.tf_damping)
        return kubo_toyabe(t, self.zf_delta)

    def histograms(self, run: int, events: int, rng: np.random.Generator) -> np.ndarray:
        """Counts (detector, bin) of one run: ``events`` positrons on average, dead time applied, Poisson drawn."""
        efficiency, dead_time = self.calibration()
        truth = self.truth(run, events)
        centres = self.raw_time + self.bin_width / 2
        t = centres - self.time_zero_us
        after = t >= 0
        signs = np.where(self.grouping == 1, 1.0, -1.0)
        shape = np.zeros((self.detectors, self.bins))
        decay = np.exp(-t[after] / MUON_LIFETIME) * self.bin_width / MUON_LIFETIME
        shape[:, after] = decay[None, :] * (1 + signs[:, None] * self.asymmetry * self.polarisation(run, t[after]))
        shape *= efficiency[:, None]
        shape += self.background * self.bin_width / MUON_LIFETIME * efficiency[:, None]
        expected = shape * (events / shape.sum())
        # non-paralysable dead time: per frame and bin, m = n / (1 + n τ / Δt)
        per_frame = expected / truth.good_frames
        observed = expected / (1 + per_frame * dead_time[:, None] / self.bin_width)
        return rng.poisson(observed).astype(np.int32)

    # -- files ---------------------------------------------------------------------------------
    def write(self, path: Path, *, run: int, rb_number: str, short_name: str, events: int, title: str,
              seed: int | None = None) -> Path:
        """One run's histogram NeXus file (muon NeXus version ``nexus_version``), written atomically."""
        rng = np.random.default_rng(seed)
        counts = self.histograms(run, events, rng)
        truth = self.truth(run, events)
        end = datetime.now(UTC)
        duration = truth.good_frames / self.frequency
        start = end - timedelta(seconds=duration)
        with atomic_path(Path(path)) as tmp, h5py.File(tmp, "w") as f:
            f.attrs["file_name"] = np.bytes_(Path(path).name)
            f.attrs["file_time"] = np.bytes_(_iso(end))
            f.attrs["creator"] = np.bytes_("nbreduce simulate")
            writer = self._write_v2 if self.nexus_version == 2 else self._write_v1
            writer(f, counts, truth, run=run, rb_number=rb_number, title=title, start=start, end=end,
                   duration=duration)
        return Path(path)

    def _sample_state(self, truth: MuonRunTruth) -> tuple[str, float, float, str]:
        tf = truth.experiment == "tf"
        return (self.tf_sample if tf else self.zf_sample, self.tf_temperature if tf else self.zf_temperature,
                truth.field_gauss, "TF" if tf else "ZF")

    def _runlog(self, entry: h5py.Group, name: str, nx_class: str, truth: MuonRunTruth, start: datetime,
                duration: float) -> None:
        """SECI logs of the run: sample temperature and main field, sampled every minute."""
        _, temperature, field, _ = self._sample_state(truth)
        logs = _group(entry, name, nx_class)
        times = np.arange(0.0, max(duration, 1.0), 60.0, dtype=np.float32)
        for log_name, value, units in (("Temp_Sample", temperature, "K"), ("Field_Main", field, "G")):
            log = _group(logs, log_name, "NXlog")
            _field(log, "time", times, "second", start=_iso(start))
            _field(log, "value", np.full(times.size, value, dtype=np.float32), units)

    def _write_v2(self, f: h5py.File, counts: np.ndarray, truth: MuonRunTruth, *, run: int, rb_number: str,
                  title: str, start: datetime, end: datetime, duration: float) -> None:
        _, dead_time = self.calibration()
        sample_name, temperature, field, state = self._sample_state(truth)
        entry = _group(f, "raw_data_1", "NXentry")
        _field(entry, "IDF_version", 2, dtype=np.int32)
        _field(entry, "definition", "pulsedTD")
        _field(entry, "name", self.name)
        _field(entry, "beamline", self.name)
        _field(entry, "title", title)
        _field(entry, "notes", f"simulated {truth.experiment.upper()} run")
        _field(entry, "run_number", run, dtype=np.int32)
        _field(entry, "experiment_identifier", rb_number)
        _field(entry, "start_time", _iso(start))
        _field(entry, "end_time", _iso(end))
        _field(entry, "duration", duration, "second", dtype=np.float32)
        _field(entry, "good_frames", truth.good_frames, dtype=np.int32)
        _field(entry, "raw_frames", truth.good_frames, dtype=np.int32)
        _field(entry, "total_counts", counts.sum() / 1e6, "Mev", dtype=np.float32)
        _field(entry, "program_name", "nbreduce.simulate", version="1")
        user = _group(entry, "user_1", "NXuser")
        _field(user, "name", "nbreduce simulator")
        _field(user, "affiliation", "ISIS")

        instrument = _group(entry, "instrument", "NXinstrument")
        _field(instrument, "name", self.name)
        source = _group(instrument, "source", "NXsource")
        _field(source, "name", "ISIS")
        _field(source, "type", "Pulsed Muon Source")
        _field(source, "probe", "positive muons")
        detector = _group(instrument, "detector_1", "NXdetector")
        data = detector.create_dataset("counts", data=counts[None, :, :], compression="gzip", compression_opts=4)
        for key, value in (("units", "counts"), ("axes", "[period index, spectrum index, raw time bin]"),
                           ("long_name", self.name)):
            data.attrs[key] = np.bytes_(value)
        data.attrs["signal"] = np.int32(1)
        data.attrs["t0_bin"] = np.int32(int(self.time_zero_us / self.bin_width))
        data.attrs["first_good_bin"] = np.int32(int(np.ceil(self.first_good_us / self.bin_width)))
        data.attrs["last_good_bin"] = np.int32(self.bins - 1)
        _field(detector, "raw_time", self.raw_time, "microseconds", dtype=np.float32, long_name="time")
        _field(detector, "resolution", self.resolution_ps, "picoseconds", dtype=np.int32)
        _field(detector, "spectrum_index", np.arange(1, self.detectors + 1), dtype=np.int32)
        _field(detector, "time_zero", self.time_zero_us, "microseconds", dtype=np.float32)
        _field(detector, "dead_time", dead_time, "microseconds", dtype=np.float32)
        _field(detector, "grouping", self.grouping, dtype=np.int32)
        _field(detector, "orientation", "t" if truth.experiment == "tf" else "l")
        # the NXdata view of the detector, as LoadISISNexus reads it (hard links, NeXus "target" attribute)
        plot = _group(entry, "detector_1", "NXdata")
        for name in ("counts", "raw_time", "spectrum_index"):
            plot[name] = detector[name]
            detector[name].attrs["target"] = np.bytes_(detector[name].name)
        _field(plot, "period_index", [1], dtype=np.int32)

        periods = _group(entry, "periods", "NXperiod")
        _field(periods, "number", 1, dtype=np.int32)
        _field(periods, "labels", "period 1")
        _field(periods, "type", [1], dtype=np.int32)
        _field(periods, "sequences", [1], dtype=np.int32)
        _field(periods, "frames_requested", [0], dtype=np.int32)
        _field(periods, "raw_frames", [truth.good_frames], dtype=np.int32)
        _field(periods, "good_frames", [truth.good_frames], dtype=np.int32)
        _field(periods, "output", [0], dtype=np.int32)
        _field(periods, "total_counts", [counts.sum() / 1e6], "Mev", dtype=np.float32)

        sample = _group(entry, "sample", "NXsample")
        _field(sample, "name", sample_name)
        _field(sample, "id", sample_name)
        _field(sample, "temperature", temperature, "Kelvin", dtype=np.float32)
        _field(sample, "magnetic_field", field, "Gauss", dtype=np.float32)
        _field(sample, "magnetic_field_state", state)
        _field(sample, "magnetic_field_vector", [0.0, 0.0, field], "Gauss", dtype=np.float32,
               coordinate_system="cartesian", available=np.int32(1))
        self._runlog(entry, "runlog", "NXrunlog", truth, start, duration)

    def _write_v1(self, f: h5py.File, counts: np.ndarray, truth: MuonRunTruth, *, run: int, rb_number: str,
                  title: str, start: datetime, end: datetime, duration: float) -> None:
        _, dead_time = self.calibration()
        sample_name, temperature, field, state = self._sample_state(truth)
        entry = _group(f, "run", "NXentry")
        _field(entry, "IDF_version", 1, dtype=np.int32)
        _field(entry, "program_name", "nbreduce.simulate", version="1")
        _field(entry, "number", run, dtype=np.int32)
        _field(entry, "title", title)
        _field(entry, "notes", f"simulated {truth.experiment.upper()} run")
        _field(entry, "analysis", "muonTD")
        _field(entry, "lab", "ISIS")
        _field(entry, "beamline", self.name)
        _field(entry, "start_time", _iso(start))
        _field(entry, "stop_time", _iso(end))
        _field(entry, "duration", round(duration), "seconds", dtype=np.int32)
        _field(entry, "switching_states", 1, dtype=np.int32)
        user = _group(entry, "user", "NXuser")
        _field(user, "name", "nbreduce simulator")
        _field(user, "experiment_number", rb_number)

        sample = _group(entry, "sample", "NXsample")
        _field(sample, "name", sample_name)
        _field(sample, "temperature", temperature, "Kelvin", dtype=np.float32)
        _field(sample, "magnetic_field", field, "Gauss", dtype=np.float32)
        _field(sample, "shape", "flat plate")
        _field(sample, "magnetic_field_state", state)
        _field(sample, "magnetic_field_vector", [0.0, 0.0, field], "Gauss", dtype=np.float32,
               coordinate_system="cartesian", available=np.int32(1))
        _field(sample, "environment", "CCR")

        instrument = _group(entry, "instrument", "NXinstrument")
        _field(instrument, "name", self.name)
        detector = _group(instrument, "detector", "NXdetector")
        _field(detector, "number", self.detectors, dtype=np.int32)
        _field(detector, "deadtimes", dead_time, "microseconds", dtype=np.float32, available=np.int32(1))
        _field(detector, "orientation", "t" if truth.experiment == "tf" else "l")
        collimator = _group(instrument, "collimator", "NXcollimator")
        _field(collimator, "type", "none")
        beam = _group(instrument, "beam", "NXbeam")
        _field(beam, "total_counts", counts.sum() / 1e6, "Mev", dtype=np.float32)
        _field(beam, "frames", truth.good_frames, dtype=np.int32)
        _field(beam, "frames_good", truth.good_frames, dtype=np.int32)

        histograms = _group(entry, "histogram_data_1", "NXdata")
        data = histograms.create_dataset("counts", data=counts, compression="gzip", compression_opts=4)
        data.attrs["units"] = np.bytes_("counts")
        data.attrs["signal"] = np.int32(1)
        data.attrs["number"] = np.int32(self.detectors)
        data.attrs["length"] = np.int32(self.bins)
        data.attrs["t0_bin"] = np.int32(int(self.time_zero_us / self.bin_width))
        data.attrs["first_good_bin"] = np.int32(int(np.ceil(self.first_good_us / self.bin_width)))
        data.attrs["last_good_bin"] = np.int32(self.bins - 1)
        _field(histograms, "resolution", self.resolution_ps, "picoseconds", dtype=np.int32)
        _field(histograms, "time_zero", self.time_zero_us, "microseconds", dtype=np.float32, available=np.int32(1))
        centres = self.raw_time + self.bin_width / 2
        _field(histograms, "raw_time", centres, "microseconds", dtype=np.float32)
        _field(histograms, "corrected_time", centres - self.time_zero_us, "microseconds", dtype=np.float32)
        _field(histograms, "grouping", self.grouping, dtype=np.int32, available=np.int32(1))
        _field(histograms, "alpha", [1.0, 2.0, 1.0], dtype=np.float32, available=np.int32(0))
        self._runlog(entry, "runlog", "NXcollection", truth, start, duration)
