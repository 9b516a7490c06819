"""Engineering diffraction: an ENGIN-X-like strain scanner measuring a known elastic strain in a steel sample.

Two banks at 2θ = ±90° (North on the left of the beam seen from the source, South on the right) each
see the lattice planes whose normal is along their scattering vector Q, which for 2θ = 90° lies at 45°
to the beam. The sample carries a known strain tensor: ``strain_north`` along the North bank's Q,
``strain_south`` along the South bank's, ``strain_vertical`` along the vertical. Each pixel measures the
strain along its own Q, so a reduction that fits the focussed peaks must recover the strains (a bank
averages over the small spread of Q across its pixels, a few µε here).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import h5py
import numpy as np

from runner.sim.diffraction import FERRITE_A, PowderDiffractometer
from runner.sim.nexus import nx_field
from runner.sim.physics import Bank


def scattering_vector(positions: np.ndarray) -> np.ndarray:
    """Unit scattering vectors Q ∝ k_f - k_i of pixels at ``positions`` (sample at the origin, beam along z)."""
    k_f = positions / np.linalg.norm(positions, axis=-1, keepdims=True)
    q = k_f - np.array([0.0, 0.0, 1.0])
    return q / np.linalg.norm(q, axis=-1, keepdims=True)


@dataclass(frozen=True)
class EngineeringDiffractometer(PowderDiffractometer):
    """ENGIN-X: 50 m from the TS1 moderator, North and South banks of 1.5 m radius at 2θ = ±90°.

    Each bank spans 76°-104° in 2θ and ±21° vertically (five stacked modules in the real instrument).
    Strains are in microstrain (µε = 10⁻⁶).
    """

    name: str = "ENGINX"
    source_frequency: float = 50.0
    l1: float = 50.0
    l2: float = 1.5
    tof_window: tuple[float, float] = (20000.0, 40000.0)
    event_rate: float = 1000.0
    proton_current: float = 180.0
    first_run: int = 1
    bank_two_theta: tuple[float, ...] = (90.0, -90.0)
    bank_width: float = 28.8
    bank_height: float = 1.15
    tubes: int = 24
    pixels: int = 12
    monitor_distance: float = 1.0
    sample: str = "Fe"
    lattice: float = FERRITE_A
    background_fraction: float = 0.2
    delta_theta: float = 0.0006
    delta_t: float = 0.0007
    strain_north: float = 1000.0
    strain_south: float = -300.0
    strain_vertical: float = 0.0

    def bank_name(self, index: int) -> str:
        return ("north_bank", "south_bank")[index] if len(self.bank_two_theta) == 2 else super().bank_name(index)

    @cached_property
    def strain_tensor(self) -> np.ndarray:
        """The sample's strain (dimensionless), principal axes along the nominal North and South Q and vertical."""
        north, south = (scattering_vector(np.array([np.sin(np.radians(a)), 0.0, np.cos(np.radians(a))]))
                        for a in (90.0, -90.0))
        vertical = np.array([0.0, 1.0, 0.0])
        return 1e-6 * sum(value * np.outer(axis, axis) for value, axis in
                          ((self.strain_north, north), (self.strain_south, south), (self.strain_vertical, vertical)))

    def pixel_strain(self, bank: Bank) -> np.ndarray:
        q = scattering_vector(bank.positions)
        return np.einsum("ni,ij,nj->n", q, self.strain_tensor, q)

    def title(self, run: int) -> str:
        return f"ferritic steel ({self.sample}) tensile bar under load, 4x4x4 mm gauge volume, run {run}"

    def write_extras(self, entry: h5py.Group, instrument: h5py.Group) -> None:
        super().write_extras(entry, instrument)
        nx_field(entry["sample"], "description", "ferritic steel tensile bar, axis along the North bank's Q")
