"""Neutron reflectometry: a time-of-flight reflectometer (INTER, OFFSPEC, POLREF, SURF, CRISP) and its runs.

A reflectivity measurement is a set of runs: the sample at a few angles θ (the ``theta`` log of each run;
slits opened in proportion to θ), and one **direct-beam** run per slit setting (sample out, detector at
2θ = 0; title containing ``trans``, the convention ISIS reflectometry autoreduction tests). The sample is a
single layer on a substrate; its reflectivity is computed here with the Abelès matrix method (Névot-Croce
roughness), independently of refnx, which the template uses to fit it.

Run numbers: sample runs cycle through ``angles`` from ``first_run`` (run ``first_run + i`` is at angle
``i % len(angles)``); the direct-beam run of angle ``i`` is ``direct_first_run + i``. Writing a sample run
also writes its direct-beam run next to it when it is not there yet. At the lowest angle the beam is higher
than the sample's footprint (over-illumination), so that angle's reflectivity is low by a known factor that
stitching has to correct. Ground truth: ``layer_thickness`` (Å) and the substrate's critical edge
``critical_edge`` (Å⁻¹).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import h5py
import numpy as np

from runner.sim.nexus import nx_field, nx_group, write_nexus
from runner.sim.physics import TOF_PER_M_A, Bank, Monitor, moderator_spectrum


def abeles(q: np.ndarray, slds: np.ndarray, thicknesses: np.ndarray, roughnesses: np.ndarray) -> np.ndarray:
    """Specular reflectivity of a layer stack (fronting, layers..., backing) by the Abelès characteristic matrices.

    ``slds`` (Å⁻²) has one entry per medium, ``thicknesses`` one per inner layer (Å), ``roughnesses`` one per
    interface (Å, Névot-Croce factors).
    """
    q = np.asarray(q, dtype=float)
    kz = np.sqrt((q[:, None] / 2) ** 2 - 4 * np.pi * (slds[None, :] - slds[0]) + 0j)
    r = (kz[:, :-1] - kz[:, 1:]) / (kz[:, :-1] + kz[:, 1:]) * np.exp(-2 * kz[:, :-1] * kz[:, 1:] * roughnesses**2)
    m00 = np.ones_like(q, dtype=complex)
    m01 = np.zeros_like(m00)
    m10 = np.zeros_like(m00)
    m11 = np.ones_like(m00)
    for j in range(r.shape[1]):
        beta = 1j * kz[:, j] * (thicknesses[j - 1] if j > 0 else 0.0)
        c00, c01 = np.exp(beta), r[:, j] * np.exp(beta)
        c10, c11 = r[:, j] * np.exp(-beta), np.exp(-beta)
        m00, m01, m10, m11 = (m00 * c00 + m01 * c10, m00 * c01 + m01 * c11,
                              m10 * c00 + m11 * c10, m10 * c01 + m11 * c11)
    return np.abs(m10 / m00) ** 2


@dataclass(frozen=True)
class Reflectometer:
    """A time-of-flight reflectometer with a vertical linear detector at ``l2`` behind the sample, which moves
    to 2θ. Defaults are INTER's."""

    name: str = "INTER"
    source_frequency: float = 10.0  # Hz
    l1: float = 17.037  # moderator to sample (m)
    l2: float = 3.163  # sample to linear detector (m)
    pixels: int = 243
    pixel_pitch: float = 0.0012  # m
    first_detector_id: int = 2001
    wavelength_min: float = 1.5  # Å
    wavelength_max: float = 17.0  # Å
    incident_monitor: str = "monitor_2"
    monitor_distance: float = 13.791  # from the moderator (m)
    theta_log: str = "Theta"
    slit_logs: tuple[str, str] = ("S1VG", "S2VG")
    angles: tuple[float, ...] = (0.5, 1.2, 2.5)  # θ (deg)
    #: Slit gaps (mm) per angle: the first slit, the second (which sets the beam height at the sample).
    slit_gaps: tuple[tuple[float, float], ...] = ((1.2, 0.6), (2.4, 1.2), (5.0, 2.4))
    sample_length: float = 60.0  # mm along the beam
    angular_resolution: float = 0.01  # σ_θ / θ
    event_rate: float = 3000.0
    proton_current: float = 40.0
    first_run: int = 2010
    direct_first_run: int = 2001
    # --- sample (ground truth) ---
    sample: str = "Ti 200A on Si"
    layer_thickness: float = 200.0  # Å
    layer_sld: float = -1.95e-6  # Å⁻² (titanium)
    substrate_sld: float = 2.07e-6  # Å⁻² (silicon)
    roughness: float = 4.0  # Å, both interfaces
    background: float = 2e-7  # reflectivity-equivalent flat background
    angle_index: int = 0
    direct: bool = False

    @property
    def critical_edge(self) -> float:
        """Q_c of total reflection from the substrate (Å⁻¹)."""
        return 4 * np.sqrt(np.pi * self.substrate_sld)

    def reflectivity(self, q: np.ndarray) -> np.ndarray:
        slds = np.array([0.0, self.layer_sld, self.substrate_sld])
        return abeles(q, slds, np.array([self.layer_thickness]), np.full(2, self.roughness)) + self.background

    @property
    def theta(self) -> float:
        return 0.0 if self.direct else self.angles[self.angle_index]

    def footprint_fraction(self, index: int) -> float:
        """Share of the beam (height = second slit gap) that the sample intercepts at angle ``index``."""
        height = self.slit_gaps[index][1]
        return float(min(1.0, self.sample_length * np.sin(np.radians(self.angles[index])) / height))

    @cached_property
    def banks(self) -> list[Bank]:
        # the detector is centred on the specular (or direct) beam: pixel rows above and below it
        rows = (np.arange(self.pixels) - self.pixels // 2) * self.pixel_pitch
        height = self.l2 * np.tan(np.radians(2 * self.theta))
        offsets = np.column_stack([np.zeros(self.pixels), rows + height, np.zeros(self.pixels)])
        ids = np.arange(self.first_detector_id, self.first_detector_id + self.pixels, dtype=np.int32)
        return [Bank("linear_detector", ids, offsets, self.l2, 0.0)]

    @property
    def tof_window(self) -> tuple[float, float]:
        return (0.9 * TOF_PER_M_A * self.monitor_distance * self.wavelength_min,
                1.02 * TOF_PER_M_A * (self.l1 + self.l2 + 0.2) * self.wavelength_max)

    @cached_property
    def wavelengths(self) -> np.ndarray:
        return np.linspace(self.wavelength_min, self.wavelength_max, 2000)

    def flux(self, wavelength: np.ndarray) -> np.ndarray:
        return moderator_spectrum(wavelength, peak=2.5 if self.wavelength_max > 10 else 1.6)

    def _spectrum(self) -> np.ndarray:
        """Detected rate per Å of wavelength per unit beam time (the beam intensity scales with the slit gaps)."""
        index = self.angle_index
        beam = self.flux(self.wavelengths) * self.slit_gaps[index][0] * self.slit_gaps[index][1]
        if self.direct:
            return beam
        q = 4 * np.pi * np.sin(np.radians(self.theta)) / self.wavelengths
        return beam * self.reflectivity(q) * self.footprint_fraction(index)

    def bank_fractions(self) -> np.ndarray:
        return np.ones(1)

    def events(self, rng: np.random.Generator, bank: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        grid = self.wavelengths
        spectrum = self._spectrum()
        cdf = np.concatenate([[0.0], np.cumsum(0.5 * (spectrum[1:] + spectrum[:-1]) * np.diff(grid))])
        wavelength = np.interp(rng.random(n) * cdf[-1], cdf, grid)
        if not self.direct:
            # angular divergence: the event's true θ differs from the nominal one; Q is conserved along the
            # reflected ray, so an event at θ' has the wavelength λ·sin θ'/sin θ for the same reflectivity
            theta = np.radians(self.theta)
            spread = theta * (1 + self.angular_resolution * rng.standard_normal(n))
            wavelength = wavelength * np.sin(spread) / np.sin(theta)
        # the beam lands within ±1 pixel of the specular (direct) position
        pixel = np.clip(self.pixels // 2 + np.rint(0.7 * rng.standard_normal(n)).astype(int), 0, self.pixels - 1)
        geometry = self.banks[0]
        wavelength = np.clip(wavelength, self.wavelength_min, self.wavelength_max)
        tof = TOF_PER_M_A * (self.l1 + geometry.l2[pixel]) * wavelength
        return geometry.detector_number[pixel], tof.astype(np.float32)

    def monitors(self, rng: np.random.Generator, events: int) -> list[Monitor]:
        """The incident monitor for this run's beam time (``events`` detector events), Poisson counts."""
        grid = self.wavelengths
        spectrum = self._spectrum()
        beam_time = events / float(np.sum(0.5 * (spectrum[1:] + spectrum[:-1]) * np.diff(grid)))
        edges = np.arange(*self.tof_window, 50.0)
        centres = 0.5 * (edges[1:] + edges[:-1])
        lam = centres / (TOF_PER_M_A * self.monitor_distance)
        dlam = np.diff(edges) / (TOF_PER_M_A * self.monitor_distance)
        inside = (lam >= self.wavelength_min) & (lam <= self.wavelength_max)
        gaps = self.slit_gaps[self.angle_index]
        expected = beam_time * 0.5 * self.flux(lam) * lam * dlam * inside * gaps[0] * gaps[1]
        return [Monitor(self.incident_monitor, self.monitor_distance, edges, rng.poisson(expected).astype(np.int32))]

    def kind_of(self, run: int) -> tuple[bool, int]:
        """(direct, angle index) of run ``run``."""
        if self.direct_first_run <= run < self.direct_first_run + len(self.angles):
            return True, run - self.direct_first_run
        return False, (run - self.first_run) % len(self.angles)

    def title(self, run: int) -> str:
        direct, index = self.kind_of(run)
        s1, s2 = self.slit_gaps[index]
        if direct:
            return f"direct beam trans s1={s1:g} s2={s2:g}"
        return f"{self.sample} th={self.angles[index]:g}"

    def write_extras(self, entry: h5py.Group, instrument: h5py.Group) -> None:
        """ISIS sample-environment logs (``selog/<name>/value_log``): θ and the slit gaps (mm)."""
        selog = entry.require_group("selog")
        selog.attrs["NX_class"] = "IXselog"
        s1, s2 = self.slit_gaps[self.angle_index]
        for name, value, unit in ((self.theta_log, self.theta, "deg"), (self.slit_logs[0], s1, "mm"),
                                  (self.slit_logs[1], s2, "mm")):
            log = nx_group(nx_group(selog, name, "IXseblock"), "value_log", "NXlog")
            nx_field(log, "time", np.array([0.0, 1.0]), "s", start=entry["start_time"][()])
            nx_field(log, "value", np.array([value, value], dtype=float), unit)
        nx_field(entry["sample"], "length", self.sample_length, "mm")

    def write(self, path: Path, *, run: int, rb_number: str, short_name: str, events: int, title: str,
              seed: int | None = None) -> Path:
        """Write run ``run``; a sample run first writes its missing direct-beam run into the same folder."""
        direct, index = self.kind_of(run)
        model = dataclasses.replace(self, direct=direct, angle_index=index)
        if not direct:
            digits = len(Path(path).stem) - len(short_name)
            other = self.direct_first_run + index
            companion = Path(path).parent / f"{short_name}{other:0{digits}d}.nxs"
            if not companion.exists():
                self.write(companion, run=other, rb_number=rb_number, short_name=short_name, events=events,
                           title=self.title(other), seed=None if seed is None else seed + other)
        return write_nexus(path, model, model.name, short_name, run, rb_number, events=events, title=title,
                           seed=seed)
