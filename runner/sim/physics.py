"""Physics shared by the simulated instruments: neutron kinematics, moderator flux, detector geometry, sampling.

Simulated runs are drawn from known physics so that a template's result can be checked against the
truth, not just against "it ran" (see the instrument models beside this module).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Protocol

import h5py
import numpy as np
import scipp.constants as const

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


def cumulative(x: np.ndarray, density: np.ndarray) -> np.ndarray:
    """Running trapezoidal integral of a tabulated density, starting at 0."""
    return np.concatenate([[0.0], np.cumsum(0.5 * (density[1:] + density[:-1]) * np.diff(x))])


def sample_from_density(rng: np.random.Generator, x: np.ndarray, density: np.ndarray, n: int) -> np.ndarray:
    """Inverse-CDF sampling of a tabulated density (linear interpolation between grid points)."""
    cdf = cumulative(x, density)
    return np.interp(rng.random(n) * cdf[-1], cdf, x)


def categorical(rng: np.random.Generator, weights: np.ndarray, n: int) -> np.ndarray:
    """``n`` indices into the flattened ``weights`` (vectorised; far faster than a Python loop)."""
    cdf = np.cumsum(weights.ravel())
    return np.minimum(np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right"), cdf.size - 1)


class SimulatedInstrument(Protocol):
    """What ``nbreduce simulate`` needs of an instrument model: run numbering, titles and its file format.

    Models are (frozen) dataclasses built by :func:`runner.sim.runs.instrument_model` from the
    instrument's ``instrument.toml``: its ``[constants]`` set the dataclass fields of the same name.
    """

    name: str
    first_run: int

    def title(self, run: int) -> str: ...

    def write(self, path: Path, *, run: int, rb_number: str, short_name: str, events: int, title: str,
              seed: int | None = None) -> Path:
        """Write one run's data file at ``path`` (atomically) in the format the real instrument writes."""
        ...


class InstrumentModel(SimulatedInstrument, Protocol):
    """An event-mode neutron instrument, as :func:`runner.sim.nexus.write_nexus` needs it: geometry,
    events, monitors and its own metadata."""

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
