"""Powder diffraction: time-of-flight diffractometers (WISH, POLARIS, GEM, HRPD) seeing the Bragg peaks of a standard.

One model serves the whole ``powder-diffraction`` family: each instrument's ``instrument.toml`` sets its
flight paths, bank angles, time-of-flight frame, resolution and sample (``[constants]``/``[simulation]``),
so a simulated run is drawn from that instrument's geometry and a known crystal, and a reduction can be
checked against the true d-spacings.
"""

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

SILICON_A = 5.43102  # Å, NIST SRM 640 lattice parameter
CERIA_A = 5.411651  # Å, NIST SRM 674b (CeO2) lattice parameter
FERRITE_A = 2.8665  # Å, bcc iron (ferritic steel) at room temperature

#: Coherent neutron scattering lengths (fm), Sears, Neutron News 3 (1992) 26.
SCATTERING_LENGTH_FM = {"Si": 4.1491, "Ce": 4.84, "O": 5.803, "Fe": 9.45, "Ni": 10.3, "Al": 3.449}

_FCC = ((0, 0, 0), (0, 0.5, 0.5), (0.5, 0, 0.5), (0.5, 0.5, 0))
_BCC = ((0, 0, 0), (0.5, 0.5, 0.5))


def _cell(lattice: tuple[tuple[float, float, float], ...],
          basis: tuple[tuple[str, tuple[float, float, float]], ...]) -> tuple[tuple[str, np.ndarray], ...]:
    return tuple((element, np.add(t, x) % 1.0) for t in lattice for element, x in basis)


#: Atoms of the conventional cubic cell of each structure, by the sample's chemical formula.
STRUCTURES: dict[str, tuple[tuple[str, np.ndarray], ...]] = {
    "Si": _cell(_FCC, (("Si", (0, 0, 0)), ("Si", (0.25, 0.25, 0.25)))),  # diamond, Fd-3m
    "CeO2": _cell(_FCC, (("Ce", (0, 0, 0)), ("O", (0.25, 0.25, 0.25)), ("O", (0.75, 0.75, 0.75)))),  # fluorite
    "Fe": _cell(_BCC, (("Fe", (0, 0, 0)),)),  # ferrite, Im-3m
    "Ni": _cell(_FCC, (("Ni", (0, 0, 0)),)),  # Fm-3m
    "Al": _cell(_FCC, (("Al", (0, 0, 0)),)),  # Fm-3m
}


def cubic_reflections(sample: str, a: float, d_min: float, b_iso: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """d-spacings (Å) and relative integrated intensities of the reflections of a cubic crystal ``sample``.

    |F|² from the atoms of the conventional cell (``STRUCTURES``) and their scattering lengths;
    reflections at the same d-spacing (e.g. (511)/(333)) are merged. Intensity = multiplicity × |F|² ×
    d⁴ (time-of-flight Lorentz factor) × Debye–Waller factor exp(-B/2d²) with B = ``b_iso`` Å².
    """
    try:
        atoms = STRUCTURES[sample]
    except KeyError:
        raise ValueError(f"no crystal structure for sample {sample!r}; known: {', '.join(STRUCTURES)}") from None
    positions = np.array([x for _, x in atoms])
    lengths = np.array([SCATTERING_LENGTH_FM[element] for element, _ in atoms])
    hmax = int(a / d_min) + 1
    # every (h, k, l), so that summing |F|² over equivalent reflections gives multiplicity × |F|²
    hkl = np.array(list(itertools.product(range(-hmax, hmax + 1), repeat=3)))
    q2 = (hkl**2).sum(axis=1)
    hkl, q2 = hkl[(q2 > 0) & (q2 <= (a / d_min) ** 2)], q2[(q2 > 0) & (q2 <= (a / d_min) ** 2)]
    f2 = np.abs(np.exp(2j * np.pi * hkl @ positions.T) @ lengths) ** 2
    allowed = f2 > 1e-6 * lengths.sum() ** 2
    q2s, summed = np.unique(q2[allowed], return_inverse=True)
    total = np.bincount(summed, weights=f2[allowed])
    d = a / np.sqrt(q2s.astype(float))
    intensity = total * d**4 * np.exp(-b_iso / (2 * d**2))
    return d, intensity / intensity.max()


def diamond_reflections(a: float, d_min: float) -> tuple[np.ndarray, np.ndarray]:
    """Reflections of a diamond-structure crystal (silicon) of lattice parameter ``a``; see cubic_reflections."""
    return cubic_reflections("Si", a, d_min)


@dataclass(frozen=True)
class PowderDiffractometer(EventNexusRuns):
    """A time-of-flight powder diffractometer; the defaults are WISH (40 m, 10 Hz, five banks from 27° to 153°).

    Events come from the Bragg peaks of the sample (``sample``, a cubic crystal of lattice ``lattice``)
    weighted by the moderator flux at each peak's wavelength, on an incoherent background with the same
    flux shape. Each detected d-spacing is spread by the resolution ``hypot(delta_theta·cot θ, delta_t)``.
    """

    name: str = "WISH"
    source_frequency: float = 10.0
    l1: float = 40.0
    #: Secondary flight path of every bank (m), unless ``bank_l2`` gives one per bank.
    l2: float = 2.2
    tof_window: tuple[float, float] = (6000.0, 99000.0)
    event_rate: float = 2000.0
    proton_current: float = 40.0
    first_run: int = 38237
    #: Scattering angle 2θ of each bank's centre (deg); negative angles are on the other side of the beam.
    bank_two_theta: tuple[float, ...] = (27.08, 58.33, 90.0, 121.66, 152.92)
    bank_l2: tuple[float, ...] = ()
    #: Horizontal 2θ coverage of each bank (deg), unless all banks share ``bank_width``.
    bank_widths: tuple[float, ...] = ()
    bank_width: float = 24.0
    bank_height: float = 1.0
    tubes: int = 16
    pixels: int = 32
    #: Distance of the incident-beam monitor before the sample (m).
    monitor_distance: float = 2.0
    sample: str = "Si"
    lattice: float = SILICON_A
    background_fraction: float = 0.25
    #: Angular uncertainty (rad) and time/flight-path term of the resolution Δd/d.
    delta_theta: float = 0.002
    delta_t: float = 0.0008

    def __post_init__(self) -> None:
        banks = len(self.bank_two_theta)
        for field, values in (("bank_l2", self.bank_l2), ("bank_widths", self.bank_widths)):
            if values and len(values) != banks:
                raise ValueError(f"{self.name}: {field} has {len(values)} values for {banks} banks")
        if self.sample not in STRUCTURES:
            raise ValueError(f"{self.name}: no crystal structure for sample {self.sample!r}")

    @cached_property
    def banks(self) -> list[Bank]:
        l2s = self.bank_l2 or (self.l2,) * len(self.bank_two_theta)
        widths = self.bank_widths or (self.bank_width,) * len(self.bank_two_theta)
        return [tube_bank(self.bank_name(i), (i + 1) * 100_000, angle, distance=l2, width_deg=width,
                          tubes=self.tubes, pixels=self.pixels, height=self.bank_height)
                for i, (angle, l2, width) in enumerate(zip(self.bank_two_theta, l2s, widths, strict=True))]

    def bank_name(self, index: int) -> str:
        return f"bank_{index + 1}"

    @cached_property
    def reflections(self) -> tuple[np.ndarray, np.ndarray]:
        return cubic_reflections(self.sample, self.lattice, d_min=0.3)

    @cached_property
    def wavelengths(self) -> np.ndarray:
        """Wavelength grid (Å) covering the recorded frame for every pixel."""
        paths = np.concatenate([self.l1 + bank.l2 for bank in self.banks])
        lo, hi = np.array(self.tof_window) / TOF_PER_M_A
        return np.linspace(lo / paths.max(), hi / paths.min(), 4000)

    @cached_property
    def flux_log_slope(self) -> np.ndarray:
        """dln F / dln λ of the moderator flux on the ``wavelengths`` grid."""
        grid = self.wavelengths
        return np.gradient(np.log(moderator_spectrum(grid)), np.log(grid))

    def pixel_strain(self, bank: Bank) -> np.ndarray:
        """Elastic strain of the lattice planes each pixel sees (none: a stress-free powder)."""
        return np.zeros(bank.detector_number.size)

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

    @cached_property
    def strains(self) -> list[np.ndarray]:
        return [self.pixel_strain(bank) for bank in self.banks]

    def bank_fractions(self) -> np.ndarray:
        totals = np.array([r.sum() for r in self.rates])
        return totals / totals.sum()

    def resolution(self, two_theta: np.ndarray) -> np.ndarray:
        """Relative Gaussian width σ_d/d: angular term Δθ·cot θ plus the time/flight-path term."""
        return np.hypot(self.delta_theta / np.tan(two_theta / 2), self.delta_t)

    def events(self, rng: np.random.Generator, bank: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        geometry, rates, strain = self.banks[bank], self.rates[bank], self.strains[bank]
        d, _ = self.reflections
        ids, tofs = [], []
        missing = n
        while missing > 0:  # peak tails and background beyond the frame are rejected, so draw a little more
            draw = int(missing * 1.02) + 16
            pixel, component = np.divmod(categorical(rng, rates, draw), rates.shape[1])
            two_theta = geometry.two_theta[pixel]
            d_peak = d[np.minimum(component, d.size - 1)] * (1 + strain[pixel])
            # a Gaussian peak seen through the incident flux F(λ): the flux's slope across the peak tilts it,
            # which moves its centre by σ² · dlnF/dlnλ (so a flux-normalised peak sits at d_peak)
            sigma = self.resolution(two_theta)
            tilt = np.interp(2 * np.sin(two_theta / 2) * d_peak, self.wavelengths, self.flux_log_slope)
            d_event = d_peak * (1 + sigma * rng.standard_normal(draw) + sigma**2 * tilt)
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
        """Incident-beam monitor ``monitor_distance`` before the sample: the moderator spectrum in time of flight."""
        distance = self.l1 - self.monitor_distance
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
