"""A scientist's path through the portal and JupyterLab in a real browser (Playwright driving Debian's Chromium).

Real hub, proxy, portal, single-user servers (as the users' own accounts) and broker (fixture from
test_hub.py) plus a real runner thread, so a rerun submitted in the form becomes a new archived version
and a working copy runs on the instrument kernel. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import pwd
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import h5py
import pytest
from playwright import sync_api as playwright_sync
from test_hub import PASSWORD, Hub, hub  # noqa: F401 - the module-scoped hub fixture

from runner.pipeline.consumer import Runner

#: Debian's Chromium (`make browser` installs it; Playwright cannot download its own here).
CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]
pytestmark = [pytest.mark.broker, pytest.mark.slow]


@pytest.fixture(scope="module")
def runner(hub: Hub) -> Iterator[None]:  # noqa: F811
    """The real runner in a thread, with the seeded runs' data files in place."""
    for job in hub.jobs.values():
        for name in job.data:
            Path(name).parent.mkdir(parents=True, exist_ok=True)
            with h5py.File(name, "w") as f:
                f.create_group("raw_data_1").create_dataset("experiment_identifier", data=[job.rb_number.encode()])
    stop, ready = threading.Event(), threading.Event()
    thread = threading.Thread(target=Runner(hub.settings).run, args=(stop, ready.set), daemon=True)
    thread.start()
    assert ready.wait(60)
    yield
    stop.set()
    thread.join(60)


@pytest.fixture(scope="module")
def browser() -> Iterator:
    assert CHROMIUM.exists(), "Chromium is missing: `make browser` installs Debian's chromium"
    with playwright_sync.sync_playwright() as p:
        instance = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        yield instance
        instance.close()


def login(browser, hub: Hub, user: str):  # noqa: F811
    page = browser.new_context(viewport={"width": 1280, "height": 900}).new_page()
    page.goto(f"{hub.url}/hub/login")
    page.fill("#username_input", user)
    page.fill("#password_input", PASSWORD)
    page.click("#login_submit")
    page.wait_for_url(re.compile(r".*/(hub/home|hub/spawn|services/portal/).*"))
    return page


def test_scientist_reruns_with_a_changed_parameter(browser, hub: Hub, runner: None, artifacts: Path) -> None:  # noqa: F811
    page = login(browser, hub, "alice")
    page.goto(f"{hub.url}/services/portal/")
    page.wait_for_selector("#runs")
    assert page.inner_text("#run-count").startswith("2 runs")
    assert "someone else" not in page.content() and "crystal" not in page.content()
    page.screenshot(path=str(artifacts / "portal-runs.png"), full_page=True)

    page.click("text=1002")
    page.wait_for_selector("#versions")
    assert page.inner_text("#state") == "failed" and "ZeroDivisionError" in page.inner_text("#error-details")
    page.screenshot(path=str(artifacts / "portal-run-page.png"), full_page=True)

    page.click("#rerun")
    page.wait_for_selector("#rerun-form")
    assert page.input_value("#p-ei") == "25.0"
    page.fill("#p-ei", "not a number")
    with page.expect_navigation():
        page.click("#submit-rerun")
    assert page.locator("#error-ei").count() == 1, (page.url, page.content()[:3000])
    assert "expected a number" in page.inner_text("#error-ei")
    page.fill("#p-ei", "42")
    page.select_option("#p-mode", "single-crystal")
    page.screenshot(path=str(artifacts / "portal-rerun-form.png"), full_page=True)
    with page.expect_navigation():
        page.click("#submit-rerun")
    assert page.locator("#rerun-requested").count() == 1, (page.url, page.content()[:3000])

    deadline = time.monotonic() + 180
    while "v2" not in page.inner_text("#versions"):
        assert time.monotonic() < deadline, "the rerun did not become version 2"
        time.sleep(1)
        page.reload()
    page.click("#versions >> text=v2")
    while page.inner_text("#state") != "succeeded":  # live updates change the badge; reload as a fallback
        assert time.monotonic() < deadline, page.inner_text("main")
        time.sleep(1)
        page.reload()
    parameters = page.inner_text("#parameters")
    assert "42.0" in parameters and "single-crystal" in parameters
    assert "v1" in page.inner_text("#versions")  # the old version stays
    page.screenshot(path=str(artifacts / "portal-new-version.png"), full_page=True)


def test_other_experiment_is_forbidden(browser, hub: Hub, artifacts: Path) -> None:  # noqa: F811
    page = login(browser, hub, "bob")
    reply = page.goto(f"{hub.url}/services/portal/jobs/{hub.jobs['alice'].job_id}")
    assert reply.status == 403
    assert page.inner_text("#error-status") == "403"
    page.screenshot(path=str(artifacts / "portal-forbidden.png"), full_page=True)


LOOP_PARAMETERS = """\
data_file = ""  # the run's data file
run_number = 0  # run number
rb_number = ""  # experiment
output_dir = "."  # where the outputs go
scale: float = 2.0  # a factor; range: 0..10
"""
LOOP_WORK = """\
import os
import numpy
counts = len(open(data_file).read())
os.makedirs(output_dir, exist_ok=True)
with open(os.path.join(output_dir, "result.txt"), "w") as f:
    f.write(f"{run_number} {counts * scale}")
print(f"reduced run {run_number} into {output_dir} with numpy {numpy.__version__}")
"""
#: Appended to the working copy by the test: the user's own kernel tries to reach another experiment.
PROBE = """\
import os
for path in ({other!r}, {other_file!r}, {archive!r}):
    try:
        os.listdir(path) if not path.endswith(".txt") else open(path).read()
        print("ALLOWED", path)
    except PermissionError:
        print("DENIED", path)
print("uid", os.getuid())
"""


def loop_template(notebooks: Path) -> None:
    """A template of the ``minimal`` environment (numpy): its kernel is an instrument kernel any account can run."""
    import nbformat

    folder = notebooks / "LOOP"
    folder.mkdir(parents=True, exist_ok=True)
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell(LOOP_PARAMETERS)
    params.metadata["tags"] = ["parameters"]
    nb.cells = [nbformat.v4.new_markdown_cell("# LOOP: a small reduction"), params,
                nbformat.v4.new_code_cell(LOOP_WORK)]
    nb.metadata["kernelspec"] = {"name": "nbreduce-minimal", "display_name": "nbreduce minimal", "language": "python"}
    nbformat.write(nb, folder / "reduce.ipynb")
    (folder / "instrument.toml").write_text('environment = "minimal"\ntimeout = 120\n')


def test_scientists_loop_working_copy_on_the_instrument_kernel(browser, hub: Hub, runner: None,  # noqa: F811
                                                               artifacts: Path) -> None:
    import nbformat
    import requests

    from runner.archive.integrity import verify
    from runner.pipeline.submit import submit_request, wait_for_jobs

    settings = hub.settings
    loop_template(settings.notebooks)
    data = settings.data_roots[0] / "LOOP77.txt"
    data.write_text("counts " * 10)
    job = submit_request(settings, instrument="LOOP", run_number=77, data=str(data), rb_number="1920001",
                         requested_by="run detection")
    final = wait_for_jobs(settings, {job}, 240)[job]
    assert final.state.value == "succeeded" and final.kernel == "nbreduce-minimal", final.reason
    assert verify(settings.archive).problems == []

    page = login(browser, hub, "alice")
    page.goto(f"{hub.url}/services/portal/jobs/{job}")
    page.wait_for_selector("#integrity")
    assert "unchanged since publication" in page.inner_text("#integrity")
    page.screenshot(path=str(artifacts / "loop-run-page.png"), full_page=True)
    with page.context.expect_page() as opened:
        page.click("#open-lab")
    lab = opened.value
    copy = "work/LOOP/RB1920001/77/v1/LOOP_77.ipynb"
    lab.wait_for_url(re.compile(f".*/user/alice/lab/tree/{re.escape(copy)}"), timeout=180_000)
    notebook_shown(lab, artifacts, "loop-working-copy")
    run_all(lab, "LOOP_77.ipynb")
    assert "nbreduce minimal (build" in lab.inner_text("#jp-main-statusbar")  # the build that produced the version
    text = wait_for_output(lab, r"^reduced run 77 into \S+/work/LOOP/RB1920001/77/v1")
    lab.screenshot(path=str(artifacts / "loop-working-copy.png"), full_page=True)
    assert str(settings.archive) not in text

    # the same member's own kernel, asked from inside to reach another experiment: the operating system refuses
    session = hub.login("alice")
    headers = {"Authorization": f"token {hub.token(session, 'alice')}"}
    other = settings.archive / "MARI" / "RB1930003"
    probe = nbformat.v4.new_notebook(metadata={"kernelspec": {"name": "nbreduce-minimal", "language": "python",
                                                              "display_name": "nbreduce minimal"}})
    probe.cells = [nbformat.v4.new_code_cell(PROBE.format(other=str(other), archive=str(settings.archive),
                                                          other_file=str(other / "1003" / "v1" / "summary.txt")))]
    reply = requests.put(f"{hub.url}/user/alice/api/contents/work/probe.ipynb", headers=headers, timeout=30,
                         json={"type": "notebook", "format": "json", "content": probe})
    assert reply.status_code in (200, 201), reply.text
    lab.goto(f"{hub.url}/user/alice/lab/tree/work/probe.ipynb")
    notebook_shown(lab, artifacts, "loop-probe")
    run_all(lab, "probe.ipynb")
    text = wait_for_output(lab, r"^uid \d+")
    lab.screenshot(path=str(artifacts / "loop-kernel-denied.png"), full_page=True)
    assert f"DENIED {other}" in text and f"DENIED {settings.archive}" in text and "ALLOWED" not in text
    assert "uid 0" not in text  # alice's kernel is not root
    home = Path(pwd.getpwnam("alice").pw_dir)
    assert (home / "work/LOOP/RB1920001/77/v1/result.txt").read_text() == "77 140.0"
    assert verify(settings.archive).problems == [], "the archive changed"


def notebook_shown(lab, artifacts: Path, name: str) -> None:
    """Wait for JupyterLab to show a notebook; if it never does, keep what the page showed instead."""
    try:
        lab.wait_for_selector(".jp-Notebook", timeout=180_000)
    except playwright_sync.TimeoutError:
        lab.screenshot(path=str(artifacts / f"{name}-not-shown.png"), full_page=True)
        raise AssertionError(f"no notebook shown at {lab.url}: {lab.inner_text('body')[-2000:]}") from None


def run_all(lab, name: str) -> None:
    """JupyterLab's Run > Run All Cells on notebook ``name``, once it is the current one and its kernel is idle."""
    deadline = time.monotonic() + 120
    while not ("| Idle" in (bar := lab.inner_text("#jp-main-statusbar")) and name in bar):
        assert time.monotonic() < deadline, bar
        time.sleep(0.5)
    lab.locator(".lm-MenuBar-itemLabel", has_text="Run").first.click()
    lab.locator(".lm-Menu-itemLabel", has_text="Run All Cells").first.click()


def wait_for_output(lab, pattern: str, timeout: float = 180) -> str:
    """The notebook's outputs once one line matches ``pattern``."""
    deadline = time.monotonic() + timeout
    while True:
        text = "\n".join(lab.locator(".jp-NotebookPanel:not(.lm-mod-hidden) .jp-OutputArea-output").all_inner_texts())
        if re.search(pattern, text, re.M):
            return text
        assert time.monotonic() < deadline, text[-3000:] or lab.inner_text(".jp-Notebook")[-3000:]
        time.sleep(1)
