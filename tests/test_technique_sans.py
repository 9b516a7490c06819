"""SANS family (LOQ, SANS2D, ZOOM, LARMOR) end to end: simulated runs -> broker -> runner -> shared template in the
``sans`` environment's kernel, physics checked from the scraps.

The simulator writes each sample run with its empty-beam, transmission and can runs (dilute spheres of known
radius), so the test checks the recovered radius, not merely that the notebook ran.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pipeline_support import running_platform

from runner import sim
from runner.bus.models import JobState, StatusEvent
from runner.config import Settings
from runner.pipeline.submit import submit_request, wait_for_jobs
from runner.sim.sans import SansInstrument
from runner.templates.registry import TemplateRegistry

REPO = Path(__file__).resolve().parent.parent
INSTRUMENTS = ("LOQ", "SANS2D", "ZOOM", "LARMOR")
RUN, RB, EVENTS = 1010, "2612345", 200_000
TRUE_RADIUS = SansInstrument().sphere_radius

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def platform(build_environment: Callable[[str], Settings], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[tuple[Settings, dict[str, Path]]]:
    """The runner on a home with the ``sans`` environment; one simulated sample run (+ associated runs) each."""
    home = build_environment("sans").home
    root = tmp_path_factory.mktemp("sans")
    notebooks = root / "notebooks"
    shutil.copytree(REPO / "notebooks", notebooks, ignore=shutil.ignore_patterns("sample_data", "conftest.py"))
    data = root / "data"
    registry = TemplateRegistry(notebooks)
    runs = {name: sim.write_run(data, registry.config(name), RUN, RB, events=EVENTS, cycle="cycle_25_1", seed=RUN,
                                title=sim.instrument_model(registry.config(name)).title(RUN))
            for name in INSTRUMENTS}
    with running_platform(home, NBREDUCE_NOTEBOOKS=str(notebooks), NBREDUCE_DATA_ROOTS=str(data),
                          NBREDUCE_RUNNER__MAX_PARALLEL="2") as settings:
        yield settings, runs


def reduce(settings: Settings, jobs: dict[str, dict]) -> dict[str, StatusEvent]:
    ids = {key: submit_request(settings, requested_by="test", rb_number=RB, **fields) for key, fields in jobs.items()}
    finals = wait_for_jobs(settings, set(ids.values()), 600)
    return {key: finals[job] for key, job in ids.items()}


def test_every_sans_instrument_recovers_the_sphere_radius(platform: tuple[Settings, dict[str, Path]]) -> None:
    settings, runs = platform
    jobs = {name: {"instrument": name, "run_number": RUN, "data": str(path)} for name, path in runs.items()}
    # can subtraction on one instrument: the can run's flat background is removed, the radius stays
    jobs["LOQ-can"] = {**jobs["LOQ"], "reduction_arguments": {"can_run": 1003}}
    finals = reduce(settings, jobs)
    for key, final in finals.items():
        assert final.state is JobState.SUCCEEDED, f"{key}: {final.reason} {final.error}"
        assert final.kernel is not None and final.kernel.startswith("nbreduce-sans"), final.kernel
        assert final.environment == "sans" and final.environment_hash
        scraps = final.scraps
        print(final.instrument, {k: v for k, v in scraps.items() if k != "output_files"})
        assert scraps["radius_angstrom"] == pytest.approx(TRUE_RADIUS, rel=0.02), key
        assert scraps["radius_error_angstrom"] < 0.02 * TRUE_RADIUS
        # associated runs were found by title in the run's cycle folder
        assert (scraps["transmission_run"], scraps["direct_run"]) == (1002, 1001)
        assert 0.6 < scraps["mean_transmission"] < 0.9
        assert "nbreduce_warnings" not in scraps, scraps.get("nbreduce_warnings")
        stem = Path(final.data[0]).stem
        assert sorted(Path(p).name for p in final.output_files) == sorted(
            [f"{stem}_iq.txt", f"{stem}_iq.h5", f"{stem}_iq.png"])
    assert finals["LOQ-can"].scraps["can_run"] == 1003 and finals["LOQ"].scraps["can_run"] == 0
    text = next((settings.archive / p).read_text() for p in finals["LOQ"].output_files if p.endswith(".txt"))
    assert "Q[1/A] I(Q) dI(Q)" in text and len(text.splitlines()) > 30


def test_missing_associated_run_fails_with_the_run_it_looked_for(platform: tuple[Settings, dict[str, Path]]) -> None:
    settings, runs = platform
    finals = reduce(settings, {
        "direct": {"instrument": "ZOOM", "run_number": RUN, "data": str(runs["ZOOM"]),
                   "reduction_arguments": {"direct_run": 999}},
        "transmission": {"instrument": "LOQ", "run_number": RUN, "data": str(runs["LOQ"]),
                         "reduction_arguments": {"transmission_run": 1005}},
    })
    for key, number, name in (("direct", 999, "ZOOM00000999.nxs"), ("transmission", 1005, "LOQ00001005.nxs")):
        final = finals[key]
        assert final.state is JobState.FAILED
        assert final.error is not None and final.error.ename == "FileNotFoundError"
        assert f"{key} run {number} not found: looked for {name}" in final.error.evalue
