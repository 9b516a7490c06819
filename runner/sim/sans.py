"""Small-angle neutron scattering: a time-of-flight SANS instrument (LOQ, SANS2D, ZOOM, LARMOR) and its runs.

An ISIS SANS measurement is a set of runs, told apart by their titles (the convention the ISIS
autoreduction scripts test: ``<name>_SANS`` is a scattering run, ``<name>_TRANS`` a transmission run):

* the **direct** (empty-beam) run: nothing in the beam, beam stop out, attenuated direct beam on the
  detector; its transmission monitor gives the empty-beam reference of every transmission, its detector
  the wavelength dependence of the detector efficiency relative to the incident monitor;
* the **transmission** run of the sample: transmission monitor in the beam behind the sample;
* the **sample** scattering run: dilute monodisperse spheres (radius ``sphere_radius``, contrast
  ``contrast``) in a solvent with a flat incoherent background, in a can;
* optionally the **can** scattering and can transmission runs (the can and solvent only).

Writing a sample run also writes its associated runs next to it (when they are not there yet), with the run
numbers of ``[simulation]`` (``direct_run``, ``transmission_run``, ``can_run``, ``can_transmission_run``), so a
single ``nbreduce simulate`` or a test's ``write_run_file`` gives a reducible set. Ground truth: the sphere
radius (Å); every run's counts follow one beam time, so monitors, transmissions and intensities are consistent.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from runner.sim.nexus import nx_field, nx_group, write_nexus
from runner.sim.physics import TOF_PER_M_A, Bank, Monitor, categorical, moderator_spectrum

RUN_KINDS = ("sample", "transmission", "direct", "can", "can_transmission")


def sphere_form_factor(q: np.ndarray, radius: float) -> np.ndarray:
    """Normalised form factor P(Q) of a homogeneous sphere, P(0) = 1."""
    qr = np.maximum(np.asarray(q, dtype=float) * radius, 1e-6)
    return (3 * (np.sin(qr) - qr * np.cos(qr)) / qr**3) ** 2


@dataclass(frozen=True)
class SansInstrument:
    """A time-of-flight SANS instrument: a flat area detector (pixels_x × pixels_y) at ``l2`` behind the sample,
    an incident monitor before the sample and a transmission monitor behind it. Defaults are LOQ's."""

    name: str = "LOQ"
    source_frequency: float = 25.0  # Hz
    l1: float = 11.0  # moderator to sample (m)
    l2: float = 4.15  # sample to detector (m)
    pixels_x: int = 128
    pixels_y: int = 128
    pitch_x: float = 0.005038  # m
    pitch_y: float = 0.005041  # m
    first_detector_id: int = 3
    wavelength_min: float = 2.2  # Å
    wavelength_max: float = 10.0  # Å
    incident_monitor: str = "monitor_2"
    incident_monitor_distance: float = 10.424  # from the moderator (m)
    transmission_monitor: str = "monitor_3"
    transmission_monitor_distance: float = 11.497  # from the moderator (m)
    beam_stop_radius: float = 0.03  # m
    event_rate: float = 2000.0
    proton_current: float = 40.0
    first_run: int = 1010
    # --- sample (ground truth) ---
    sample: str = "PS spheres in D2O"
    can: str = "1 mm quartz cell, D2O"
    sphere_radius: float = 60.0  # Å
    contrast: float = 5.0e-6  # Δρ (Å⁻²)
    volume_fraction: float = 0.01
    sample_background: float = 0.08  # flat incoherent dΣ/dΩ of solvent + can (cm⁻¹)
    sample_thickness: float = 0.1  # cm
    #: Transmission T(λ) = exp(-(a + b λ)) of the sample (and of the can: ``can_attenuation``).
    attenuation: tuple[float, float] = (0.12, 0.025)
    can_attenuation: tuple[float, float] = (0.08, 0.02)
    #: Detector efficiency 1 - exp(-k λ) (³He); monitors count ∝ λ (thin 1/v monitors).
    detector_absorption: float = 0.35
    direct_beam_attenuation: float = 1e-3
    # --- run numbers of the associated runs (simulation only) ---
    direct_run: int = 1001
    transmission_run: int = 1002
    can_run: int = 1003
    can_transmission_run: int = 1004
    run_kind: str = "sample"

    @cached_property
    def banks(self) -> list[Bank]:
        x = (np.arange(self.pixels_x) - (self.pixels_x - 1) / 2) * self.pitch_x
        y = (np.arange(self.pixels_y) - (self.pixels_y - 1) / 2) * self.pitch_y
        yy, xx = np.meshgrid(y, x, indexing="ij")  # ids run along x first, row by row (LOQ's idfillbyfirst="x")
        offsets = np.column_stack([xx.ravel(), yy.ravel(), np.zeros(xx.size)])
        ids = np.arange(self.first_detector_id, self.first_detector_id + xx.size, dtype=np.int32)
        return [Bank("rear_detector", ids, offsets, self.l2, 0.0)]

    @property
    def tof_window(self) -> tuple[float, float]:
        """Recorded frame: the wavelength band at the detector, with a margin."""
        lo, hi = self.wavelength_min, self.wavelength_max
        far = self.l1 + float(self.banks[0].l2.max())
        return (0.9 * TOF_PER_M_A * self.incident_monitor_distance * lo, 1.05 * TOF_PER_M_A * far * hi)

    @cached_property
    def wavelengths(self) -> np.ndarray:
        return np.linspace(self.wavelength_min, self.wavelength_max, 241)

    def flux(self, wavelength: np.ndarray) -> np.ndarray:
        return moderator_spectrum(wavelength, peak=2.5)

    def transmission(self, wavelength: np.ndarray, can_only: bool = False) -> np.ndarray:
        a, b = self.can_attenuation if can_only else self.attenuation
        return np.exp(-(a + b * np.asarray(wavelength)))

    def efficiency(self, wavelength: np.ndarray) -> np.ndarray:
        return 1 - np.exp(-self.detector_absorption * np.asarray(wavelength))

    def cross_section(self, q: np.ndarray, can_only: bool = False) -> np.ndarray:
        """dΣ/dΩ (cm⁻¹): spheres (φ Δρ² V P(Q)) plus the flat background; the can alone has the background."""
        if can_only:
            return np.full_like(q, self.sample_background)
        volume = 4 / 3 * np.pi * self.sphere_radius**3  # Å³
        spheres = self.volume_fraction * self.contrast**2 * volume * sphere_form_factor(q, self.sphere_radius) * 1e8
        return spheres + self.sample_background

    @cached_property
    def solid_angle(self) -> np.ndarray:
        bank = self.banks[0]
        return self.pitch_x * self.pitch_y * np.cos(bank.two_theta) / bank.l2**2

    @cached_property
    def _rates(self) -> dict[str, np.ndarray]:
        """Detector rate per (pixel, wavelength) per unit beam time of each kind of run (flattened)."""
        bank, lam = self.banks[0], self.wavelengths
        radius = np.hypot(bank.offsets[:, 0], bank.offsets[:, 1])
        open_ = (radius > self.beam_stop_radius)[:, None]
        q = 4 * np.pi * np.sin(bank.two_theta / 2)[:, None] / lam[None, :]
        beam = self.flux(lam) * self.efficiency(lam)
        scatter = beam[None, :] * self.solid_angle[:, None] * self.sample_thickness * open_
        sample = scatter * self.transmission(lam)[None, :] * self.cross_section(q)
        can = scatter * self.transmission(lam, can_only=True)[None, :] * self.cross_section(q, can_only=True)
        # direct beam: a Gaussian spot (σ 6 mm) at the beam centre, attenuated, beam stop out
        spot = np.exp(-0.5 * (radius / 0.006) ** 2)
        direct = self.direct_beam_attenuation * spot[:, None] * beam[None, :] / spot.sum() * 3.5
        return {"sample": sample, "transmission": sample, "can": can, "can_transmission": can, "direct": direct}

    def _rate(self) -> np.ndarray:
        return self._rates[self.run_kind]

    def bank_fractions(self) -> np.ndarray:
        return np.ones(1)

    def events(self, rng: np.random.Generator, bank: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        rate = self._rate()
        pixel, index = np.divmod(categorical(rng, rate, n), rate.shape[1])
        lam = self.wavelengths
        step = lam[1] - lam[0]
        wavelength = np.clip(lam[index] + step * (rng.random(n) - 0.5), lam[0], lam[-1])
        geometry = self.banks[0]
        tof = TOF_PER_M_A * (self.l1 + geometry.l2[pixel]) * wavelength
        return geometry.detector_number[pixel], tof.astype(np.float32)

    def monitors(self, rng: np.random.Generator, events: int) -> list[Monitor]:
        """Incident and transmission monitors, Poisson counts for this run's beam time (``events`` detector events).

        The transmission monitor is in the beam (behind the sample, or in the empty beam) only in the
        transmission and direct runs; in scattering runs it is parked and counts a little background.
        """
        beam_time = events / self._rate().sum()
        edges = np.arange(*self.tof_window, 20.0)
        centres = 0.5 * (edges[1:] + edges[:-1])
        out = []
        for name, distance, gain in ((self.incident_monitor, self.incident_monitor_distance, 0.04),
                                     (self.transmission_monitor, self.transmission_monitor_distance, 0.02)):
            lam = centres / (TOF_PER_M_A * distance)
            dlam = np.diff(edges) / (TOF_PER_M_A * distance)
            inside = (lam >= self.wavelength_min) & (lam <= self.wavelength_max)
            expected = beam_time * gain * self.flux(lam) * lam * dlam * inside
            if name == self.transmission_monitor:
                if self.run_kind in ("transmission", "can_transmission"):
                    expected = expected * self.transmission(lam, can_only=self.run_kind == "can_transmission")
                elif self.run_kind != "direct":
                    expected = np.full_like(expected, 0.2)  # out of the beam
            out.append(Monitor(name, distance, edges, rng.poisson(expected).astype(np.int32)))
        return out

    def kind_of(self, run: int) -> str:
        kinds = {self.direct_run: "direct", self.transmission_run: "transmission", self.can_run: "can",
                 self.can_transmission_run: "can_transmission"}
        return kinds.get(run, "sample")

    def title(self, run: int) -> str:
        return {"sample": f"{self.sample}_SANS", "transmission": f"{self.sample}_TRANS",
                "direct": "Empty beam_TRANS", "can": f"{self.can}_SANS",
                "can_transmission": f"{self.can}_TRANS"}[self.kind_of(run)]

    def write_extras(self, entry: h5py.Group, instrument: h5py.Group) -> None:
        sample = entry["sample"]
        if self.run_kind in ("sample", "transmission"):
            nx_field(sample, "shape", "sphere dispersion")
            nx_field(sample, "thickness", self.sample_thickness * 10, "mm")
        beam_stop = nx_group(instrument, "beam_stop", "NXbeam_stop")
        nx_field(beam_stop, "status", "out" if self.run_kind == "direct" else "in")
        nx_field(beam_stop, "size", self.beam_stop_radius * 2, "m")

    def write(self, path: Path, *, run: int, rb_number: str, short_name: str, events: int, title: str,
              seed: int | None = None) -> Path:
        """Write run ``run``; a sample run first writes its missing associated runs into the same folder."""
        kind = self.kind_of(run)
        model = dataclasses.replace(self, run_kind=kind) if kind != self.run_kind else self
        if kind == "sample":
            digits = len(Path(path).stem) - len(short_name)
            for other in (self.direct_run, self.transmission_run, self.can_run, self.can_transmission_run):
                companion = Path(path).parent / f"{short_name}{other:0{digits}d}.nxs"
                if other > 0 and not companion.exists():
                    self.write(companion, run=other, rb_number=rb_number, short_name=short_name,
                               events=events if self.kind_of(other) in ("direct", "can") else max(events // 10, 1000),
                               title=self.title(other), seed=None if seed is None else seed + other)
        return write_nexus(path, model, model.name, short_name, run, rb_number, events=events, title=title,
                           seed=seed)
