"""IMAT-like neutron imaging: a run is a folder of FITS images, drawn from known attenuation and Bragg edges.

IMAT (ISIS target station 2) records white-beam radiographs and tomograms with a camera, and
wavelength-resolved stacks with its MCP/Timepix detector. Both arrive as folders of FITS images, the way
Mantid Imaging loads them:

* white beam: ``Tomo/`` (sample), ``Flat_Before/`` and ``Flat_After/`` (open beam), ``Dark_Before/`` and
  ``Dark_After/`` (dark current), and ``<kind>_log.txt`` files giving the beam monitor counts before and after
  each image (``Monitor 3 before: N   Monitor 3 after: M``), by which each image is normalised;
* time of flight: ``Sample/`` and ``Flat_Before/`` (open beam), one FITS image per time-of-flight channel, each
  with the MCP's ``_Spectra.txt`` (channel time of flight in s, counts), ``_ShutterCount.txt`` (frames
  counted per shutter window) and ``_ShutterTimes.txt`` (window, delay, duration in s).

The sample is iron. In white beam a step wedge of known thicknesses attenuates with an effective μ, so the
true transmission of each step is exp(-μ d). In time of flight an α-Fe plate shows Bragg edges at λ = 2 d_hkl
(bcc, a = 2.8665 Å: (110) at 4.0538 Å, (200) at 2.8665 Å, ...), broadened by the moderator pulse, and the
MCP's pixel occupancy within each shutter window loses counts the way Mantid Imaging's overlap correction
undoes. A run's folder is built under a temporary name and renamed, so a watcher never sees half a run.
"""

from __future__ import annotations

import itertools
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
from scipy.special import erfc

from runner.sim.physics import TOF_PER_M_A, moderator_spectrum

#: FITS files are sequences of 2880-byte records.
FITS_BLOCK = 2880
MODES = ("white-beam", "tof", "alternate")
IRON_A = 2.8665  # Å, α-Fe (bcc) lattice parameter
IRON_B = 9.45e-15  # m, coherent scattering length of Fe
IRON_ABSORPTION = 2.56  # barn at 1.798 Å (1/v)
IRON_INCOHERENT = 0.40  # barn


# -- FITS ------------------------------------------------------------------------------------
def _card(key: str, value: object, comment: str = "") -> str:
    if isinstance(value, bool):
        text = f"{'T' if value else 'F':>20}"
    elif isinstance(value, int | np.integer):
        text = f"{int(value):>20d}"
    elif isinstance(value, float | np.floating):
        text = f"{float(value):>20.10G}"
    else:
        text = "'" + str(value).replace("'", "''").ljust(8) + "'"
    card = f"{key.upper():<8}= {text}" + (f" / {comment}" if comment else "")
    return card[:80].ljust(80)


def fits_bytes(image: np.ndarray, header: dict[str, object] | None = None) -> bytes:
    """A FITS primary HDU holding one 2-D image (uint16 as BITPIX 16 with BZERO 32768, int32, or float32)."""
    image = np.asarray(image)
    if image.ndim != 2:
        raise ValueError("one 2-D image per FITS file")
    cards = [_card("SIMPLE", True, "conforms to FITS standard")]
    if image.dtype == np.uint16:
        data = (image.astype(np.int32) - 32768).astype(">i2")
        cards += [_card("BITPIX", 16), _card("NAXIS", 2), _card("NAXIS1", image.shape[1]),
                  _card("NAXIS2", image.shape[0]), _card("BZERO", 32768), _card("BSCALE", 1)]
    elif image.dtype == np.int32:
        data = image.astype(">i4")
        cards += [_card("BITPIX", 32), _card("NAXIS", 2), _card("NAXIS1", image.shape[1]),
                  _card("NAXIS2", image.shape[0])]
    else:
        data = image.astype(">f4")
        cards += [_card("BITPIX", -32), _card("NAXIS", 2), _card("NAXIS1", image.shape[1]),
                  _card("NAXIS2", image.shape[0])]
    cards += [_card(key, value) for key, value in (header or {}).items()]
    cards.append("END".ljust(80))
    head = "".join(cards).encode("ascii")
    head += b" " * (-len(head) % FITS_BLOCK)
    body = data.tobytes()  # row-major: NAXIS1 (x) varies fastest, as FITS stores it
    return head + body + b"\0" * (-len(body) % FITS_BLOCK)


def write_fits(path: Path, image: np.ndarray, header: dict[str, object] | None = None) -> Path:
    path.write_bytes(fits_bytes(image, header))
    return path


# -- iron ------------------------------------------------------------------------------------
def bcc_reflections(a: float = IRON_A, d_min: float = 0.5) -> tuple[np.ndarray, np.ndarray]:
    """d-spacings (Å) and multiplicities of a bcc lattice's reflections (h + k + l even), merged by d."""
    hmax = int(a / d_min) + 1
    counts: dict[int, int] = {}
    for h, k, l_ in itertools.product(range(-hmax, hmax + 1), repeat=3):
        q2 = h * h + k * k + l_ * l_
        if q2 and (h + k + l_) % 2 == 0 and a / np.sqrt(q2) >= d_min:
            counts[q2] = counts.get(q2, 0) + 1
    q2s = np.array(sorted(counts), dtype=float)
    return a / np.sqrt(q2s), np.array([counts[int(q)] for q in q2s], dtype=float)


def iron_cross_section(wavelength: np.ndarray, a: float = IRON_A, debye_waller_b: float = 0.35) -> np.ndarray:
    """Total cross-section per Fe atom (barn) of α-Fe powder: coherent elastic (Bragg edges), absorption (1/v),
    incoherent. σ_coh(λ) = λ²/(2 V₀ N) Σ_{2d > λ} m |F|² d e^{-B/(2d²)}, |F|² = (2b)² for bcc."""
    lam = np.asarray(wavelength, dtype=float)
    d, multiplicity = bcc_reflections(a)
    f2 = (2 * IRON_B * 1e10) ** 2  # Å²
    terms = multiplicity * f2 * d * np.exp(-debye_waller_b / (2 * d**2))
    bragg = lam**2 / (2 * a**3 * 2) * ((2 * d[None, :] > lam[:, None]) * terms[None, :]).sum(axis=1)  # Å²
    return bragg * 1e8 + IRON_ABSORPTION * lam / 1.798 + IRON_INCOHERENT


def edge_profile(x: np.ndarray, sigma: float, tau: float) -> np.ndarray:
    """Cumulative Gaussian-exponential (moderator pulse) response: 0 well below the edge, 1 well above."""
    x = np.asarray(x, dtype=float)
    s2 = np.sqrt(2) * sigma
    tail = np.exp(np.clip(-x / tau + sigma**2 / (2 * tau**2), -700, 700)) * erfc(-x / s2 + sigma / (np.sqrt(2) * tau))
    return 0.5 * (erfc(-x / s2) - tail)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "run"


@dataclass(frozen=True)
class ImagingInstrument:
    """IMAT: white-beam camera (step wedge) and MCP time-of-flight (Bragg edges of iron) runs."""

    name: str = "IMAT"
    first_run: int = 1
    #: "white-beam", "tof" or "alternate" (odd runs white beam, even runs time of flight).
    mode: str = "alternate"
    #: Moderator to detector (m): converts the MCP's time of flight to wavelength.
    flight_path: float = 56.0
    # white beam: camera images of a step wedge of iron
    image_size: tuple[int, int] = (128, 128)
    projections: int = 4
    flats: int = 8
    darks: int = 4
    #: Effective white-beam attenuation coefficient of iron (1/cm) and the wedge's step thicknesses (mm).
    attenuation: float = 1.19
    steps_mm: tuple[float, ...] = (2.0, 5.0, 10.0, 20.0)
    open_counts: float = 20000.0  # ADU per pixel at the beam centre, per image at the mean monitor count
    dark_level: float = 100.0  # ADU
    read_noise: float = 2.0  # ADU
    monitor_counts: float = 140000.0  # beam monitor counts during one image (mean)
    monitor_spread: float = 0.08  # relative spread of the beam (proton current) from image to image
    # time of flight: MCP stack of an iron plate
    tof_size: tuple[int, int] = (32, 32)
    wavelength_range: tuple[float, float] = (2.4, 4.6)
    channel_us: float = 51.2
    shutter_windows: int = 3
    plate_mm: float = 5.0
    lattice: float = IRON_A
    #: Moderator pulse in wavelength: Gaussian σ (Å) and exponential tail τ (Å) at the (110) edge, both ∝ λ.
    pulse_sigma: float = 0.004
    pulse_tau: float = 0.008
    sample_frames: int = 60000
    open_frames: int = 36000
    #: Peak wavelength (Å) of the moderator spectrum IMAT views (TS2, broad cold spectrum).
    moderator_peak: float = 2.5
    #: Pixel occupancy of the open beam at the end of the busiest shutter window (MCP overlap loss).
    occupancy: float = 0.15
    sample: str = "Fe"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"{self.name}: mode must be one of {MODES}, not {self.mode!r}")

    def mode_of(self, run: int) -> str:
        if self.mode == "alternate":
            return "white-beam" if run % 2 else "tof"
        return self.mode

    def title(self, run: int) -> str:
        if self.mode_of(run) == "white-beam":
            steps = "/".join(f"{s:g}" for s in self.steps_mm)
            return f"Fe step wedge {steps} mm, white-beam radiography, run {run}"
        return f"alpha-Fe plate {self.plate_mm:g} mm, Bragg-edge imaging, run {run}"

    # -- white beam ----------------------------------------------------------------------
    def wedge_steps(self) -> list[tuple[float, tuple[int, int, int, int]]]:
        """Thickness (mm) and region [x0, y0, x1, y1) of each step of the wedge (columns across the image)."""
        ny, nx = self.image_size
        margin_x, margin_y = nx // 8, ny // 8
        width = (nx - 2 * margin_x) // len(self.steps_mm)
        return [(d, (margin_x + i * width, margin_y, margin_x + (i + 1) * width, ny - margin_y))
                for i, d in enumerate(self.steps_mm)]

    def true_transmission(self) -> np.ndarray:
        """Transmission image of the wedge (1 where there is no iron)."""
        transmission = np.ones(self.image_size)
        for thickness, (x0, y0, x1, y1) in self.wedge_steps():
            transmission[y0:y1, x0:x1] = np.exp(-self.attenuation * thickness / 10)
        return transmission

    def _flux(self, rng_fixed: np.random.Generator, size: tuple[int, int], peak: float) -> np.ndarray:
        """Open-beam intensity: a broad beam profile times the detector's fixed pixel-to-pixel gain."""
        ny, nx = size
        y, x = np.mgrid[0:ny, 0:nx]
        r2 = ((x - nx / 2) / nx) ** 2 + ((y - ny / 2) / ny) ** 2
        return peak * np.exp(-r2 / (2 * 0.45**2)) * (1 + 0.03 * rng_fixed.standard_normal(size))

    def _write_white_beam(self, folder: Path, run: int, prefix: str, rng: np.random.Generator, start: datetime) -> None:
        fixed = np.random.default_rng(7)  # the camera's fixed patterns belong to the instrument
        flux = self._flux(fixed, self.image_size, self.open_counts)
        dark_pattern = self.dark_level + 5 * fixed.standard_normal(self.image_size)
        transmission = self.true_transmission()
        moment = start
        for kind, count in (("Dark_Before", self.darks), ("Flat_Before", self.flats), ("Tomo", self.projections),
                            ("Flat_After", self.flats), ("Dark_After", self.darks)):
            sub = folder / kind
            sub.mkdir()
            log = [" TIME STAMP  IMAGE TYPE   IMAGE COUNTER   COUNTS BM3 before image   COUNTS BM3 after image", " "]
            monitor = int(rng.integers(1_000_000, 5_000_000))
            for i in range(count):
                beam = 0.0 if kind.startswith("Dark") else 1 + self.monitor_spread * (rng.random() - 0.5) * 2
                counts = int(rng.poisson(self.monitor_counts * beam)) if beam else 0
                signal = flux * beam * (transmission if kind == "Tomo" else 1.0)
                image = rng.poisson(signal) + dark_pattern + self.read_noise * rng.standard_normal(self.image_size)
                image = np.clip(np.rint(image), 0, 65535).astype(np.uint16)
                write_fits(sub / f"{prefix}_{kind}_{i:03d}.fits", image, {
                    "INSTRUME": self.name, "DETECTOR": "Andor Zyla 4.2 (simulated)", "IMAGETYP": kind,
                    "RUN": run, "EXPTIME": 30.0, "DATE-OBS": moment.strftime("%Y-%m-%dT%H:%M:%S"),
                })
                if not kind.startswith("Dark"):
                    log.append(f"{moment.strftime('%a %b %d %H:%M:%S %Y')}   Projection:  {i}  angle: 0.0   "
                               f"Monitor 3 before:  {monitor}   Monitor 3 after:  {monitor + counts}")
                monitor += counts + int(rng.integers(1000, 5000))
                moment += timedelta(seconds=33)
            if not kind.startswith("Dark"):
                (folder / f"{kind}_log.txt").write_text("\n".join(log) + "\n")

    # -- time of flight -------------------------------------------------------------------
    def channels(self) -> tuple[np.ndarray, np.ndarray]:
        """Channel start times (s) of the MCP and the shutter window of each channel."""
        lo, hi = (np.array(self.wavelength_range) * TOF_PER_M_A * self.flight_path)  # µs
        starts = np.arange(lo, hi, self.channel_us)
        window = np.minimum((np.arange(starts.size) * self.shutter_windows) // starts.size, self.shutter_windows - 1)
        return starts * 1e-6, window

    def wavelengths(self) -> np.ndarray:
        """Centre wavelength (Å) of each channel."""
        starts, _ = self.channels()
        return (starts * 1e6 + self.channel_us / 2) / (TOF_PER_M_A * self.flight_path)

    def edges(self) -> np.ndarray:
        """Bragg-edge wavelengths 2 d_hkl (Å) inside the recorded band, longest first."""
        d, _ = bcc_reflections(self.lattice)
        lam = 2 * d
        return lam[(lam > self.wavelength_range[0]) & (lam < self.wavelength_range[1])]

    def plate_transmission(self) -> np.ndarray:
        """Transmission of the plate per channel: the ideal edges smeared by the moderator pulse, channel-averaged."""
        starts, _ = self.channels()
        # the pulse's width in wavelength grows with λ (σ, τ given at the (110) edge): on a ln λ grid it is constant
        u = np.linspace(np.log(self.wavelength_range[0] - 0.2), np.log(self.wavelength_range[1] + 0.2), 40001)
        step = u[1] - u[0]
        fine = np.exp(u)
        ideal = np.exp(-2 / self.lattice**3 * iron_cross_section(fine, self.lattice) * 1e-8 * self.plate_mm * 1e7)
        reference = 2 * self.lattice / np.sqrt(2)
        kernel_x = np.arange(-0.03, 0.08, step)
        cdf = edge_profile(kernel_x, self.pulse_sigma / reference, self.pulse_tau / reference)
        kernel = np.diff(cdf, prepend=0.0)
        kernel /= kernel.sum()
        offset = int(np.argmin(np.abs(kernel_x)))
        smeared = np.convolve(ideal, kernel, mode="full")[offset:offset + fine.size]
        lam_lo = starts * 1e6 / (TOF_PER_M_A * self.flight_path)
        lam_hi = lam_lo + self.channel_us / (TOF_PER_M_A * self.flight_path)
        cumulative = np.concatenate([[0.0], np.cumsum(0.5 * (smeared[1:] + smeared[:-1]) * np.diff(fine))])
        return (np.interp(lam_hi, fine, cumulative) - np.interp(lam_lo, fine, cumulative)) / (lam_hi - lam_lo)

    def _write_tof(self, folder: Path, run: int, prefix: str, rng: np.random.Generator, start: datetime) -> None:
        starts, window = self.channels()
        lam = self.wavelengths()
        fixed = np.random.default_rng(11)
        ny, _nx = self.tof_size
        profile = self._flux(fixed, self.tof_size, 1.0)
        spectrum = moderator_spectrum(lam, self.moderator_peak)
        # scale: the busiest pixel's open-beam counts in the busiest window reach `occupancy` of the frames
        busiest = max(spectrum[window == w].sum() for w in range(self.shutter_windows)) * profile.max()
        rate = self.occupancy / busiest  # expected counts per frame, per unit of spectrum x profile
        plate = np.ones(self.tof_size, dtype=bool)
        plate[: ny // 8, :] = plate[-(ny // 8):, :] = False  # open strips above and below the plate
        transmission = self.plate_transmission()
        for kind, frames in (("Sample", self.sample_frames), ("Flat_Before", self.open_frames)):
            sub = folder / kind
            sub.mkdir()
            per_frame = rate * spectrum[:, None, None] * profile[None, :, :]
            if kind == "Sample":
                per_frame = per_frame * np.where(plate[None, :, :], transmission[:, None, None], 1.0)
            observed = np.empty_like(per_frame)
            for w in range(self.shutter_windows):  # occupancy builds up within each shutter window
                occupied = np.zeros(self.tof_size)
                for c in np.flatnonzero(window == w):
                    observed[c] = frames * (1 - occupied) * -np.expm1(-per_frame[c])
                    occupied += observed[c] / frames
            counts = rng.poisson(observed)
            if counts.max() > 65535:
                raise ValueError("MCP channel counts exceed 16 bits: lower occupancy or frames")
            label = f"{prefix}_{'OB' if kind != 'Sample' else 'Sample'}"
            for c, image in enumerate(counts):
                write_fits(sub / f"{label}_{c:05d}.fits", image.astype(np.uint16), {
                    "INSTRUME": self.name, "DETECTOR": "MCP/Timepix (simulated)", "RUN": run,
                    "TOF": float(starts[c]), "TOFBIN": self.channel_us * 1e-6,
                })
            spectra = "\n".join(f"{t:.7g}\t{int(n)}" for t, n in zip(starts, counts.sum(axis=(1, 2)), strict=True))
            (sub / f"{label}_Spectra.txt").write_text(spectra + "\n")
            # unused shutter windows are listed with zero counts, as the MCP software does
            rows = [f"{w}\t{frames if w < self.shutter_windows else 0}" for w in range(self.shutter_windows + 2)]
            (sub / f"{label}_ShutterCount.txt").write_text("\n".join(rows) + "\n")
            bounds = [(starts[window == w][0], starts[window == w][-1] + self.channel_us * 1e-6)
                      for w in range(self.shutter_windows)]
            times, previous = [], 0.0
            for w, (begin, end) in enumerate(bounds):
                times.append(f"{w}\t{begin - previous:.7g}\t{end - begin:.7g}")
                previous = end
            (sub / f"{label}_ShutterTimes.txt").write_text("\n".join(times) + "\n")

    # -- the run ---------------------------------------------------------------------------
    def write(self, path: Path, *, run: int, rb_number: str, short_name: str, events: int, title: str,
              seed: int | None = None) -> Path:
        """Write the run's folder ``path`` without suffix (``IMAT00012345/``), built aside and renamed into place.

        ``events`` is not used: an imaging run's size is set by its images (``image_size``, ``tof_size``...).
        """
        folder = Path(path).with_suffix("")
        folder.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        tmp = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:12]}.tmp")
        tmp.mkdir()
        try:
            prefix = f"{short_name}{run:08d}_{_slug(title.split(', run')[0])}"
            start = datetime.now(UTC) - timedelta(hours=1)
            if self.mode_of(run) == "white-beam":
                self._write_white_beam(tmp, run, prefix, rng, start)
            else:
                self._write_tof(tmp, run, prefix, rng, start)
            old = None
            if folder.exists():  # a rewritten run replaces the old folder in one rename
                old = folder.with_name(f".{folder.name}.{uuid.uuid4().hex[:12]}.old")
                os.replace(folder, old)
            os.replace(tmp, folder)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return folder
