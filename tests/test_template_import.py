"""``nbreduce template import``: existing ISIS reduction scripts become templates.

The fixtures (tests/fixtures/legacy_scripts/) are written in the shapes of the public ISIS scripts.
Generated notebooks are checked the way the platform reads them: papermill's inspection (what the
runner injects), the rerun form's specs, nbformat's schema, and the rebuilt ``reduce_vars`` module
against the original one; the script that needs no Mantid runs end to end through broker and runner
on a simulated WISH run.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
import sys
import types
import warnings
from pathlib import Path
from typing import Any

import h5py
import jinja2
import nbformat
import numpy as np
import papermill
import pytest
from click.testing import CliRunner
from papermill.translators import PythonTranslator
from pipeline_support import running_platform

from runner import sim
from runner.bus.models import JobState
from runner.cli.main import main as cli
from runner.pipeline.submit import submit_request, wait_for_jobs
from runner.templates import importer
from runner.templates.importer import ConversionError, ConversionReport, convert, import_template, write_template
from runner.templates.params import RUN_PARAMETERS, parameters_model, spec_from_inspection
from runner.templates.registry import TemplateRegistry

REPO = Path(__file__).resolve().parent.parent
FIXTURES = Path(__file__).parent / "fixtures" / "legacy_scripts"
WISH = FIXTURES / "NDXWISH" / "user" / "scripts" / "autoreduction"
AWKWARD = FIXTURES / "awkward"
UNCONVERTIBLE = FIXTURES / "unconvertible"
FIA = FIXTURES / "fia" / "OSIRIS" / "reduce.py"
PLUMBING = {*RUN_PARAMETERS, importer.TEMPLATE_DIR}


# -- helpers ----------------------------------------------------------------------------------------
def original_module(path: Path) -> dict[str, Any]:
    """The fixture's reduce_vars as Python sees it (our own fixture files, safe to run)."""
    namespace: dict[str, Any] = {}
    exec(compile(path.read_text(), str(path), "exec"), namespace)
    return namespace


def rebuilt_module(nb: nbformat.NotebookNode, **parameters: Any) -> types.ModuleType:
    """Run the parameters cell (plus papermill-style overrides) and the cell that rebuilds reduce_vars."""
    code = [c.source for c in nb.cells if c.cell_type == "code"]
    namespace: dict[str, Any] = {"__name__": "__main__"}
    exec(code[0], namespace)
    namespace.update(parameters)
    settings_cell = next(c for c in code if 'sys.modules["reduce_vars"]' in c)
    try:
        exec(settings_cell, namespace)
        return sys.modules["reduce_vars"]
    finally:
        sys.modules.pop("reduce_vars", None)


def inspected(path: Path) -> dict[str, dict[str, Any]]:
    return {k: dict(v) for k, v in papermill.inspect_notebook(str(path)).items()}


def same(a: Any, b: Any) -> bool:
    """Equal with the same types and order all the way down."""
    return importer._same(a, b)


def code_of(nb: nbformat.NotebookNode) -> str:
    return "\n".join(c.source for c in nb.cells if c.cell_type == "code")


@pytest.fixture
def notebooks(tmp_path: Path) -> Path:
    return tmp_path / "notebooks"


# -- names and types ------------------------------------------------------------------------------
@pytest.mark.parametrize(("key", "name"), [
    ("Minimum Extents", "minimum_extents"),
    ("bkgd-range-min", "bkgd_range_min"),
    ("hardmaskOnly", "hardmask_only"),
    ("TOFmin", "tofmin"),
    ("Minimum TOF (us)", "minimum_tof_us"),
    ("class", "class_"),
    ("list", "list_"),
    ("json", "json_"),  # an attribute of pydantic's BaseModel: the runner checks parameters with a model
    ("instrument", "instrument_"),  # nbreduce's own parameter
    ("2theta range", "var_2theta_range"),
    ("λ min", "lamda_min"),
    ("Ångström scale", "angstrom_scale"),
    ("", "variable"),
    ("%%", "variable"),
])
def test_identifiers_from_keys(key: str, name: str) -> None:
    assert importer.identifier(key) == name
    assert name.isidentifier() and not name.startswith("_")


def test_identifier_collisions_get_a_suffix() -> None:
    taken = {"minimum_extents"}
    second = importer.identifier("minimum extents", taken)
    taken.add(second)
    assert (second, importer.identifier("MinimumExtents", taken)) == ("minimum_extents_2", "minimum_extents_3")


@pytest.mark.parametrize(("value", "annotation", "editable"), [
    (None, "Optional[str]", True),
    (True, "bool", True),
    (3, "int", True),
    (2.5, "float", True),
    ("a=b#c", "str", True),
    ([1, 2], "list[int]", True),
    ([2, 0.5], "list[float]", True),
    (["a", "b"], "list[str]", True),
    ([True, False], "list[bool]", True),
    ([], "list[float]", True),
    ([[0, 10], [10, 20]], "list", False),
    ([1, "two", None], "list", False),
    ((10, 170), "tuple", False),
    ({"bank_1": [1, 2]}, "dict", False),
])
def test_types_from_values_are_what_the_rerun_form_reads(value: Any, annotation: str, editable: bool) -> None:
    """The annotation and default written for a value come back through papermill's parser and the form's
    spec with the intended kind; editable values pass the form's strict check unchanged in meaning."""
    got, can_edit, _ = importer.annotate(value)
    assert (got, can_edit) == (annotation, editable)
    line = importer._parameter_line("x", got, importer.literal_source(value), "help text")
    [parsed] = PythonTranslator.inspect({"source": f"from typing import Optional\n{line}"})
    assert same(ast.literal_eval(parsed.default), value)
    spec = spec_from_inspection("x", parsed._asdict())
    assert spec.editable == editable
    if editable:
        assert spec.check(value) == value


def test_defaults_with_equals_and_hash_survive_papermill() -> None:
    """papermill skips a line with two `=` and cuts a value at `#`: both are escaped inside strings."""
    for value in ["x=1#2", ["a=b", "#c"], {"k=": "#"}, "\\x3d"]:
        source = importer.literal_source(value)
        comment = importer.comment_text("help with x=1 and # inside")
        [parsed] = PythonTranslator.inspect({"source": f"v: str = {source}  # {comment}"})
        assert same(ast.literal_eval(parsed.default), value)
        assert parsed.help == "help with x\uff1d1 and # inside"
    assert importer.literal_source(float("nan")) is None  # no literal: kept as code, never a wrong default


# -- legacy folders -------------------------------------------------------------------------------
COMPUTED = {("standard_vars", "Calibration file"), ("standard_vars", "Detector mask"), ("advanced_vars", "Scale")}


@pytest.mark.parametrize(("folder", "computed"), [(AWKWARD, set()), (WISH, set()), (UNCONVERTIBLE, COMPUTED)],
                         ids=["awkward", "wish", "unconvertible"])
def test_inspection_gives_exactly_the_legacy_variables(folder: Path, computed: set, notebooks: Path) -> None:
    """Every variable written as a literal is a parameter with that default; computed ones stay code."""
    report = import_template(folder, notebooks, instrument="MERLIN")
    path = notebooks / "MERLIN" / "reduce.ipynb"
    nbformat.validate(nbformat.read(path, as_version=4))
    original = original_module(folder / "reduce_vars.py")
    parameters = inspected(path)
    legacy = {name: info for name, info in parameters.items() if name not in PLUMBING}
    variables = {v.name: v for v in report.variables}
    assert legacy.keys() == variables.keys()
    every = {(section, key) for section in ("standard_vars", "advanced_vars") for key in original[section]}
    assert {(f"{v.section}_vars", v.key) for v in variables.values()} == every - computed
    for name, info in legacy.items():
        variable = variables[name]
        assert same(ast.literal_eval(info["default"]), original[f"{variable.section}_vars"][variable.key]), name
        assert info["inferred_type_name"] == variable.annotation
        if variable.key != name:
            assert repr(variable.key).replace("=", "\uff1d") in info["help"], name  # the original key, in the help
    mapping = nbformat.read(path, as_version=4).metadata["nbreduce_import"]["parameters"]
    assert mapping == {v.name: {"key": v.key, "section": v.section} for v in report.variables}


@pytest.mark.parametrize("folder", [AWKWARD, WISH, UNCONVERTIBLE], ids=["awkward", "wish", "unconvertible"])
def test_rebuilt_reduce_vars_is_the_original_module(folder: Path) -> None:
    """With the template's defaults, the script reads exactly what the old reduce_vars gave it (computed values
    included, kept as code); with an injected value it reads that value under its original key."""
    conversion = convert(folder, "MERLIN")
    original = original_module(folder / "reduce_vars.py")
    module = rebuilt_module(conversion.notebook)
    for name in ("standard_vars", "advanced_vars", "variable_help"):
        assert same(dict(getattr(module, name)), dict(original[name])), name
    first = conversion.report.variables[0]
    changed = rebuilt_module(conversion.notebook, **{first.name: "changed"})
    assert changed.standard_vars[first.key] == "changed"


def test_legacy_folder_becomes_a_notebook_of_cells(notebooks: Path) -> None:
    report = import_template(AWKWARD, notebooks, instrument="MERLIN")
    nb = nbformat.read(notebooks / "MERLIN" / "reduce.ipynb", as_version=4)
    assert nb.metadata.kernelspec == {"name": "nbreduce-mantid", "display_name": "nbreduce mantid",
                                      "language": "python"}
    intro = nb.cells[0]
    assert intro.cell_type == "markdown"
    for name in ("reduce.py", "reduce_vars.py"):
        assert hashlib.sha256((AWKWARD / name).read_bytes()).hexdigest() in intro.source
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code[0].metadata.tags == ["parameters"] and all(not c.outputs for c in code)
    assert code[0].source.startswith("from typing import Optional")  # papermill reads Optional[...], not `| None`
    assert "monovan_run: Optional[str] = None" in code[0].source
    assert "bkgd_range_min: int = 18000  # (advanced) 'bkgd-range-min': Start of the flat background" in code[0].source
    assert "'Minimum Extents': minimum_extents," in code[1].source
    # the script body: imports, then one cell per top-level definition, in order, then the call
    starts = [next(line for line in c.source.splitlines() if line.strip() and not line.startswith("#"))
              for c in code[2:]]
    assert starts[0] == "import os" and starts[1:-1] == ["def validate(input_file, output_dir):",
                                                         "class Settings(object):",
                                                         "def main(input_file=None, output_dir=None):"]
    assert code[-1].source == "main(input_file=data_file, output_dir=output_dir)" == report.call
    body = "\n".join(c.source for c in code[2:-1])
    script_lines = [line for line in (AWKWARD / "reduce.py").read_text().splitlines() if line.strip()]
    assert all(line in body for line in script_lines)  # the script, unchanged
    config = TemplateRegistry(notebooks).config("MERLIN")
    assert (config.environment, config.file_prefix, config.run_digits, config.enabled) == ("mantid", "MER", 5, False)
    assert "awkward/reduce.py" in config.description


def test_rerun_form_has_standard_fields_editable_and_advanced_ones_collapsed(notebooks: Path) -> None:
    report = import_template(WISH, notebooks, environment="scipp", enable=True)
    assert report.enabled and report.runnable
    template = TemplateRegistry(notebooks).resolve("WISH")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. pydantic's "shadows an attribute" for a badly chosen name
        parameters_model(template.specs(), name="ImportedWish")
    fields = {spec.name: spec for spec in template.specs()}
    variables = {v.name: v for v in report.variables}
    for name, variable in variables.items():
        assert fields[name].advanced == (variable.section == "advanced"), name
        assert fields[name].editable == variable.editable, name
    assert {n for n, v in variables.items() if v.section == "standard"} <= {n for n, f in fields.items() if f.editable}
    assert not fields["mask_ranges_us"].editable and fields["mask_ranges_us"].advanced  # nested list
    assert fields["tof_bins"].help.startswith("'TOF bins': Number of time-of-flight bins")
    assert fields[importer.TEMPLATE_DIR].fixed and template.config.constants == {}  # injected by the runner
    assert all(fields[name].fixed for name in ("data_file", "output_dir", "run_number", "rb_number"))

    # the portal renders the advanced ones in a collapsed section after the others
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(REPO / "runner" / "portal" / "templates"), autoescape=True)
    html = env.from_string('{% from "_fields.html" import param_fields %}{{ param_fields(fields, {}, errors) }}')
    page = html.render(fields=list(fields.values()), errors={})
    before, details = page.split('<details class="advanced-params" id="advanced-params" >')
    for name, spec in fields.items():
        assert f'id="p-{name}"' in (details if spec.advanced else before), name
    assert "Advanced parameters (3)" in details
    opened = html.render(fields=list(fields.values()), errors={"bkgd_range_min": "expected a whole number"})
    assert '<details class="advanced-params" id="advanced-params" open>' in opened  # errors are never hidden


def test_unconvertible_code_is_reported_and_kept(notebooks: Path) -> None:
    conversion = convert(UNCONVERTIBLE, "LET")
    report = conversion.report
    messages = [str(f) for f in report.findings]

    def found(level: str, *parts: str) -> bool:
        return any(all(p in str(f) for p in parts) for f in report.of_level(level))  # type: ignore[arg-type]

    assert found("warning", "reduce_vars.py:17", "cycle_file('det_corr_153.dat')", "computed"), messages
    assert found("warning", "reduce_vars.py:19", "**EXTRA"), messages
    assert found("warning", "reduce_vars.py:23", "2 * pi", "computed"), messages
    assert found("warning", "reduce_vars.py:5", "from math import *"), messages
    assert found("warning", "reduce_vars.py:7", "BASE = os.path.join"), messages
    assert found("warning", "reduce.py:5", "instrument_utils", "import *"), messages
    assert found("warning", "reduce.py:9", "network", "https://example.org/masks/let_mask.xml"), messages
    assert found("error", "reduce.py:12", "main(data, output, mode)"), messages
    assert not report.runnable and report.call is None
    # kept as code: every statement of reduce_vars.py that is not a literal variable, in the rebuild cell
    code = code_of(conversion.notebook)
    for kept in ("BASE = os.path.join(os.sep, 'archive', 'NDXLET', 'calibration')", "**EXTRA,",
                 "'Calibration file': cycle_file('det_corr_153.dat'),", "advanced_vars['Scale'] = 2 * pi",
                 "def cycle_file(name):", "from math import *", "advanced_vars = OrderedDict()"):
        assert kept in code, kept
    assert "raise NotImplementedError" in conversion.notebook.cells[-1].source
    assert "def main(data, output, mode):" in code
    # written disabled, even when asked to enable it
    written = write_template(conversion, notebooks, enable=True)
    assert not written.enabled and TemplateRegistry(notebooks).config("LET").enabled is False


def test_fia_script_settings_become_parameters(notebooks: Path) -> None:
    report = import_template(FIA, notebooks)
    assert report.instrument == "OSIRIS" and report.kind == "fia" and report.call is None
    path = notebooks / "OSIRIS" / "reduce.ipynb"
    nb = nbformat.read(path, as_version=4)
    tree = ast.parse(FIA.read_text())
    literals = {s.targets[0].id: ast.literal_eval(s.value) for s in tree.body
                if isinstance(s, ast.Assign) and isinstance(s.targets[0], ast.Name) and s.lineno < 22}
    settings = {n: v for n, v in literals.items() if n not in ("output_dir", "instrument")}
    parameters = inspected(path)
    assert {n: ast.literal_eval(i["default"]) for n, i in parameters.items() if n not in PLUMBING} == settings
    assert parameters["analyser"]["help"] == "graphite or mica"  # the inline comment
    assert "# To change by automatic script" in nb.cells[1].source  # the comment moved with its settings
    body = "\n".join(c.source for c in nb.cells[2:] if c.cell_type == "code")
    assert not any(re.search(rf"^{name} =", body, flags=re.MULTILINE) for name in literals)
    assert '# output_dir = "/output"  <- removed by nbreduce template import' in body
    assert "rb_number = 1234567" in body and "_debug = False" in body and 'unit_x = "DeltaE"' in body
    assert "fold_multiple_frames = False" in body
    assert all(c.source.startswith("from __future__ import annotations") for c in nb.cells
               if c.cell_type == "code" and "\ndef " in c.source)
    assert not any('sys.modules["reduce_vars"]' in c.source for c in nb.cells)
    messages = [str(f) for f in report.findings]
    assert any("rb_number" in m and "another type" in m for m in messages)
    assert any("fold_multiple_frames (line 34)" in m for m in messages)
    assert any("osiris.cal" in m and "network" in m for m in messages)
    assert any("'/output'" in m and "write to output_dir" in m for m in messages)


def test_python2_script_is_refused_and_python2_helper_reported(tmp_path: Path, notebooks: Path) -> None:
    folder = tmp_path / "NDXMAPS" / "user" / "scripts" / "autoreduction"
    folder.mkdir(parents=True)
    (folder / "reduce_vars.py").write_text("standard_vars = {'Ei': 25}\n")
    (folder / "reduce.py").write_text("import reduce_vars as web_var\n\ndef main(input_file, output_dir):\n"
                                      "    print 'reducing', input_file\n")
    with pytest.raises(ConversionError, match=r"reduce\.py line 4: .*Python 2"):
        import_template(folder, notebooks)
    assert not notebooks.exists()

    # a Python 2 helper module: the script converts, the helper is copied for a person to port, the report says so
    (folder / "reduce.py").write_text("import reduce_vars as web_var\nimport maps_helpers\n\n"
                                      "def main(input_file, output_dir):\n    maps_helpers.run(input_file)\n")
    (folder / "maps_helpers.py").write_text("def run(path):\n    print 'reducing', path\n")
    report = import_template(folder, notebooks)
    assert not report.runnable and not report.enabled
    assert any(f.level == "error" and f.file == "maps_helpers.py" and "not valid Python 3" in f.message
               for f in report.findings)
    assert (notebooks / "MAPS" / "maps_helpers.py").read_text() == (folder / "maps_helpers.py").read_text()


@pytest.mark.parametrize(("signature", "call", "level"), [
    ("def main(input_file, output_dir):", importer.LEGACY_CALL, None),
    ("def main(input_file=None, output_dir=None):", importer.LEGACY_CALL, None),
    ("def main(output_dir, input_file, extra=1):", importer.LEGACY_CALL, None),
    ("def main(*args, **kwargs):", importer.LEGACY_CALL, "warning"),
    ("def main(data, output):", "main(data_file, output_dir)", "warning"),
    ("def main(input_file, output_dir, /):", "main(data_file, output_dir)", "warning"),
    ("def main(data, output, mode):", None, "error"),
    ("def main(input_file, output_dir, *, mode):", None, "error"),
    ("async def main(input_file, output_dir):", None, "error"),
])
def test_main_is_called_as_the_service_called_it(signature: str, call: str | None, level: str | None) -> None:
    [main] = ast.parse(f"{signature}\n    pass\n").body
    got, findings = importer.main_call(main, "reduce.py")  # type: ignore[arg-type]
    assert got == call
    assert [f.level for f in findings] == ([level] if level else [])


# -- the command ------------------------------------------------------------------------------------
def test_cli_import_report_overwrite_and_exit_codes(notebooks: Path, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["template", "import", str(WISH), "--notebooks", str(notebooks)]
    first = runner.invoke(cli, args)
    assert first.exit_code == 0, first.output
    assert "WISH: imported from" in first.output and "helper modules copied beside the notebook: nexus_events.py, " \
        "tof_tools.py" in first.output
    assert (notebooks / "WISH" / "tof_tools.py").read_bytes() == (WISH / "tof_tools.py").read_bytes()
    assert (notebooks / "WISH" / "nexus_events.py").is_file()  # imported by tof_tools, not by reduce.py
    assert not (notebooks / "WISH" / "reduce_vars.py").exists()  # rebuilt from the parameters instead

    again = runner.invoke(cli, args)
    assert again.exit_code == 1 and "already holds a template" in again.output
    forced = runner.invoke(cli, [*args, "--force", "--json", "--environment", "scipp"])
    assert forced.exit_code == 0, forced.output
    report = ConversionReport.model_validate_json(forced.output)
    assert report.environment == "scipp" and TemplateRegistry(notebooks).config("WISH").environment == "scipp"

    broken = runner.invoke(cli, ["template", "import", str(UNCONVERTIBLE), "-i", "LET", "--notebooks", str(notebooks)])
    assert broken.exit_code == 2 and "errors (the template cannot run until they are fixed)" in broken.output

    loose = tmp_path / "scripts" / "reduce.py"
    loose.parent.mkdir()
    loose.write_text("x = 1\n")
    unnamed = runner.invoke(cli, ["template", "import", str(loose), "--notebooks", str(notebooks)])
    assert unnamed.exit_code == 1 and "give --instrument" in unnamed.output


# -- end to end -----------------------------------------------------------------------------------
EVENTS = 30_000
RUN = 4242


@pytest.mark.slow
@pytest.mark.broker
def test_imported_script_runs_through_broker_and_runner(build_environment, tmp_path: Path) -> None:
    """The no-Mantid WISH script, imported for the ``scipp`` environment (h5py, numpy), reduces a simulated WISH
    run in that environment's kernel, run from the archive (working directory = the version's folder), with its
    helper modules imported from the template's folder; a rerun's parameters reach the script's reduce_vars."""
    settings = build_environment("scipp")
    notebooks = tmp_path / "notebooks"
    report = import_template(WISH, notebooks, environment="scipp", enable=True, known_environments={"scipp"})
    assert report.enabled and report.helpers == ["nexus_events.py", "tof_tools.py"]
    data = tmp_path / "data"
    simulated = TemplateRegistry(REPO / "notebooks").config("WISH")
    path = sim.write_run(data, simulated, RUN, "1234567", events=EVENTS, title="imported script", seed=RUN)
    with h5py.File(path) as f:  # ground truth, counted independently of the script
        tof = np.concatenate([f[f"raw_data_1/instrument/bank_{b}/events/event_time_offset"][()] for b in range(1, 6)])
    masked = int(sum(((tof >= lo) & (tof < hi)).sum() for lo, hi in [(19900, 20100), (39900, 40100)]))
    assert tof.size == EVENTS and masked > 0

    with running_platform(settings.home, NBREDUCE_NOTEBOOKS=str(notebooks), NBREDUCE_DATA_ROOTS=str(data)) as platform:
        first = submit_request(platform, instrument="WISH", run_number=RUN, data=str(path), rb_number="1234567")
        final = wait_for_jobs(platform, {first}, 300)[first]
        assert final.state is JobState.SUCCEEDED, (final.reason, final.error)
        rerun = submit_request(platform, instrument="WISH", run_number=RUN, data=str(path), rb_number="1234567",
                               reduction_arguments={"tof_bins": 60, "banks": [1, 5]}, rerun_of=first)
        second = wait_for_jobs(platform, {rerun}, 300)[rerun]
        assert second.state is JobState.SUCCEEDED, (second.reason, second.error)

    assert final.kernel is not None and final.kernel.startswith("nbreduce-scipp")
    version = platform.archive / "WISH" / "RB1234567" / str(RUN) / "v1"
    summary = json.loads((version / "summary.json").read_text())
    assert summary["run_number"] == RUN and summary["total_events"] == EVENTS
    assert summary["histogrammed_events"] == EVENTS - masked  # every event is inside 6000..99000 us
    assert summary["banks"] == [1, 2, 3, 4, 5] and summary["vanadium_run"] is None
    assert Path(summary["helper_module"]).parent == notebooks / "WISH"  # imported from the template's folder
    assert sorted(Path(p).name for p in final.output_files) == sorted(["summary.json", *summary["files"]])
    histogram = np.loadtxt(version / f"WISH{RUN:08d}_bank_1.dat")
    assert histogram.shape == (180, 2)

    rerun_dir = platform.archive / "WISH" / "RB1234567" / str(RUN) / "v2"
    rerun_summary = json.loads((rerun_dir / "summary.json").read_text())
    assert rerun_summary["banks"] == [1, 5] and second.parameters["tof_bins"] == 60
    assert np.loadtxt(rerun_dir / f"WISH{RUN:08d}_bank_5.dat").shape == (60, 2)
    assert not (rerun_dir / f"WISH{RUN:08d}_bank_2.dat").exists()


def test_names_local_to_functions_do_not_rename_parameters() -> None:
    tree = ast.parse("import os as o, numpy\nfrom a.b import c\ndef main(x):\n    banks = 1\nclass K:\n    y = 2\n"
                     "for i, (j, k) in []:\n    pass\nwith open('f') as h:\n    z = [q for q in ()]\n")
    assert [n for s in tree.body for n in importer.bound_names(s)] == ["o", "numpy", "c", "main", "K", "i", "j", "k",
                                                                       "h", "z"]


def test_reassigned_section_flat_help_and_file_variable(tmp_path: Path, notebooks: Path) -> None:
    """A section assigned twice converts its last value (as Python does); a flat variable_help applies to both
    sections; a script that locates files with __file__ finds them in the template's folder."""
    folder = tmp_path / "NDXSXD" / "user" / "scripts" / "autoreduction"
    folder.mkdir(parents=True)
    (folder / "reduce_vars.py").write_text(
        "standard_vars = {'a': 1, 'b': 2}\nstandard_vars = {'a': 10, 'c': 'x'}\nadvanced_vars = {'d': None}\n"
        "variable_help = {'a': 'help of a', 'd': 'help of d', 'gone': 'old help'}\n")
    (folder / "reduce.py").write_text("import os\nimport reduce_vars as web_var\n\nHERE = os.path.dirname(__file__)\n\n"
                                      "def main(input_file, output_dir):\n    return HERE\n")
    report = import_template(folder, notebooks)
    assert [(v.name, v.section, v.default, v.help) for v in report.variables] == [
        ("a", "standard", "10", "help of a"), ("c", "standard", "'x'", ""), ("d", "advanced", "None", "help of d")]
    assert [f.message for f in report.findings if "gone" in f.message] == [
        "variable_help has help for 'gone', which is not a variable of any section"]
    nb = nbformat.read(notebooks / "SXD" / "reduce.ipynb", as_version=4)
    module = rebuilt_module(nb)
    original = original_module(folder / "reduce_vars.py")
    assert same(module.standard_vars, original["standard_vars"]) and same(module.advanced_vars,
                                                                           original["advanced_vars"])
    config = TemplateRegistry(notebooks).config("SXD")
    assert (config.file_prefix, config.run_digits) == ("SXD", 5)
    assert config.constants == {}  # the runner injects template_dir
    namespace: dict[str, Any] = {importer.TEMPLATE_DIR: str(notebooks / "SXD")}
    path_cell = next(c.source for c in nb.cells if c.cell_type == "code" and "HELPER_MODULES" in c.source)
    saved = list(sys.path)
    try:
        exec(path_cell, namespace)
    finally:
        sys.path[:] = saved
    assert namespace["__file__"] == str(notebooks / "SXD" / "reduce.py")
