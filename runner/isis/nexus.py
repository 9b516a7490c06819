"""Reading ISIS NeXus files: what a file says about its run (experiment number, ...).

ISIS files store scalars as 1-element arrays and strings as bytes; these helpers read both forms.
"""

from __future__ import annotations

from pathlib import Path

import h5py


def rb_from_nexus(path: Path) -> str | None:
    """The experiment (RB) number recorded in an ISIS NeXus file, if any."""
    try:
        with h5py.File(path, "r") as f:
            for entry in f.values():
                if isinstance(entry, h5py.Group) and "experiment_identifier" in entry:
                    value = entry["experiment_identifier"][()]
                    value = value[0] if getattr(value, "shape", ()) else value
                    text = value.decode() if isinstance(value, bytes) else str(value)
                    return text.strip() or None
    except (OSError, KeyError, IndexError):
        return None
    return None
