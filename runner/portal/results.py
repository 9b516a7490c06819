"""How a run's results read on its page: scraps compact and with units, warnings, HDF5 outputs for H5Web.

Units come from the scrap's name, by the convention the technique templates follow (docs/templates.md):
a last part ``_meV``, ``_angstrom``, ``_per_angstrom``, ``_deg``, ``_K``, ``_us``, ``_uAh``, ``_ppm``,
``_percent``...
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

#: Name suffix -> unit as shown. Longest suffixes are tried first (``_per_angstrom`` before ``_angstrom``).
UNITS = {
    "per_angstrom": "Å⁻¹", "angstrom": "Å", "meV": "meV", "eV": "eV", "ueV": "µeV", "K": "K", "mK": "mK",
    "T": "T", "mT": "mT", "G": "G", "deg": "°", "rad": "rad", "us": "µs", "ms": "ms", "s": "s", "uAh": "µA·h",
    "ppm": "ppm", "percent": "%", "nm": "nm", "mm": "mm", "m": "m", "Hz": "Hz", "MHz": "MHz", "bar": "bar",
}
_SUFFIXES = sorted(UNITS, key=len, reverse=True)
#: Lists up to this long are shown inline; longer ones in a collapsed table.
INLINE_ITEMS = 8
#: Scraps nbreduce itself reads (shown elsewhere on the page, not among the results).
RESERVED = {"nbreduce_warnings"}
HDF5_SUFFIXES = {".h5", ".hdf", ".hdf5", ".hf5", ".nx", ".nxs", ".nx5", ".nexus"}


def unit_of(name: str) -> str:
    for suffix in _SUFFIXES:
        if name.endswith("_" + suffix) and len(name) > len(suffix) + 1:
            return UNITS[suffix]
    return ""


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.6g}"
    if value is None:
        return "–"
    return str(value)


def _is_scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def scrap_view(name: str, value: Any) -> dict[str, Any]:
    """One scrap as the page shows it: ``kind`` is ``scalar`` (``text``), ``inline`` (``text``), ``table``
    (``rows`` of one or more columns), ``summary`` (a value too large for the status) or ``json``."""
    unit = unit_of(name)
    if _is_scalar(value):
        return {"kind": "scalar", "text": _scalar(value), "unit": unit}
    if isinstance(value, dict) and set(value) == {"type", "encoder", "summary"}:
        return {"kind": "summary", "text": f"{value['type']}: {value['summary']}", "unit": unit}
    if isinstance(value, list) and all(_is_scalar(v) for v in value):
        if len(value) <= INLINE_ITEMS:
            return {"kind": "inline", "text": ", ".join(_scalar(v) for v in value) or "(none)", "unit": unit}
        return {"kind": "table", "rows": [[i, _scalar(v)] for i, v in enumerate(value)], "header": ["#", "value"],
                "count": len(value), "unit": unit}
    if isinstance(value, list) and all(isinstance(v, list) and all(_is_scalar(x) for x in v) for v in value):
        width = max((len(v) for v in value), default=0)
        rows = [[i, *(_scalar(x) for x in v)] for i, v in enumerate(value)]
        if len(value) <= 3 and width <= 4:
            return {"kind": "inline", "text": "; ".join(", ".join(_scalar(x) for x in v) for v in value),
                    "unit": unit}
        return {"kind": "table", "rows": rows, "header": ["#", *range(width)], "count": len(value), "unit": unit}
    if isinstance(value, dict) and all(_is_scalar(v) for v in value.values()) and len(value) <= INLINE_ITEMS:
        return {"kind": "inline", "text": ", ".join(f"{k}: {_scalar(v)}" for k, v in value.items()), "unit": unit}
    return {"kind": "json", "value": value, "unit": unit}


def scrap_views(scraps: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    return [(name, scrap_view(name, value)) for name, value in scraps.items() if name not in RESERVED]


def hdf5_outputs(names: list[str]) -> list[str]:
    """Output files H5Web opens (HDF5 and NeXus)."""
    return [name for name in names if PurePosixPath(name).suffix.lower() in HDF5_SUFFIXES]
