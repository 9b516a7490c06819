"""A scientist's path through the portal in a real browser (Playwright driving Debian's Chromium).

Real hub, proxy, portal and broker (fixture from test_hub.py) plus a real runner thread, so a rerun
submitted in the form becomes a new archived version. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

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
    page.wait_for_url(re.compile(r".*/hub/(home|spawn).*"))
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
