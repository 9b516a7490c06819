"""Reflectometry family (INTER, OFFSPEC, POLREF, SURF, CRISP) end to end: three angles of a simulated sample plus
their direct-beam runs -> broker -> runner -> the shared template as one multi-run job in the ``reflectometry``
environment's kernel; layer thickness and critical edge checked against the simulator, the ORSO file read back
with orsopy (in that environment: the runner does not depend on orsopy).
"""

from __future__ import annotations

import json
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pipeline_support import running_platform

from runner import sim
from runner.bus.models import JobState, StatusEvent
from runner.config import Settings
from runner.kernels import environments
from runner.pipeline.submit import submit_request, wait_for_jobs
from runner.templates.registry import TemplateRegistry

REPO = Path(__file__).resolve().parent.parent
INSTRUMENTS = ("INTER", "OFFSPEC", "POLREF", "SURF", "CRISP")
RUNS, RB, EVENTS = [2010, 2011, 2012], "2612345", 100_000

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def platform(build_environment: Callable[[str], Settings], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[Settings, dict[str, list[Path]]]]:
    home = build_environment("reflectometry").home
    root = tmp_path_factory.mktemp("reflectometry")
    notebooks = root / "notebooks"
    shutil.copytree(REPO / "notebooks", notebooks, ignore=shutil.ignore_patterns("sample_data", "conftest.py"))
    data = root / "data"
    registry = TemplateRegistry(notebooks)
    runs = {}
    for name in INSTRUMENTS:
        config = registry.config(name)
        model = sim.instrument_model(config)
        runs[name] = [sim.write_run(data, config, run, RB, events=EVENTS, cycle="cycle_25_1", seed=run,
                                    title=model.title(run)) for run in RUNS]
    with running_platform(home, NBREDUCE_NOTEBOOKS=str(notebooks), NBREDUCE_DATA_ROOTS=str(data),
                          NBREDUCE_RUNNER__MAX_PARALLEL="2") as settings:
        yield settings, runs


def reduce(settings: Settings, jobs: dict[str, dict]) -> dict[str, StatusEvent]:
    ids = {key: submit_request(settings, requested_by="test", rb_number=RB, **fields) for key, fields in jobs.items()}
    finals = wait_for_jobs(settings, set(ids.values()), 600)
    return {key: finals[job] for key, job in ids.items()}


def read_orso(settings: Settings, path: Path) -> dict:
    """Load the .ort with orsopy in the reflectometry environment; its header and columns as JSON."""
    python = environments.load("reflectometry", REPO / "environments").build_dir(settings) / "bin" / "python"
    script = ("import json, sys, orsopy.fileio as o; [d] = o.load_orso(sys.argv[1]); i = d.info; print(json.dumps("
              "{'instrument': i.data_source.experiment.instrument, 'facility': i.data_source.experiment.facility, "
              "'files': [f.file for f in i.data_source.measurement.data_files], 'software': i.reduction.software.name,"
              " 'columns': [getattr(c, 'name', None) or c.error_of for c in i.columns], 'shape': list(d.data.shape),"
              " 'q_min': float(d.data[:, 0].min())}))")
    return json.loads(subprocess.run([str(python), "-c", script, str(path)], check=True, capture_output=True,
                                     text=True).stdout)


def test_every_reflectometer_stitches_and_recovers_thickness_and_critical_edge(
        platform: tuple[Settings, dict[str, list[Path]]]) -> None:
    settings, runs = platform
    finals = reduce(settings, {name: {"instrument": name, "run_number": RUNS, "data": [str(p) for p in paths]}
                               for name, paths in runs.items()})
    for name, final in finals.items():
        assert final.state is JobState.SUCCEEDED, f"{name}: {final.reason} {final.error}"
        assert final.kernel is not None and final.kernel.startswith("nbreduce-reflectometry"), final.kernel
        assert final.environment == "reflectometry" and final.environment_hash
        model = sim.instrument_model(TemplateRegistry(settings.notebooks).config(name))
        scraps = final.scraps
        print(final.instrument, {k: v for k, v in scraps.items() if k != "output_files"})
        assert scraps["runs"] == RUNS and scraps["direct_runs"] == [2001, 2002, 2003]
        assert scraps["angles_deg"] == pytest.approx(list(model.angles))
        assert scraps["thickness_angstrom"] == pytest.approx(model.layer_thickness, rel=0.02), name
        assert scraps["critical_edge_per_angstrom"] == pytest.approx(model.critical_edge, rel=0.03), name
        # the lowest angle over-illuminates the sample: stitching scales it up relative to the next angle by about
        # 1/footprint (the overall scale sits a few % low: inverse-variance weights favour low-count fluctuations)
        first, second, *_ = scraps["scale_factors"]
        assert first / second == pytest.approx(1 / model.footprint_fraction(0), rel=0.05), name
        assert all(0.85 < f * model.footprint_fraction(i) < 1.05 for i, f in enumerate(scraps["scale_factors"]))
        assert "nbreduce_warnings" not in scraps, scraps.get("nbreduce_warnings")
        ort = next(settings.archive / p for p in final.output_files if p.endswith(".ort"))
        header = read_orso(settings, ort)
        assert header["instrument"] == name and header["facility"] == "ISIS"
        assert header["files"] == [p.name for p in runs[name]]
        assert header["software"] == "nbreduce" and header["columns"] == ["Qz", "R", "sR"]
        assert header["shape"][0] == scraps["q_points"] and header["shape"][1] == 3


def test_missing_direct_beam_run_fails_with_the_run_it_looked_for(
        platform: tuple[Settings, dict[str, list[Path]]]) -> None:
    settings, runs = platform
    finals = reduce(settings, {
        "absent": {"instrument": "INTER", "run_number": RUNS, "data": [str(p) for p in runs["INTER"]],
                   "reduction_arguments": {"direct_runs": [1999]}},
        "other slits": {"instrument": "INTER", "run_number": RUNS[0], "data": str(runs["INTER"][0]),
                        "reduction_arguments": {"direct_runs": [2003]}},
    })
    absent, other = finals["absent"], finals["other slits"]
    assert absent.state is JobState.FAILED and absent.error is not None
    assert "direct-beam run 1999 not found: looked for INTER00001999.nxs" in absent.error.evalue
    assert other.state is JobState.FAILED and other.error is not None
    assert "no direct-beam run with slit gaps (1.2, 0.6) mm (run 2010" in other.error.evalue
