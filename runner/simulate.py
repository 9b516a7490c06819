"""Simulated ISIS runs: NeXus event files with real physics, ``lastrun.txt`` and run-completion messages.

A laptop or CI machine has no instrument, so this writes what one would: an ISIS-style event file in
``NDX<INST>/Instrument/data/cycle_YY_N/``, the ``lastrun.txt`` line a watcher polls, and the
``data_ready``-compatible message. The events are sampled from known physics (Bragg peaks of silicon
for a powder diffractometer, an elastic line plus a crystal-field level for a chopper spectrometer),
so a template's result can be checked against the truth, not just against "it ran".

Files are written next to their final name and renamed, so a watcher never sees half a file.
Events are generated and written in chunks: 10^7 events take a few seconds and ~100 MB of working memory.
"""

from __future__ import annotations

import itertools
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Any, Protocol

import h5py
import numpy as np
import scipp.constants as const

from runner.config import Settings
from runner.kafka import Publisher
from runner.models import RunCompletion, new_id
from runner.templates import InstrumentConfig, TemplateRegistry
from runner.topics import RUN_COMPLETIONS
from runner.triggers.isis import instrument_dir, lastrun_file
from runner.triggers.lastrun import parse_lastrun

log = logging.getLogger(__name__)

DEFAULT_EVENTS = 200_000
#: Events generated (and held in memory) at a time; bounds memory for any run size.
CHUNK_EVENTS = 500_000

_MN = const.m_n.value  # kg
_H = const.h.value  # J s
_MEV = 1e-3 * const.e.value  # J per meV
#: Time of flight per metre per Ångström of wavelength (µs / (m Å)): t = TOF_PER_M_A * L * λ.
TOF_PER_M_A = _MN / _H * 1e-4
#: E[meV] = E_PER_K2 * k²[Å⁻²], from E = ħ²k²/2m.
E_PER_K2 = (_H / (2 * np.pi)) ** 2 / (2 * _MN) * 1e20 / _MEV


def speed(energy_mev: np.ndarray | float) -> np.ndarray:
    """Neutron speed (m/s) at kinetic energy ``energy_mev``."""
    return np.sqrt(2 * np.asarray(energy_mev) * _MEV / _MN)


# --------------------------------------------------------------------------------------------
# Geometry


@dataclass(frozen=True)
class Bank:
    """A detector bank: pixel ids and pixel positions relative to the sample (m)."""

    name: str
    detector_number: np.ndarray
    #: Pixel offsets in the bank's own frame (written as ``[xyz]_pixel_offset``).
    offsets: np.ndarray
    #: Bank placement: distance along the beam (m), then a rotation about the vertical axis (deg).
    distance: float
    rotation: float

    @cached_property
    def positions(self) -> np.ndarray:
        """Pixel positions in the laboratory frame (McStas: z along the beam, y up), as NeXus computes them."""
        angle = np.radians(self.rotation)
        x, y, z = self.offsets[:, 0], self.offsets[:, 1], self.offsets[:, 2] + self.distance
        return np.column_stack([x * np.cos(angle) + z * np.sin(angle), y, -x * np.sin(angle) + z * np.cos(angle)])

    @cached_property
    def l2(self) -> np.ndarray:
        return np.linalg.norm(self.positions, axis=1)

    @cached_property
    def two_theta(self) -> np.ndarray:
        return np.arccos(self.positions[:, 2] / self.l2)


def tube_bank(name: str, first_id: int, two_theta_centre: float, *, distance: float, width_deg: float,
              tubes: int, pixels: int, height: float) -> Bank:
    """Vertical tubes on an arc of radius ``distance`` around the sample, centred at ``two_theta_centre``."""
    delta = np.radians(np.linspace(-width_deg / 2, width_deg / 2, tubes))
    y = np.linspace(-height / 2, height / 2, pixels)
    dd, yy = np.meshgrid(delta, y, indexing="ij")
    offsets = np.column_stack([distance * np.sin(dd).ravel(), yy.ravel(), distance * (np.cos(dd).ravel() - 1)])
    ids = np.arange(first_id, first_id + tubes * pixels, dtype=np.int32)
    return Bank(name, ids, offsets, distance, two_theta_centre)


@dataclass(frozen=True)
class Monitor:
    name: str
    #: Distance from the moderator (m); the monitor sits at z = distance - L1.
    distance: float
    tof_edges: np.ndarray
    counts: np.ndarray


def _cumulative(x: np.ndarray, density: np.ndarray) -> np.ndarray:
    """Running trapezoidal integral of a tabulated density, starting at 0."""
    return np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(x))])


def _sample_from_density(rng: np.random.Generator, x: np.ndarray, density: np.ndarray, n: int) -> np.ndarray:
    """Inverse-CDF sampling of a tabulated density (linear interpolation between grid points)."""
    cdf = _cumulative(x, density)
    return np.interp(rng.random(n) * cdf[-1], cdf, x)


def _categorical(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    """``n`` indices into the flattened ``weights`` (vectorised; far faster than a Python loop)."""
    cdf = np.cumsum(weights.ravel())
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), cdf.size - 1)


# --------------------------------------------------------------------------------------------
# Instrument models


class InstrumentModel(Protocol):
    """What the file writer needs from an instrument: geometry, events and its own metadata."""

    source_frequency: float  # Hz
    l1: float  # moderator to sample (m)
    tof_window: tuple[float, float]  # recorded time-of-flight frame (µs)
    event_rate: float  # detected events per second, sets the run duration
    proton_current: float  # µA
    first_run: int
    sample: str

    @property
    def banks(self) -> list[Bank]: ...

    def bank_fractions(self) -> np.ndarray: ...

    def events(self, rng: np.random.Generator, bank: int, n: int) -> tuple[np.ndarray, np.ndarray]: ...

    def monitors(self, rng: np.random.Generator, events: int) -> list[Monitor]: ...

    def title(self, run: int) -> str: ...

    def write_extras(self, entry: h5py.Group, instrument: h5py.Group) -> None: ...


def moderator_spectrum(wavelength: np.ndarray, peak: float = 1.6) -> np.ndarray:
    """Flux per Å of a cold/ambient spallation moderator: Maxwellian plus a 1/λ slowing-down tail."""
    lam = np.asarray(wavelength, dtype=float)
    maxwellian = 2 * peak**4 / lam**5 * np.exp(-((peak / lam) ** 2))
    slowing_down = 0.1 / lam / (1 + np.exp((0.4 * peak - lam) / 0.05))
    return maxwellian + slowing_down


def diamond_reflections(a: float, d_min: float) -> tuple[np.ndarray, np.ndarray]:
    """d-spacings (Å) and relative integrated intensities of a diamond-structure cubic crystal (Si, C).

    Allowed: h,k,l all odd (|F|² = 32 b²) or all even with h+k+l = 4n (|F|² = 64 b²); coincident
    reflections such as (511)/(333) are merged. Intensity = multiplicity × |F|² × d⁴ (time-of-flight
    Lorentz factor) × Debye–Waller factor (B = 0.5 Å²).
    """
    hmax = int(a / d_min) + 1
    by_q2: dict[int, float] = {}
    for hkl in itertools.combinations_with_replacement(range(hmax + 1), 3):
        q2 = sum(i * i for i in hkl)
        if q2 == 0 or a / np.sqrt(q2) < d_min:
            continue
        odd = all(i % 2 for i in hkl)
        even = not any(i % 2 for i in hkl) and sum(hkl) % 4 == 0
        if not (odd or even):
            continue
        multiplicity = len({p for signs in itertools.product((1, -1), repeat=3)
                            for p in itertools.permutations(np.multiply(signs, hkl).tolist())})
        by_q2[q2] = by_q2.get(q2, 0.0) + multiplicity * (32.0 if odd else 64.0)
    q2s = np.array(sorted(by_q2), dtype=float)
    d = a / np.sqrt(q2s)
    intensity = np.array([by_q2[int(q)] for q in q2s]) * d**4 * np.exp(-0.5 / (2 * d**2))
    return d, intensity / intensity.max()


SILICON_A = 5.43102  # Å, NIST SRM 640 lattice parameter


@dataclass(frozen=True)
class PowderDiffractometer:
    """WISH-like: 40 m flight path, 10 Hz target station, five banks of tubes from 27° to 153° in 2θ.

    Events come from the Bragg peaks of silicon (diamond structure, ``SILICON_A``) weighted by the
    moderator flux at each peak's wavelength, on an incoherent background with the same flux shape.
    """

    name: str = "WISH"
    source_frequency: float = 10.0
    l1: float = 40.0
    l2: float = 2.2
    tof_window: tuple[float, float] = (6000.0, 99000.0)
    event_rate: float = 2000.0
    proton_current: float = 40.0
    first_run: int = 38237
    bank_angles: tuple[float, ...] = (27.08, 58.33, 90.0, 121.66, 152.92)
    lattice: float = SILICON_A
    background_fraction: float = 0.25
    #: Angular uncertainty (rad) and time/flight-path term of the resolution Δd/d.
    delta_theta: float = 0.002
    delta_t: float = 0.0008
    sample: str = "Si"

    @cached_property
    def banks(self) -> list[Bank]:
        return [tube_bank(f"bank_{i}", i * 100_000, angle, distance=self.l2, width_deg=24.0, tubes=16, pixels=32,
                          height=1.0)
                for i, angle in enumerate(self.bank_angles, start=1)]

    @cached_property
    def reflections(self) -> tuple[np.ndarray, np.ndarray]:
        return diamond_reflections(self.lattice, d_min=0.3)

    @cached_property
    def wavelengths(self) -> np.ndarray:
        """Wavelength grid (Å) covering the recorded frame for every pixel."""
        paths = np.concatenate([self.l1 + bank.l2 for bank in self.banks])
        lo, hi = np.array(self.tof_window) / TOF_PER_M_A
        return np.linspace(lo / paths.max(), hi / paths.min(), 4000)

    def _rates(self, bank: Bank) -> tuple[np.ndarray, np.ndarray]:
        """Unscaled rates per pixel: one column per reflection, and the background (∫ flux over the frame)."""
        d, intensity = self.reflections
        path = self.l1 + bank.l2
        wavelength = 2 * np.sin(bank.two_theta / 2)[:, None] * d[None, :]
        tof = TOF_PER_M_A * path[:, None] * wavelength
        inside = (tof > self.tof_window[0]) & (tof < self.tof_window[1])
        peaks = intensity[None, :] * moderator_spectrum(wavelength) * inside
        grid = self.wavelengths
        cumulative = _cumulative(grid, moderator_spectrum(grid))
        lo, hi = (np.interp(t / (TOF_PER_M_A * path), grid, cumulative) for t in self.tof_window)
        return peaks, hi - lo

    @cached_property
    def rates(self) -> list[np.ndarray]:
        """Per bank, event rates per (pixel, component): reflections then background in the last column."""
        raw = [self._rates(bank) for bank in self.banks]
        peak_total = sum(p.sum() for p, _ in raw)
        bg_total = sum(b.sum() for _, b in raw)
        scale = self.background_fraction / (1 - self.background_fraction) * peak_total / bg_total
        return [np.column_stack([p, b * scale]) for p, b in raw]

    def bank_fractions(self) -> np.ndarray:
        totals = np.array([r.sum() for r in self.rates])
        return totals / totals.sum()

    def resolution(self, two_theta: np.ndarray) -> np.ndarray:
        """Relative Gaussian width σ_d/d: angular term Δθ·cot θ plus the time/flight-path term."""
        return np.hypot(self.delta_theta / np.tan(two_theta / 2), self.delta_t)

    def events(self, rng: np.random.Generator, bank: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        geometry, rates = self.banks[bank], self.rates[bank]
        d, _ = self.reflections
        ids, tofs = [], []
        missing = n
        while missing > 0:  # peak tails and background beyond the frame are rejected, so draw a little more
            draw = int(missing * 1.02) + 16
            pixel, component = np.divmod(_categorical(rng, rates, draw), rates.shape[1])
            two_theta = geometry.two_theta[pixel]
            spread = 1 + self.resolution(two_theta) * rng.standard_normal(draw)
            d_event = d[np.minimum(component, d.size - 1)] * spread
            wavelength = 2 * np.sin(two_theta / 2) * d_event
            background = component == d.size
            grid = self.wavelengths
            wavelength[background] = _sample_from_density(rng, grid, moderator_spectrum(grid), int(background.sum()))
            tof = TOF_PER_M_A * (self.l1 + geometry.l2[pixel]) * wavelength
            keep = np.flatnonzero((tof > self.tof_window[0]) & (tof < self.tof_window[1]))[:missing]
            ids.append(geometry.detector_number[pixel[keep]])
            tofs.append(tof[keep])
            missing -= keep.size
        return np.concatenate(ids), np.concatenate(tofs).astype(np.float32)

    def monitors(self, rng: np.random.Generator, events: int) -> list[Monitor]:
        """Incident-beam monitor 2 m before the sample: the moderator spectrum in time of flight."""
        distance = self.l1 - 2.0
        edges = np.arange(self.tof_window[0], self.tof_window[1] + 1, 50.0)
        grid = np.linspace(*(edges[[0, -1]] / (TOF_PER_M_A * distance)), 4000)
        tof = TOF_PER_M_A * distance * _sample_from_density(rng, grid, moderator_spectrum(grid), max(events // 2, 1000))
        return [Monitor("monitor_1", distance, edges, np.histogram(tof, edges)[0].astype(np.int32))]

    def title(self, run: int) -> str:
        return f"{self.sample} standard powder, 6 mm V can, 295 K, run {run}"

    def write_extras(self, entry: h5py.Group, instrument: h5py.Group) -> None:
        sample = entry["sample"]
        _field(sample, "chemical_formula", self.sample)
        _field(sample, "unit_cell_abc", np.full(3, self.lattice), "angstrom")
        _field(sample, "temperature", 295.0, "K")


@dataclass(frozen=True)
class ChopperSpectrometer:
    """MARI-like direct-geometry spectrometer: Fermi chopper selects Ei, detectors at 4 m from 3° to 134°.

    Events: an elastic line (incoherent, Debye–Waller falling with Q), a dispersionless crystal-field
    excitation at ``excitation`` meV (magnetic form factor falling with Q) and a flat time background.
    """

    name: str = "MARI"
    source_frequency: float = 50.0
    l1: float = 11.739
    l2: float = 4.022
    chopper_distance: float = 10.05
    tof_window: tuple[float, float] = (2000.0, 19500.0)
    event_rate: float = 5000.0
    proton_current: float = 150.0
    first_run: int = 25581
    incident_energy: float = 50.0  # meV
    excitation: float = 20.0  # meV energy transfer of the excitation
    excitation_width: float = 0.8  # meV, intrinsic Gaussian σ
    fractions: tuple[float, float, float] = (0.5, 0.35, 0.15)  # elastic, excitation, background
    #: Mean-square displacement (Å²) for the Debye–Waller factor and form-factor radius (Å⁻¹).
    msd: float = 0.01
    form_factor_q: float = 3.0
    #: Elastic energy resolution σ as a fraction of Ei (≈3 % FWHM).
    resolution: float = 0.013
    sample: str = "CeAuAl3"
    temperature: float = 5.0

    @cached_property
    def banks(self) -> list[Bank]:
        angles = np.arange(3.0, 134.5, 1.0)
        return [tube_bank("detector_1", 1, float(angles.mean()), distance=self.l2, width_deg=float(np.ptp(angles)),
                          tubes=angles.size, pixels=8, height=0.3)]

    def bank_fractions(self) -> np.ndarray:
        return np.ones(1)

    def sigma(self, energy_transfer: np.ndarray) -> np.ndarray:
        """Resolution σ (meV): best at the highest energy transfer, as on a real direct-geometry instrument."""
        final = np.clip(1 - energy_transfer / self.incident_energy, 0, None)
        return self.resolution * self.incident_energy * (0.4 + 0.6 * final**1.5)

    def _momentum_transfer(self, two_theta: np.ndarray, energy_transfer: float) -> np.ndarray:
        ki = np.sqrt(self.incident_energy / E_PER_K2)
        kf = np.sqrt((self.incident_energy - energy_transfer) / E_PER_K2)
        return np.sqrt(ki**2 + kf**2 - 2 * ki * kf * np.cos(two_theta))

    @cached_property
    def rates(self) -> np.ndarray:
        """Event rates per (pixel, component): elastic, excitation, background."""
        two_theta = self.banks[0].two_theta
        elastic = np.exp(-self.msd * self._momentum_transfer(two_theta, 0.0) ** 2 / 3)
        magnetic = np.exp(-((self._momentum_transfer(two_theta, self.excitation) / self.form_factor_q) ** 2))
        columns = (elastic, magnetic, np.ones_like(elastic))
        return np.column_stack([w / w.sum() * f for w, f in zip(columns, self.fractions, strict=True)])

    def events(self, rng: np.random.Generator, bank: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        geometry = self.banks[bank]
        pixel, component = np.divmod(_categorical(rng, self.rates, n), 3)
        excited = component == 1
        centre = np.where(excited, self.excitation, 0.0)
        width = np.hypot(self.sigma(centre), np.where(excited, self.excitation_width, 0.0))
        final = np.clip(self.incident_energy - centre - width * rng.standard_normal(n), 0.5, None)
        tof = 1e6 * (self.l1 / speed(self.incident_energy) + geometry.l2[pixel] / speed(final))
        background = component == 2
        tof[background] = rng.uniform(*self.tof_window, int(background.sum()))
        return geometry.detector_number[pixel], np.clip(tof, *self.tof_window).astype(np.float32)

    def monitors(self, rng: np.random.Generator, events: int) -> list[Monitor]:
        """Two monitors in the direct beam, after the chopper and behind the sample: Ei from their time difference."""
        edges = np.arange(0.0, 20000.0 + 1, 2.0)
        v = speed(self.incident_energy)
        out = []
        for name, distance, share in (("monitor_1", self.chopper_distance + 0.15, 0.3),
                                      ("monitor_2", self.l1 + 5.261, 0.2)):
            t = distance / v * 1e6
            # pulse width: chopper opening (~10 µs) plus the energy spread growing with distance
            sigma = np.hypot(10.0, t * self.resolution / 2 * (distance - self.chopper_distance) / distance)
            tof = t + sigma * rng.standard_normal(max(int(events * share), 1000))
            out.append(Monitor(name, distance, edges, np.histogram(tof, edges)[0].astype(np.int32)))
        return out

    def title(self, run: int) -> str:
        return f"{self.sample} {self.temperature:g}K Ei={self.incident_energy:g}meV 300Hz, run {run}"

    def write_extras(self, entry: h5py.Group, instrument: h5py.Group) -> None:
        chopper = _group(instrument, "fermi", "NXfermi_chopper")
        _field(chopper, "energy", self.incident_energy, "meV")
        _field(chopper, "rotation_speed", 300.0, "Hz")
        _field(chopper, "distance", self.chopper_distance - self.l1, "m")
        _field(chopper, "type", "Gd (A) chopper")
        sample = entry["sample"]
        _field(sample, "chemical_formula", self.sample)
        _field(sample, "temperature", self.temperature, "K")


#: Models by instrument name; other instruments get one chosen by the ``technique`` of their config.
MODELS: dict[str, type[PowderDiffractometer] | type[ChopperSpectrometer]] = {
    "WISH": PowderDiffractometer,
    "MARI": ChopperSpectrometer,
}


def instrument_model(config: InstrumentConfig) -> InstrumentModel:
    """The simulation model of ``config``'s instrument (spectrometers by technique, diffraction otherwise)."""
    return _model(config.name, config.technique.lower())


@lru_cache(maxsize=16)
def _model(name: str, technique: str) -> InstrumentModel:
    # cached: geometry and rate tables are built once per instrument, not once per run
    if name in MODELS:
        return MODELS[name]()
    if "spectro" in technique or "inelastic" in technique:
        return ChopperSpectrometer(name=name, first_run=1)
    return PowderDiffractometer(name=name, first_run=1)


# --------------------------------------------------------------------------------------------
# NeXus writing


def _group(parent: h5py.Group, name: str, nx_class: str) -> h5py.Group:
    group = parent.create_group(name)
    group.attrs["NX_class"] = nx_class
    return group


def _field(parent: h5py.Group, name: str, value: Any, units: str | None = None, **attrs: Any) -> h5py.Dataset:
    dataset = parent.create_dataset(name, data=value)
    if units is not None:
        dataset.attrs["units"] = units
    for key, attr in attrs.items():
        dataset.attrs[key] = attr
    return dataset


def _transformation(group: h5py.Group, name: str, kind: str, value: float, units: str,
                    vector: tuple[float, float, float], depends_on: str) -> str:
    _field(group, name, value, units, transformation_type=kind, vector=np.array(vector, dtype=float),
           depends_on=depends_on)
    return f"{group.name}/{name}"


def _place(group: h5py.Group, distance: float, rotation: float = 0.0) -> None:
    """NXtransformations chain: translate ``distance`` along the beam, then rotate about the vertical."""
    transformations = _group(group, "transformations", "NXtransformations")
    base = "."
    if rotation:
        base = _transformation(transformations, "rotation", "rotation", rotation, "deg", (0, 1, 0), ".")
    _field(group, "depends_on", _transformation(transformations, "translation", "translation", distance, "m",
                                                (0, 0, 1), base))


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _chunks(total: int, size: int) -> Iterator[tuple[int, int]]:
    for start in range(0, total, size):
        yield start, min(start + size, total)


def write_nexus(path: Path, config: InstrumentConfig, run: int, rb_number: str, *, events: int, title: str,
                seed: int | None = None) -> Path:
    """Write one ISIS-style NeXus event file at ``path`` (atomically: temp name in the same folder, then rename)."""
    model = instrument_model(config)
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

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            f.attrs["file_name"] = path.name
            f.attrs["file_time"] = _iso(end)
            f.attrs["creator"] = "nbreduce simulate"
            entry = _group(f, "raw_data_1", "NXentry")
            f.attrs["default"] = "raw_data_1"
            _field(entry, "definition", "TOFRAW")
            _field(entry, "name", config.name)
            _field(entry, "beamline", config.name)
            _field(entry, "run_number", np.int32(run))
            _field(entry, "experiment_identifier", rb_number)
            _field(entry, "title", title)
            _field(entry, "start_time", _iso(start))
            _field(entry, "end_time", _iso(end))
            _field(entry, "duration", np.float32(duration), "second")
            _field(entry, "proton_charge", np.float32(proton_charge), "uAh")
            _field(entry, "good_frames", np.int32(pulses))
            _field(entry, "total_counts", np.int64(events), "counts")
            _field(entry, "program_name", "nbreduce.simulate")

            instrument = _group(entry, "instrument", "NXinstrument")
            _field(instrument, "name", config.name, short_name=config.file_prefix or config.name)
            source = _group(instrument, "source", "NXsource")
            _field(source, "name", "ISIS")
            _field(source, "type", "Spallation Neutron Source")
            _field(source, "probe", "neutron")
            _field(source, "frequency", model.source_frequency, "Hz")
            _place(source, -model.l1)

            sample = _group(entry, "sample", "NXsample")
            _field(sample, "name", model.sample)
            _field(sample, "depends_on", ".")

            pulse_times = (np.int64(start.timestamp() * 1e9)
                           + (np.arange(pulses) * (1e9 / model.source_frequency)).astype(np.int64))
            for index, (bank, n_bank) in enumerate(zip(banks, per_bank, strict=True)):
                detector = _group(instrument, bank.name, "NXdetector")
                _field(detector, "detector_number", bank.detector_number)
                for axis, name in enumerate(("x_pixel_offset", "y_pixel_offset", "z_pixel_offset")):
                    _field(detector, name, bank.offsets[:, axis], "m")
                _place(detector, bank.distance, bank.rotation)
                data = _group(detector, "events", "NXevent_data")
                bank_rng = bank_rngs[index]
                counts = bank_rng.multinomial(n_bank, np.full(pulses, 1 / pulses))
                _field(data, "event_index", np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64))
                _field(data, "event_time_zero", pulse_times, "ns", offset="1970-01-01T00:00:00Z")
                ids = data.create_dataset("event_id", shape=(n_bank,), dtype=np.int32)
                tofs = data.create_dataset("event_time_offset", shape=(n_bank,), dtype=np.float32)
                tofs.attrs["units"] = "us"
                for lo, hi in _chunks(int(n_bank), CHUNK_EVENTS):
                    ids[lo:hi], tofs[lo:hi] = model.events(bank_rng, index, hi - lo)

            for monitor in model.monitors(rng, events):  # ISIS keeps monitors at entry level
                group = _group(entry, monitor.name, "NXmonitor")
                group.attrs["signal"] = "data"
                group.attrs["axes"] = ["time_of_flight"]
                _field(group, "data", monitor.counts, "counts")
                _field(group, "time_of_flight", monitor.tof_edges, "us")
                _place(group, monitor.distance - model.l1)

            model.write_extras(entry, instrument)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


# --------------------------------------------------------------------------------------------
# ISIS archive layout


def current_cycle(today: datetime | None = None) -> str:
    """ISIS-like cycle folder name for a date: ``cycle_YY_N`` with one cycle per quarter."""
    day = today or datetime.now(UTC)
    return f"cycle_{day:%y}_{(day.month - 1) // 3 + 1}"


def lastrun_path(data_root: Path, instrument: str) -> Path:
    return lastrun_file([Path(data_root)], instrument)


def read_lastrun(path: Path) -> int | None:
    """Run number of an ISIS ``lastrun.txt`` (the watcher's parser), or None if absent or unreadable."""
    try:
        return parse_lastrun(path.read_text())
    except (OSError, ValueError):
        return None


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_run(data_root: Path, config: InstrumentConfig, run: int, rb_number: str, *, events: int, title: str,
              cycle: str | None = None, seed: int | None = None) -> Path:
    """Write run ``run`` into the ISIS archive layout under ``data_root`` and advance ``lastrun.txt``.

    The data file is complete before ``lastrun.txt`` names it, so a polling watcher never starts early.
    """
    folder = cycle or current_cycle()
    folder = folder if folder.startswith("cycle_") else f"cycle_{folder}"
    base = instrument_dir(Path(data_root), config.name)
    path = write_nexus(base / "data" / folder / config.data_file_name(run), config, run, rb_number,
                       events=events, title=title, seed=seed)
    prefix = config.file_prefix or config.name
    _write_atomic(lastrun_path(data_root, config.name), f"{prefix} {run:0{config.run_digits}d} 0\n")
    return path


def random_rb(rng: np.random.Generator | None = None) -> str:
    """A plausible 7-digit RB number: two-digit year of the proposal round, then five digits."""
    rng = rng or np.random.default_rng()
    return f"{datetime.now(UTC):%y}{int(rng.integers(10000, 100000)):05d}"


def simulate(settings: Settings, instrument: str, runs: int, events: int = DEFAULT_EVENTS, *,
             rb_number: str | None = None, first_run: int | None = None,
             publish: bool = True) -> list[RunCompletion]:
    """Simulate ``runs`` consecutive runs of ``instrument``; publish one run completion per run.

    Run numbers continue from the instrument's ``lastrun.txt`` (like the real instrument) unless
    ``first_run`` is given. All runs share one experiment (RB) number.
    """
    if runs < 1 or events < 1:
        raise ValueError("runs and events must be positive")
    config = TemplateRegistry(settings.notebooks).config(instrument)
    data_root = settings.data_roots[0]
    last = read_lastrun(lastrun_path(data_root, config.name))
    model = instrument_model(config)
    run = first_run or (last + 1 if last else model.first_run)
    rb = rb_number or random_rb()
    publisher = Publisher(settings) if publish else None
    messages: list[RunCompletion] = []
    try:
        for number in range(run, run + runs):
            title = model.title(number)
            path = write_run(data_root, config, number, rb, events=events, title=title)
            message = RunCompletion(message_id=new_id(), instrument=config.name, run_number=number, rb_number=rb,
                                    data=str(path), run_title=title, facility="ISIS", started_by=0)
            if publisher:
                publisher.publish(RUN_COMPLETIONS, message, key=config.name)
            log.info("simulated %s run %d (%d events): %s", config.name, number, events, path)
            messages.append(message)
    finally:
        if publisher:
            publisher.close()
    return messages
