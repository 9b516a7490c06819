"""Scraps read from the executed notebook's own outputs (scrapbook and pandas imported in the kernel only for
scraps that need them), and kernels' runtime files kept under ``<home>/run`` and removed with their kernels."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from nbformat.v4 import new_code_cell, new_notebook

from runner.config import Settings
from runner.kernels.pool import KernelPool, remove_stale_runtime_files
from runner.pipeline import execute as execute_module
from runner.pipeline.execute import execute
from runner.pipeline.inspection import glued_payloads, glued_scraps

READY = 120


def template(path: Path, *sources: str) -> Path:
    nb = new_notebook(cells=[new_code_cell("output_dir = '.'", metadata={"tags": ["parameters"]}),
                             *(new_code_cell(s) for s in sources)])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)
    return path


def test_json_scraps_are_read_from_the_output_bundles() -> None:
    nb = new_notebook(cells=[new_code_cell("x", outputs=[
        nbformat.v4.new_output("display_data", data={"application/scrapbook.scrap.json+json": {
            "name": "counts", "data": [1, 2, 3], "encoder": "json", "version": 1}}),
        nbformat.v4.new_output("display_data", data={"application/scrapbook.scrap.json+json": {
            "name": "counts", "data": 7, "encoder": "json", "version": 1}}),  # glued again: the last one wins
        nbformat.v4.new_output("display_data", data={"text/plain": "not a scrap"}),
    ])])
    assert glued_scraps(glued_payloads(nb)) == {"counts": 7}
    nb.cells[0].outputs.append(nbformat.v4.new_output("display_data", data={
        "application/scrapbook.scrap.text+json": {"name": "title", "data": "x", "encoder": "text", "version": 1}}))
    payloads = glued_payloads(nb)
    assert [p["encoder"] for p in payloads] == ["json", "json", "text"]
    assert glued_scraps(payloads) == {"counts": 7}  # what only scrapbook decodes is not guessed here
    assert glued_scraps(payloads, {"title": "decoded"}) == {"counts": 7, "title": "decoded"}
    assert glued_payloads(new_notebook()) == []


@pytest.fixture
def pool(settings: Settings):
    with KernelPool(settings, {}, fork_servers=False) as kernels:
        yield kernels


def test_a_notebook_that_glued_nothing_costs_no_scrap_reading(settings: Settings, pool: KernelPool, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("scrapbook used for a notebook that glued only JSON scraps or nothing")

    monkeypatch.setattr(execute_module, "scraps_from_kernel", refuse)
    nothing = template(tmp_path / "nothing.ipynb", "import sys\nassert 'pandas' not in sys.modules")
    result = execute(nothing, tmp_path / "out1.ipynb", tmp_path, {}, "python3", pool, timeout=READY)
    assert result.state.value == "succeeded" and result.scraps == {}, result.reason
    glued = template(tmp_path / "glued.ipynb", "import scrapbook as sb\nsb.glue('run', 42)\nsb.glue('ok', True)")
    result = execute(glued, tmp_path / "out2.ipynb", tmp_path, {}, "python3", pool, timeout=READY)
    assert result.scraps == {"run": 42, "ok": True}
    assert result.timings.keys() >= {"kernel", "execute", "cells", "scraps", "notebook"}


def test_scraps_of_other_encoders_are_decoded_by_scrapbook_in_the_kernel(settings: Settings, pool: KernelPool,
                                                                          tmp_path: Path) -> None:
    table = template(tmp_path / "table.ipynb", "import pandas as pd, scrapbook as sb\n"
                     "sb.glue('table', pd.DataFrame({'a': [1, 2]}), encoder='pandas')\nsb.glue('n', 2)\n"
                     "sb.glue('title', 'first')\nsb.glue('title', 'second')")
    result = execute(table, tmp_path / "out.ipynb", tmp_path, {}, "python3", pool, timeout=READY)
    assert result.scraps["n"] == 2 and result.scraps["title"] == "second"  # text scraps: scrapbook's decoding
    assert result.scraps["table"]["encoder"] == "pandas" and result.scraps["table"]["type"] == "DataFrame"


def test_connection_files_live_under_home_and_go_with_their_kernels(settings: Settings, pool: KernelPool,
                                                                    tmp_path: Path) -> None:
    km = pool.acquire("python3", cwd=tmp_path, timeout=READY)
    connection = Path(km.connection_file)
    assert connection.parent == settings.run_dir and connection.is_file()
    assert connection.name.startswith(f"kernel-{os.getpid()}-")
    pool.release(km)
    pool._reaper.submit(lambda: None).result(READY)  # the kernel is shut down by the pool's reaper thread
    assert not connection.exists()
    assert not [p for p in settings.run_dir.iterdir() if p.name.startswith(connection.stem)]


def test_runtime_files_of_a_killed_runner_are_removed_at_the_next_start(settings: Settings) -> None:
    run_dir = settings.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(gone.stdout)
    left = [run_dir / f"kernel-{dead}-0123456789ab.json", run_dir / f"kernel-{dead}-0123456789ab-1"]
    alive = run_dir / f"kernel-{os.getpid()}-ba9876543210.json"
    other = run_dir / "something-else.json"
    for path in [*left, alive, other]:
        path.write_text("{}")
    assert remove_stale_runtime_files(run_dir) == 2
    assert not any(p.exists() for p in left) and alive.exists() and other.exists()
