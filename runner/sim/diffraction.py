"""Powder diffraction: a WISH-like diffractometer seeing the Bragg peaks of silicon."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from functools import cached_property

import h5py
import numpy as np

from runner.sim.nexus import EventNexusRuns, nx_field
from runner.sim.physics import (
    TOF_PER_M_A,
    Bank,
    Monitor,
    categorical,
    cumulative,
    moderator_spectrum,
    sample_from_density,
    tube_bank,
)


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
class PowderDiffractometer(EventNexusRuns):
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
        flux = cumulative(grid, moderator_spectrum(grid))
        lo, hi = (np.interp(t / (TOF_PER_M_A * path), grid, flux) for t in self.tof_window)
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
            pixel, component = np.divmod(categorical(rng, rates, draw), rates.shape[1])
            two_theta = geometry.two_theta[pixel]
            spread = 1 + self.resolution(two_theta) * rng.standard_normal(draw)
            d_event = d[np.minimum(component, d.size - 1)] * spread
            wavelength = 2 * np.sin(two_theta / 2) * d_event
            background = component == d.size
            grid = self.wavelengths
            wavelength[background] = sample_from_density(rng, grid, moderator_spectrum(grid), int(background.sum()))
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
        tof = TOF_PER_M_A * distance * sample_from_density(rng, grid, moderator_spectrum(grid), max(events // 2, 1000))
        return [Monitor("monitor_1", distance, edges, np.histogram(tof, edges)[0].astype(np.int32))]

    def title(self, run: int) -> str:
        return f"{self.sample} standard powder, 6 mm V can, 295 K, run {run}"

    def write_extras(self, entry: h5py.Group, instrument: h5py.Group) -> None:
        sample = entry["sample"]
        nx_field(sample, "chemical_formula", self.sample)
        nx_field(sample, "unit_cell_abc", np.full(3, self.lattice), "angstrom")
        nx_field(sample, "temperature", 295.0, "K")
