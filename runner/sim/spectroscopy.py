"""Direct-geometry spectroscopy: a MARI-like chopper spectrometer with an elastic line and an excitation."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import h5py
import numpy as np

from runner.sim.nexus import EventNexusRuns, nx_field, nx_group
from runner.sim.physics import E_PER_K2, Bank, Monitor, categorical, speed, tube_bank


@dataclass(frozen=True)
class ChopperSpectrometer(EventNexusRuns):
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
        pixel, component = np.divmod(categorical(rng, self.rates, n), 3)
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
        chopper = nx_group(instrument, "fermi", "NXfermi_chopper")
        nx_field(chopper, "energy", self.incident_energy, "meV")
        nx_field(chopper, "rotation_speed", 300.0, "Hz")
        nx_field(chopper, "distance", self.chopper_distance - self.l1, "m")
        nx_field(chopper, "type", "Gd (A) chopper")
        sample = entry["sample"]
        nx_field(sample, "chemical_formula", self.sample)
        nx_field(sample, "temperature", self.temperature, "K")
