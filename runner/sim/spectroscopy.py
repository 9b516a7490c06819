"""Direct-geometry spectroscopy: chopper spectrometers (MARI, MERLIN, LET, MAPS) with an elastic line and an excitation.

One model serves the whole direct-geometry family: each instrument's ``instrument.toml`` sets the fields
of the same names (flight paths, chopper and monitor positions, detector coverage, Ei...), so the four
instruments differ by configuration only, as their shared template does.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import h5py
import numpy as np

from runner.sim.nexus import EventNexusRuns, nx_field, nx_group
from runner.sim.physics import (
    E_PER_K2,
    TOF_PER_M_A,
    Bank,
    Monitor,
    categorical,
    moderator_spectrum,
    speed,
    tube_bank,
)


@dataclass(frozen=True)
class ChopperSpectrometer(EventNexusRuns):
    """Direct-geometry spectrometer: a chopper selects Ei from the pulse; vertical tubes on an arc at ``l2``.

    Events: an elastic line (incoherent, Debye–Waller falling with Q), a dispersionless crystal-field
    excitation at ``excitation`` meV (magnetic form factor falling with Q) and a flat time background.
    Beam monitors upstream of ``pulse_distance`` (the first chopper that cuts the pulse) see the white
    beam; those after it see the monochromatic pulse, so Ei follows from two of them (Mantid's GetEi).
    Defaults are MARI-like; notebooks/<INSTRUMENT>/instrument.toml sets each instrument's real values (cited there).
    """

    name: str = "MARI"
    source_frequency: float = 50.0
    l1: float = 11.739  # moderator to sample (m)
    l2: float = 4.022  # sample to detectors (m)
    #: The chopper that sets Ei (Fermi chopper, or the last disk on LET): NeXus group, class, distance (m), speed.
    chopper: str = "fermi"
    chopper_class: str = "NXfermi_chopper"
    chopper_distance: float = 10.05
    chopper_speed: float = 300.0  # Hz
    #: Distance (m) of the first chopper that cuts the pulse; monitors beyond it see a monochromatic peak.
    pulse_distance: float = 10.05
    #: Beam monitors (named monitor_1, monitor_2, ...) by distance from the moderator (m). The default is a
    #: minimal two-monitor layout; each instrument's toml lists its real monitors.
    monitor_distances: tuple[float, ...] = (10.2, 17.0)
    #: Horizontal scattering-angle coverage [low, high] of the detector tubes (degrees), tube spacing, pixels.
    detector_two_theta: tuple[float, float] = (3.0, 134.0)
    tube_spacing: float = 1.0  # degrees
    pixels_per_tube: int = 8
    tube_height: float = 0.3  # m
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
    #: Elastic energy resolution σ as a fraction of Ei (≈3 % FWHM on MARI).
    resolution: float = 0.013
    sample: str = "CeAuAl3"
    temperature: float = 5.0

    @cached_property
    def banks(self) -> list[Bank]:
        low, high = self.detector_two_theta
        tubes = round((high - low) / self.tube_spacing) + 1
        return [tube_bank("detector_1", 1, (low + high) / 2, distance=self.l2, width_deg=high - low, tubes=tubes,
                          pixels=self.pixels_per_tube, height=self.tube_height)]

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
        pixel, component = np.divmod(categorical(rng, self.rates, n), 3)
        excited = component == 1
        centre = np.where(excited, self.excitation, 0.0)
        width = np.hypot(self.sigma(centre), np.where(excited, self.excitation_width, 0.0))
        final = np.clip(self.incident_energy - centre - width * rng.standard_normal(n), 0.05 * self.incident_energy,
                        None)
        tof = 1e6 * (self.l1 / speed(self.incident_energy) + geometry.l2[pixel] / speed(final))
        background = component == 2
        tof[background] = rng.uniform(*self.tof_window, int(background.sum()))
        return geometry.detector_number[pixel], np.clip(tof, *self.tof_window).astype(np.float32)

    def monitors(self, rng: np.random.Generator, events: int) -> list[Monitor]:
        """Beam monitors: a white-beam spectrum before the pulse-cutting chopper, the monochromatic pulse after it."""
        frame = 1e6 / self.source_frequency
        edges = np.arange(0.0, max(frame, self.tof_window[1]) + 1, 2.0)
        v = speed(self.incident_energy)
        out = []
        for index, distance in enumerate(self.monitor_distances, start=1):
            counts = max(int(events * 0.3), 1000)
            if distance < self.pulse_distance:
                wavelength = np.linspace(0.3, 12.0, 4000)
                density = moderator_spectrum(wavelength)
                lam = np.interp(rng.random(counts) * np.cumsum(density)[-1], np.cumsum(density), wavelength)
                tof = TOF_PER_M_A * distance * lam
            else:
                t = distance / v * 1e6
                # pulse width: chopper opening (~10 µs) plus the energy spread growing with distance
                spread = t * self.resolution / 2 * (distance - self.pulse_distance) / distance
                tof = t + np.hypot(10.0, spread) * rng.standard_normal(counts)
            out.append(Monitor(f"monitor_{index}", distance, edges, np.histogram(tof, edges)[0].astype(np.int32)))
        return out

    def title(self, run: int) -> str:
        return f"{self.sample} {self.temperature:g}K Ei={self.incident_energy:g}meV {self.chopper_speed:g}Hz, run {run}"

    def write_extras(self, entry: h5py.Group, instrument: h5py.Group) -> None:
        chopper = nx_group(instrument, self.chopper, self.chopper_class)
        nx_field(chopper, "energy", self.incident_energy, "meV")
        nx_field(chopper, "rotation_speed", self.chopper_speed, "Hz")
        nx_field(chopper, "distance", self.chopper_distance - self.l1, "m")
        sample = entry["sample"]
        nx_field(sample, "chemical_formula", self.sample)
        nx_field(sample, "temperature", self.temperature, "K")
