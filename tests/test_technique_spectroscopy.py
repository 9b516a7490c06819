"""The spectroscopy technique families end to end: direct geometry (MARI, MERLIN, LET, MAPS) and indirect
geometry (OSIRIS, IRIS, TOSCA), through the real broker and runner, in the ``nbreduce-spectroscopy`` kernel.

Each instrument's simulated run is drawn from known physics (Ei, an elastic line of known resolution, an
excitation; a resolution-limited elastic line under a quasi-elastic Lorentzian of known HWHM; vibrational
lines), so the tests check the reductions' numbers, not just that the notebooks ran. All jobs are submitted
at once and run two at a time; the tests then read their final status events.
"""

from __future__ import annotations

import ast
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import nbformat
import numpy as np
import pytest
import scipp as sc
from pipeline_support import running_platform

from runner import sim
from runner.bus.clients import Publisher
from runner.bus.models import JobState, RunCompletion, StatusEvent
from runner.bus.topics import RUN_COMPLETIONS
from runner.config import Settings
from runner.pipeline.reduce import job_id_for
from runner.pipeline.submit import submit_request, wait_for_jobs
from runner.sim.indirect import FWHM_PER_SIGMA
from runner.templates.registry import TemplateRegistry

REPO = Path(__file__).resolve().parent.parent
NOTEBOOKS = REPO / "notebooks"
DIRECT = ("LET", "MAPS", "MARI", "MERLIN")
INDIRECT = ("IRIS", "OSIRIS", "TOSCA")
FAMILY = {**dict.fromkeys(DIRECT, "direct-spectroscopy"), **dict.fromkeys(INDIRECT, "indirect-spectroscopy")}
EVENTS = 200_000
RUN = 101
RB = "2612345"
KERNEL = "nbreduce-spectroscopy"

pytestmark = pytest.mark.slow


def model(instrument: str):
    return sim.instrument_model(TemplateRegistry(NOTEBOOKS).config(instrument))


@pytest.fixture(scope="module")
def platform(build_environment: Callable[[str], Settings], tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[Settings]:
    """A broker and a runner on the home where the spectroscopy environment is built, on a copy of the templates."""
    home = build_environment("spectroscopy").home
    notebooks = tmp_path_factory.mktemp("spectroscopy-templates") / "notebooks"
    shutil.copytree(NOTEBOOKS, notebooks, ignore=shutil.ignore_patterns("sample_data", "conftest.py"))
    data = tmp_path_factory.mktemp("spectroscopy-data")
    with running_platform(home, NBREDUCE_NOTEBOOKS=str(notebooks), NBREDUCE_DATA_ROOTS=str(data),
                          NBREDUCE_RUNNER__MAX_PARALLEL="2") as settings:
        yield settings


def complete(settings: Settings, instrument: str, path: Path, run: int = RUN) -> str:
    """Announce a run as the instrument's data acquisition would (a run completion); returns the job id."""
    message = RunCompletion(message_id=os.urandom(8).hex(), instrument=instrument, run_number=run, rb_number=RB,
                            data=str(path), run_title=f"{instrument} test run", facility="ISIS", started_by=0)
    Publisher(settings).publish(RUN_COMPLETIONS, message, key=instrument)
    return job_id_for(RUN_COMPLETIONS, -1, -1, message.message_id)


@pytest.fixture(scope="module")
def jobs(platform: Settings) -> dict[str, StatusEvent]:
    """Every scenario's final status event, by name; all jobs run concurrently (two at a time)."""
    registry = TemplateRegistry(platform.notebooks)
    root = platform.data_roots[0]
    runs = {name: sim.write_run(root, registry.config(name), RUN, RB, events=EVENTS, title=f"{name} test run",
                                seed=RUN) for name in (*DIRECT, *INDIRECT)}
    wish = sim.write_run(root, registry.config("WISH"), RUN, RB, events=20_000, title="WISH test run", seed=RUN)
    ids = {name: complete(platform, name, path) for name, path in runs.items()}

    def rerun(name: str, instrument: str, **arguments) -> None:
        ids[name] = submit_request(platform, instrument=instrument, run_number=RUN, rb_number=RB,
                                   data=str(runs[instrument]), reduction_arguments=arguments,
                                   rerun_of=ids[instrument], requested_by="scientist")

    # MARI with a wrong Ei (48 meV, monitors ignored): the elastic line moves to −8.5 meV, out of reach
    rerun("MARI wrong Ei", "MARI", incident_energy=48.0, ei_from_monitors=False, kikf_correction=False,
          normalisation="none", cut_two_theta=[3.0, 60.0])
    # LET asked for its 4.5 meV level (present) and an 8 meV one (absent)
    rerun("LET expected 8 meV", "LET", expected_excitations=[4.5, 8.0])
    # IRIS with a significance no elastic line can reach
    rerun("IRIS no elastic line", "IRIS", min_peak_significance=1e5)
    # mismatched files, under other run numbers so that the reruns above are version 2 of their runs
    ids["WISH file for MARI"] = complete(platform, "MARI", wish, RUN + 1)
    ids["MARI file for OSIRIS"] = complete(platform, "OSIRIS", runs["MARI"], RUN + 1)
    finals = wait_for_jobs(platform, set(ids.values()), 600)
    assert finals.keys() == set(ids.values()), f"unfinished: {[n for n, j in ids.items() if j not in finals]}"
    return {name: finals[job] for name, job in ids.items()}


def archived(platform: Settings, final: StatusEvent, name: str) -> Path:
    [path] = [platform.archive / p for p in final.output_files if p.endswith(name)]
    return path


def assert_succeeded_in_environment(final: StatusEvent) -> None:
    assert final.state is JobState.SUCCEEDED, final.reason
    assert final.kernel == KERNEL
    assert final.environment == "spectroscopy" and final.environment_hash
    assert sorted(Path(p).name for p in final.output_files) == sorted(final.scraps["output_files"])


@pytest.mark.parametrize("instrument", [*DIRECT, *INDIRECT])
def test_template_contract(instrument: str):
    """Every instrument runs its family's shared template: stored without outputs, in the spectroscopy
    kernel, typed and commented parameters, the instrument's constants declared, its file naming."""
    registry = TemplateRegistry(NOTEBOOKS)
    template = registry.resolve(instrument)
    assert template.family == FAMILY[instrument]
    assert template.path == NOTEBOOKS / "techniques" / FAMILY[instrument] / "reduce.ipynb"
    assert sorted(p.name for p in (NOTEBOOKS / instrument).iterdir() if p.name != "sample_data") == ["instrument.toml"]
    assert template.config.environment == "spectroscopy" and template.kernel_name == KERNEL
    nb = nbformat.read(template.path, as_version=4)
    assert nb.metadata.kernelspec.name == KERNEL
    code = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert "parameters" in code[0].metadata.get("tags", [])
    assert all(not cell.outputs and cell.execution_count is None for cell in code)
    parameters = template.parameters()
    assert {"data_file", "output_dir", "run_number", "rb_number", "instrument"} <= parameters.keys()
    for name, info in parameters.items():
        assert info["inferred_type_name"] not in ("None", ""), f"{name} has no type annotation"
        assert info["help"], f"{name} has no help comment"
    assert parameters["normalisation"]["help"].startswith("one of: monitor, proton_charge, none;")
    assert set(template.config.parameters) | set(template.config.constants) <= parameters.keys()
    assert template.config.constants, "the instrument's constants are in its instrument.toml"
    name = template.config.data_file_name(RUN)
    assert name.startswith(template.config.file_prefix) and name.endswith(f"{RUN:0{template.config.run_digits}d}.nxs")


@pytest.mark.parametrize(("family", "first"), [("direct-spectroscopy", "LET"), ("indirect-spectroscopy", "IRIS")])
def test_template_defaults_are_the_first_instruments(family: str, first: str):
    """nbval runs a family template as it is, on a run of the family's first instrument: its defaults must be
    that instrument's constants."""
    registry = TemplateRegistry(NOTEBOOKS)
    members = sorted(i for i in registry.instruments() if registry.config(i).family == family)
    assert members[0] == first
    template = registry.resolve(first)
    defaults = {name: ast.literal_eval(info["default"]) for name, info in template.parameters().items()}
    assert {k: defaults[k] for k in template.config.constants} == template.config.constants
    assert defaults["instrument"] == first


@pytest.mark.parametrize("instrument", [*DIRECT, *INDIRECT])
def test_simulator_is_built_from_the_instrument_toml(instrument: str):
    config = TemplateRegistry(NOTEBOOKS).config(instrument)
    instrument_model = model(instrument)
    for name, value in {**config.constants, **config.simulation}.items():
        if hasattr(instrument_model, name):
            assert np.asarray(getattr(instrument_model, name)).tolist() == np.asarray(value).tolist(), name


@pytest.mark.parametrize("instrument", DIRECT)
def test_direct_geometry_recovers_ei_elastic_line_and_excitation(jobs: dict[str, StatusEvent], platform: Settings,
                                                               instrument: str):
    final = jobs[instrument]
    assert_succeeded_in_environment(final)
    truth = model(instrument)
    ei = truth.incident_energy
    scraps = final.scraps
    assert scraps["instrument"] == instrument
    assert scraps["total_events"] == EVENTS
    assert scraps["nbreduce_warnings"] == []
    assert scraps["ei_source"] == "monitors"
    assert scraps["incident_energy_meV"] == pytest.approx(ei, rel=2e-3)
    assert scraps["chopper_energy_meV"] == ei
    assert scraps["elastic_found"]
    # MARI: 0.1 meV and 0.15 meV at Ei = 50 meV; the same fractions of Ei on every instrument
    assert scraps["elastic_peak_meV"] == pytest.approx(0.0, abs=2e-3 * ei)
    assert scraps["elastic_fwhm_meV"] == pytest.approx(FWHM_PER_SIGMA * float(truth.sigma(np.array(0.0))), rel=0.1)
    [excitation] = scraps["excitation_energies_meV"]
    assert excitation == pytest.approx(truth.excitation, abs=3e-3 * ei)
    width = np.hypot(float(truth.sigma(np.array(truth.excitation))), truth.excitation_width)
    assert scraps["excitation_fwhm_meV"][0] == pytest.approx(FWHM_PER_SIGMA * width, rel=0.15)
    saved = sc.io.load_hdf5(archived(platform, final, "_sqw.h5"))
    assert set(saved["s_two_theta_energy"].dims) == {"two_theta", "energy_transfer"}
    assert saved["incident_energy"].value == pytest.approx(ei, rel=2e-3)
    two_theta = saved["s_two_theta_energy"].coords["two_theta"]  # the map spans the detectors' coverage
    assert [two_theta.min().value, two_theta.max().value] == pytest.approx(list(truth.detector_two_theta))
    assert archived(platform, final, "_cut.txt").read_text().startswith(f"# {Path(final.data[0]).stem} energy_transfer")


def test_direct_geometry_with_a_wrong_ei_warns_that_the_elastic_line_is_missing(jobs: dict[str, StatusEvent]):
    """Without monitor refinement the parameter is used as Ei; a wrong Ei moves the elastic line off zero."""
    final = jobs["MARI wrong Ei"]
    assert final.state is JobState.SUCCEEDED, final.reason
    assert final.rerun_of == jobs["MARI"].job_id and {final.version, jobs["MARI"].version} == {1, 2}
    scraps = final.scraps
    assert scraps["ei_source"] == "parameter"
    assert scraps["incident_energy_meV"] == 48.0
    assert scraps["normalisation"] == "none"
    assert not scraps["elastic_found"]
    assert any(w.startswith("no elastic line found") for w in scraps["nbreduce_warnings"])


def test_direct_geometry_warns_about_a_missing_expected_excitation(jobs: dict[str, StatusEvent]):
    final = jobs["LET expected 8 meV"]
    assert final.state is JobState.SUCCEEDED, final.reason
    assert final.scraps["excitation_energies_meV"] == [pytest.approx(4.5, abs=0.05)]
    [warning] = final.scraps["nbreduce_warnings"]  # the 4.5 meV level was found: only 8 meV is missing
    assert warning.startswith("no excitation found near the expected 8 meV")


@pytest.mark.parametrize("instrument", INDIRECT)
def test_indirect_geometry_recovers_resolution_and_quasielastic_width(jobs: dict[str, StatusEvent],
                                                                     platform: Settings, instrument: str):
    final = jobs[instrument]
    assert_succeeded_in_environment(final)
    truth = model(instrument)
    scraps = final.scraps
    assert scraps["instrument"] == instrument
    assert scraps["total_events"] == EVENTS
    assert scraps["nbreduce_warnings"] == []
    assert scraps["final_energies_meV"] == list(truth.final_energies)
    assert scraps["elastic_found"]
    resolution = float(truth.sigma(0.0, truth.final_energies[0])) * FWHM_PER_SIGMA
    assert scraps["resolution_fwhm_meV"] == pytest.approx(resolution, rel=0.1)
    assert scraps["elastic_centre_meV"] == pytest.approx(0.0, abs=0.1 * resolution)
    saved = sc.io.load_hdf5(archived(platform, final, "_sqw.h5"))
    assert set(saved["s_q_energy"].dims) == {"Q", "energy_transfer"}
    if instrument == "TOSCA":
        # vibrational lines: positions within 0.1 %, widths (resolution 1.25 % of Ei) within 10 %
        found = np.array(scraps["peak_energies_meV"])
        assert found == pytest.approx(truth.vibrational_peaks, rel=1e-3)
        expected_fwhm = [truth.resolution_fraction * (truth.final_energies[0] + e) for e in truth.vibrational_peaks]
        assert scraps["peak_fwhm_meV"] == pytest.approx(expected_fwhm, rel=0.1)
        assert "quasielastic_hwhm_meV" not in scraps
    else:
        assert scraps["quasielastic_hwhm_meV"] == pytest.approx(truth.quasielastic_hwhm, rel=0.1)
        assert scraps["peak_energies_meV"] == []
        # EISF of the 3-site rotor, at the centres of the Q groups
        expected = truth.eisf(np.array(scraps["eisf_q_per_angstrom"]))
        assert scraps["eisf"] == pytest.approx(expected, abs=0.05)


def test_indirect_geometry_warns_when_no_elastic_line_is_found(jobs: dict[str, StatusEvent]):
    final = jobs["IRIS no elastic line"]
    assert final.state is JobState.SUCCEEDED, final.reason
    assert final.rerun_of == jobs["IRIS"].job_id
    assert not final.scraps["elastic_found"]
    assert "resolution_fwhm_meV" not in final.scraps and "quasielastic_hwhm_meV" not in final.scraps
    [warning] = final.scraps["nbreduce_warnings"]
    assert warning.startswith("no elastic line found")


@pytest.mark.parametrize(("name", "reason"), [
    ("WISH file for MARI", "is a run of WISH, not of MARI"),
    ("MARI file for OSIRIS", "is a run of MARI, not of OSIRIS"),
])
def test_a_mismatched_file_fails_with_a_clear_reason(jobs: dict[str, StatusEvent], name: str, reason: str):
    final = jobs[name]
    assert final.state is JobState.FAILED
    assert final.error is not None and final.error.ename == "ValueError"
    assert reason in final.error.evalue and reason in (final.reason or "")
