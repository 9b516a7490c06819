"""Indirect-geometry spectroscopy: analyser spectrometers (OSIRIS, IRIS, TOSCA) with known quasi-elastic and
vibrational truth.

A white (chopper-banded) incident beam reaches the sample; analyser crystals reflect one final energy Ef to
each detector, so the time of flight t = L1/v(Ei) + L2/v(Ef) gives Ei and the energy transfer ΔE = Ei − Ef.
Detector pixels sit at their *neutronic* positions (scattering angle 2θ at the analyser, distance = the
secondary flight path L2), as Mantid's ISIS indirect instrument definitions place them.
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
    cumulative,
    moderator_spectrum,
    sample_from_density,
    speed,
    tube_bank,
)

#: E[meV] = E_PER_A2 / λ²[Å²]
E_PER_A2 = E_PER_K2 * (2 * np.pi) ** 2
FWHM_PER_SIGMA = 2 * np.sqrt(2 * np.log(2))


def wavelength(energy_mev: np.ndarray | float) -> np.ndarray:
    return np.sqrt(E_PER_A2 / np.asarray(energy_mev, dtype=float))


@dataclass(frozen=True)
class IndirectSpectrometer(EventNexusRuns):
    """Inverted-geometry spectrometer: analyser banks at fixed Ef; a sample with a quasi-elastic signal and peaks.

    The sample's S(Q, ΔE): an elastic line weighted by the EISF of a methyl-like 3-site rotation (jump radius
    ``jump_radius``), a Lorentzian of HWHM ``quasielastic_hwhm`` (Q-independent, as for a localised motion)
    weighted by 1 − EISF, vibrational lines at ``vibrational_peaks`` (intensity ∝ Q² e^(−Q²⟨u²⟩/3)), and a
    flat time background. The incident flux (moderator spectrum) weights every component; the incident
    monitor records the same flux, so a monitor-normalised reduction recovers S(ΔE).
    Measured energies are smeared by a Gaussian resolution of FWHM ``resolution_fwhm`` ⊕ ``resolution_fraction``·Ei.
    Defaults are IRIS's (see notebooks/IRIS/instrument.toml for the sources).
    """

    name: str = "IRIS"
    source_frequency: float = 50.0
    l1: float = 36.41
    #: Per analyser bank: scattering-angle range [low, high] (deg), number of detectors, L2 (m), final energy (meV).
    bank_two_theta: tuple[tuple[float, float], ...] = ((27.07, 158.40),)
    bank_pixels: tuple[int, ...] = (51,)
    bank_l2: tuple[float, ...] = (1.45,)
    final_energies: tuple[float, ...] = (1.845,)
    analyser: str = "PG002"
    #: Incident (before the sample) and transmission (after it) monitors, distance from the moderator (m).
    monitor_distances: tuple[float, ...] = (36.055, 38.759)
    monitor_counts: int = 2_000_000
    #: Energy transfers (meV) passed by the choppers' wavelength band.
    energy_window: tuple[float, float] = (-0.6, 0.6)
    moderator_peak: float = 2.5  # Å, peak of the moderator's Maxwellian
    resolution_fwhm: float = 0.0175  # meV
    resolution_fraction: float = 0.0  # FWHM growing with Ei (TOSCA)
    quasielastic_hwhm: float = 0.04  # meV, Lorentzian Γ
    jump_radius: float = 1.03  # Å
    vibrational_peaks: tuple[float, ...] = ()
    vibrational_intensities: tuple[float, ...] = ()
    #: Fractions of the sample's events: quasi-elastic region (elastic + Lorentzian), vibrational, background.
    fractions: tuple[float, float, float] = (0.9, 0.0, 0.1)
    msd: float = 0.02  # Å², Debye–Waller
    event_rate: float = 2000.0
    proton_current: float = 150.0
    first_run: int = 1
    sample: str = "CH3-rotor powder"
    temperature: float = 100.0

    @cached_property
    def banks(self) -> list[Bank]:
        banks, first = [], 1
        for index, ((low, high), n, l2) in enumerate(zip(self.bank_two_theta, self.bank_pixels, self.bank_l2,
                                                          strict=True), start=1):
            banks.append(tube_bank(f"bank_{index}", first, (low + high) / 2, distance=l2, width_deg=high - low,
                                   tubes=n, pixels=1, height=0.0))
            first += 1000
        return banks

    def bank_fractions(self) -> np.ndarray:
        totals = np.array([rates.sum() for rates in self.rates])
        return totals / totals.sum()

    @cached_property
    def tof_window(self) -> tuple[float, float]:
        """Recorded frame (µs): the chopper band's flight times to every bank, with a margin."""
        times = [1e6 * (self.l1 / speed(ef + de) + l2 / speed(ef))
                 for ef, l2 in zip(self.final_energies, self.bank_l2, strict=True)
                 for de in (self.energy_window[0], self.energy_window[1])]
        return 0.95 * min(times), 1.05 * max(times)

    def flux(self, energy: np.ndarray) -> np.ndarray:
        """Incident flux per meV at ``energy`` (inside the chopper band; the band is applied by the callers)."""
        lam = wavelength(energy)
        return moderator_spectrum(lam, self.moderator_peak) * lam / (2 * np.asarray(energy))

    def sigma(self, energy_transfer: np.ndarray, final_energy: float) -> np.ndarray:
        """Gaussian resolution σ (meV) at ``energy_transfer``."""
        fwhm = np.hypot(self.resolution_fwhm, self.resolution_fraction * (final_energy + np.asarray(energy_transfer)))
        return fwhm / FWHM_PER_SIGMA

    def eisf(self, q: np.ndarray) -> np.ndarray:
        """Elastic incoherent structure factor of jumps between 3 sites on a circle of radius ``jump_radius``."""
        return (1 + 2 * np.sinc(q * self.jump_radius * np.sqrt(3) / np.pi)) / 3

    def _q(self, two_theta: np.ndarray, final_energy: float, energy_transfer: float) -> np.ndarray:
        kf = np.sqrt(final_energy / E_PER_K2)
        ki = np.sqrt((final_energy + energy_transfer) / E_PER_K2)
        return np.sqrt(ki**2 + kf**2 - 2 * ki * kf * np.cos(two_theta))

    def _lorentzian_grid(self, final_energy: float) -> tuple[np.ndarray, np.ndarray]:
        """Flux-weighted Lorentzian on a grid over the chopper band: the quasi-elastic energies' density."""
        x = np.linspace(*self.energy_window, 20001)
        gamma = self.quasielastic_hwhm
        return x, gamma / np.pi / (x**2 + gamma**2) * self.flux(final_energy + x)

    @cached_property
    def components(self) -> int:
        return 3 + len(self.vibrational_peaks)

    @cached_property
    def rates(self) -> list[np.ndarray]:
        """Event rates per bank, (pixel, component): elastic, quasi-elastic, background, vibrational lines."""
        low, high = self.energy_window
        peaks = [(e, i) for e, i in zip(self.vibrational_peaks, self.vibrational_intensities, strict=True)
                 if low < e < high]
        columns = []
        for bank, ef in zip(self.banks, self.final_energies, strict=True):
            q = self._q(bank.two_theta, ef, 0.0)
            dw = np.exp(-self.msd * q**2 / 3)
            x, density = self._lorentzian_grid(ef)
            elastic = self.eisf(q) * dw * self.flux(ef)
            quasi = (1 - self.eisf(q)) * dw * cumulative(x, density)[-1]
            vib = [i * self._q(bank.two_theta, ef, e) ** 2 * np.exp(-self.msd * self._q(bank.two_theta, ef, e) ** 2 / 3)
                   * self.flux(ef + e) for e, i in peaks]
            vib += [np.zeros_like(q)] * (len(self.vibrational_peaks) - len(peaks))
            columns.append((elastic, quasi, np.ones_like(q), vib))
        qens_total = sum(e.sum() + qe.sum() for e, qe, _, _ in columns) or 1.0
        vib_total = sum(sum(v.sum() for v in vib) for *_, vib in columns) or 1.0
        background_total = sum(b.sum() for _, _, b, _ in columns)
        f_qens, f_vib, f_background = self.fractions
        return [np.column_stack([e / qens_total * f_qens, qe / qens_total * f_qens, b / background_total * f_background,
                                 *(v / vib_total * f_vib for v in vib)])
                for e, qe, b, vib in columns]

    def events(self, rng: np.random.Generator, bank: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        geometry, ef = self.banks[bank], self.final_energies[bank]
        pixel, component = np.divmod(categorical(rng, self.rates[bank], n), self.components)
        energy = np.zeros(n)
        quasi = component == 1
        x, density = self._lorentzian_grid(ef)
        energy[quasi] = sample_from_density(rng, x, density, int(quasi.sum()))
        for k, peak in enumerate(self.vibrational_peaks):
            energy[component == 3 + k] = peak
        measured = energy + self.sigma(energy, ef) * rng.standard_normal(n)
        incident = np.clip(ef + measured, 0.05 * ef, None)
        tof = 1e6 * (self.l1 / speed(incident) + geometry.l2[pixel] / speed(ef))
        background = component == 2
        tof[background] = rng.uniform(*self.tof_window, int(background.sum()))
        return geometry.detector_number[pixel], np.clip(tof, *self.tof_window).astype(np.float32)

    def monitors(self, rng: np.random.Generator, events: int) -> list[Monitor]:
        """Incident and transmission monitors: the flux of the chopper band, histogrammed in time of flight."""
        low = min(self.final_energies) + self.energy_window[0]
        high = max(self.final_energies) + self.energy_window[1]
        out = []
        for index, distance in enumerate(self.monitor_distances, start=1):
            t_fast, t_slow = (TOF_PER_M_A * distance * wavelength(e) for e in (high, low))
            edges = np.arange(np.floor(0.9 * t_fast), np.ceil(1.1 * t_slow) + 2.0, 2.0)
            energy_edges = E_PER_A2 / (edges / (TOF_PER_M_A * distance)) ** 2
            grid = np.linspace(low, high, 20001)
            cdf = cumulative(grid, self.flux(grid))
            # expected counts per time bin: the band's flux between the bin's edge energies (energy falls with time)
            share = -np.diff(np.interp(energy_edges, grid, cdf, left=0.0, right=cdf[-1])) / cdf[-1]
            transmission = 1.0 if index == 1 else 0.9
            counts = rng.poisson(self.monitor_counts * transmission * share).astype(np.int32)
            out.append(Monitor(f"monitor_{index}", distance, edges, counts))
        return out

    def title(self, run: int) -> str:
        return f"{self.sample} {self.temperature:g}K {self.analyser}, run {run}"

    def write_extras(self, entry: h5py.Group, instrument: h5py.Group) -> None:
        for index, ef in enumerate(self.final_energies, start=1):
            crystal = nx_group(instrument, f"analyser_{index}", "NXcrystal")
            nx_field(crystal, "type", self.analyser)
            nx_field(crystal, "wavelength", float(wavelength(ef)), "angstrom")
        sample = entry["sample"]
        nx_field(sample, "temperature", self.temperature, "K")
