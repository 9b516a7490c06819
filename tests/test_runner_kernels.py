"""Runner with environments and the warm pool: kernel choice, provenance, isolation, death, parallelism."""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Iterator
from pathlib import Path

import nbformat
import pytest
from pipeline_support import FIXTURE_NOTEBOOKS, running_platform

from runner import __version__
from runner.bus.models import JobState
from runner.config import Settings
from runner.kernels.environments import build, load
from runner.pipeline.submit import submit_request, wait_for_jobs


@pytest.fixture(scope="module")
def platform(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Settings]:
    home = tmp_path_factory.mktemp("kernels")
    settings = Settings.from_env({"NBREDUCE_HOME": str(home)})
    results = build(settings, ["minimal"])
    assert results[0].status in ("built", "unchanged"), results[0].message
    with running_platform(home, NBREDUCE_RUNNER__MAX_PARALLEL="2",
                          NBREDUCE_KERNELS__WARM="python3=2,nbreduce-minimal=1") as s:
        yield s


def data(settings: Settings, name: str) -> str:
    path = settings.data_roots[0] / name
    path.write_text("counts")
    return str(path)


def test_instrument_environment_kernel_and_provenance(platform: Settings) -> None:
    env = load("minimal", platform.environments)
    job = submit_request(platform, instrument="MINI", run_number=5, data=data(platform, "MINI5.txt"),
                         rb_number="1920101", requested_by="alice")
    final = wait_for_jobs(platform, {job}, 120)[job]
    assert final.state is JobState.SUCCEEDED, final.reason
    assert final.kernel == "nbreduce-minimal"
    assert final.environment == "minimal" and final.environment_hash == env.hash12
    template = FIXTURE_NOTEBOOKS / "MINI" / "reduce.ipynb"
    assert final.template_hash == "sha256:" + hashlib.sha256(template.read_bytes()).hexdigest()

    nb = nbformat.read(platform.archive / final.notebook, as_version=4)
    meta = nb.metadata.nbreduce
    assert nb.metadata.kernelspec.name == "nbreduce-minimal"
    assert env.hash12 in nb.metadata.kernelspec.display_name
    assert meta.template == str(template) and meta.template_hash == final.template_hash
    assert meta.kernel.environment == "minimal" and meta.kernel.environment_hash == env.hash12
    assert any(p.startswith("numpy==") for p in meta.kernel.packages)
    assert meta.parameters == final.parameters and meta.parameters["run_number"] == 5
    assert meta.trigger.message_id and meta.trigger.topic == "nbreduce.reduction-requests"
    assert meta.runner.version == __version__ and meta.runner.host
    assert meta.started_at < meta.finished_at
    # the kernel really was the environment's interpreter
    output = "".join(o.get("text", "") for c in nb.cells for o in c.get("outputs", []))
    assert f"minimal-{env.hash12}" in output and env.hash12 in output


def test_rerun_with_the_original_environment_build(platform: Settings) -> None:
    env = load("minimal", platform.environments)
    ok = submit_request(platform, instrument="MINI", run_number=6, data=data(platform, "MINI6.txt"),
                        rb_number="1920101", environment_hash=f"sha256:{env.sha256}")
    missing = submit_request(platform, instrument="MINI", run_number=6, data=data(platform, "MINI6.txt"),
                             rb_number="1920101", environment_hash="0123456789ab")
    finals = wait_for_jobs(platform, {ok, missing}, 120)
    assert finals[ok].state is JobState.SUCCEEDED and finals[ok].kernel == f"nbreduce-minimal-{env.hash12}"
    assert finals[missing].state is JobState.FAILED
    assert "build 0123456789ab is not available" in (finals[missing].reason or "")


def test_warm_kernels_serve_one_run_each_and_runs_overlap(platform: Settings) -> None:
    jobs = [submit_request(platform, instrument="ECHO", run_number=40 + i, data=data(platform, f"E{i}.txt"),
                           rb_number="1920102") for i in range(4)]
    finals = wait_for_jobs(platform, set(jobs), 180)
    assert all(f.state is JobState.SUCCEEDED for f in finals.values()), [f.reason for f in finals.values()]
    pids = [f.scraps["pid"] for f in finals.values()]
    assert len(set(pids)) == 4  # never the same kernel twice
    spans = sorted((f.started_at, f.finished_at) for f in finals.values())
    assert any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))  # 2 in parallel


def test_kernel_death_fails_the_run_with_a_reason(platform: Settings) -> None:
    job = submit_request(platform, instrument="KILL", run_number=1, data=data(platform, "KILL1.txt"),
                         rb_number="1920103")
    final = wait_for_jobs(platform, {job}, 120)[job]
    assert final.state is JobState.FAILED
    assert "died" in (final.reason or "") and final.error is not None
    assert Path(platform.archive / final.notebook).exists()  # kept for inspection
    # and the runner goes on
    after = submit_request(platform, instrument="ECHO", run_number=50, data=data(platform, "E50.txt"),
                           rb_number="1920102")
    assert wait_for_jobs(platform, {after}, 120)[after].state is JobState.SUCCEEDED
