"""The real instrument templates (WISH, MARI): run with papermill on simulated runs, physics checked via scraps.

The simulator knows the truth (silicon's Bragg peaks; the elastic line and a 20 meV excitation), so
these tests check the reduction's numbers, not merely that the notebooks ran.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
import numpy as np
import papermill
import pytest
import scipp as sc
import scrapbook as sb

from runner import sim
from runner.templates.registry import TEMPLATE_NAME, TemplateRegistry

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
INSTRUMENTS = ("WISH",)  # MARI: tests/test_technique_spectroscopy.py
EVENTS = 200_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One simulated run per instrument, shared by this module's tests (fixed seeds)."""
    root = tmp_path_factory.mktemp("data")
    registry = TemplateRegistry(NOTEBOOKS)
    return {name: sim.write_run(root, registry.config(name), 101, "2612345", events=EVENTS, title=f"{name} test run",
                                seed=101) for name in INSTRUMENTS}


def execute(instrument: str, data_file: Path, output_dir: Path, **parameters) -> dict:
    """Run the template as the runner does (injected standard names) and return its scraps."""
    output = output_dir.parent / f"{instrument}-{output_dir.name}.ipynb"
    papermill.execute_notebook(
        str(NOTEBOOKS / instrument / TEMPLATE_NAME), str(output), kernel_name="python3", progress_bar=False,
        parameters={"data_file": str(data_file), "output_dir": str(output_dir), "run_number": 101,
                    "rb_number": "2612345", **parameters},
    )
    return sb.read_notebook(str(output)).scraps.data_dict


@pytest.mark.parametrize("instrument", INSTRUMENTS)
def test_template_contract(instrument: str):
    """Stored without outputs, python3 kernelspec, a typed and commented parameters cell first, valid TOML."""
    template = TemplateRegistry(NOTEBOOKS).resolve(instrument)
    assert template.config.environment == "scipp"
    assert template.config.enabled
    nb = nbformat.read(template.path, as_version=4)
    assert nb.metadata.kernelspec.name == "python3"
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    parameters = template.parameters()
    assert {"data_file", "output_dir", "run_number", "rb_number"} <= parameters.keys()
    for name, info in parameters.items():
        assert info["inferred_type_name"] not in ("None", ""), f"{name} has no type annotation"
        assert info["help"], f"{name} has no help comment"
    assert parameters["normalisation"]["help"].startswith("one of: monitor, proton_charge, none;")
    assert set(template.config.parameters) <= parameters.keys()


def test_wish_finds_silicon_peaks(runs: dict[str, Path], tmp_path: Path):
    out = tmp_path / "wish"
    scraps = execute("WISH", runs["WISH"], out)

    assert scraps["total_events"] == EVENTS
    assert scraps["banks"] == 5
    assert scraps["normalisation"] == "monitor"
    expected, _ = sim.diamond_reflections(sim.SILICON_A, d_min=0.7)
    found = np.array(scraps["peak_d_spacings"])
    # every fitted peak is a silicon reflection, to 0.05 % (bank 5 resolution is ~0.1 %)
    assert np.abs(found[:, None] / expected[None, :] - 1).min(axis=1).max() < 5e-4
    # and every reflection in 0.7-4 Å is found: (111) ... (711)/(551)
    assert np.abs(found[None, :] / expected[:, None] - 1).min(axis=1).max() < 5e-4
    assert all(0 < w < 0.02 for w in scraps["peak_fwhm"])
    assert sorted(scraps["output_files"]) == sorted(p.name for p in out.iterdir())
    focussed = sc.io.load_hdf5(out / "WISH00000101_focussed.h5")["focussed"]
    assert focussed.sizes["bank"] == 5
    assert focussed.coords["two_theta_mean"].values == pytest.approx([28, 59, 90, 121, 152], abs=2)
    assert (out / "WISH00000101_bank_5.xye").read_text().startswith("# WISH00000101 bank_5")


def test_wish_options_change_the_reduction(runs: dict[str, Path], tmp_path: Path):
    """Raw counts, low-angle banks masked, peaks searched in the sum of banks: still silicon."""
    out = tmp_path / "wish-raw"
    scraps = execute("WISH", runs["WISH"], out, normalisation="none", masked_banks=[1, 2], peak_bank=0,
                     d_min=1.0, d_max=3.5)
    assert scraps["normalisation"] == "none"
    expected, _ = sim.diamond_reflections(sim.SILICON_A, d_min=1.0)
    found = np.array(scraps["peak_d_spacings"])
    assert np.abs(found[:, None] / expected[None, :] - 1).min(axis=1).max() < 1e-3
    assert {round(d, 2) for d in found} >= {3.14, 1.92, 1.64, 1.36, 1.25, 1.11}
    focussed = sc.io.load_hdf5(out / "WISH00000101_focussed.h5")["focussed"]
    assert focussed.masks["masked"].values.tolist() == [True, True, False, False, False]
    assert focussed.coords["dspacing"][0].value == pytest.approx(1.0)
