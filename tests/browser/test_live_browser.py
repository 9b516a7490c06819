"""Live and comparable results in a real browser: progress while a reduction runs, warnings, comparing two
versions with nbdime, and notifications by e-mail and webhook.

Everything real: JupyterHub, its proxy, the portal and the notification service started by the hub's own
configuration, the embedded broker, a runner thread executing the fixture templates in real kernels, a
local SMTP server (aiosmtpd) and a local HTTP server for webhooks. Screenshots go to test-artifacts/.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml
from aiosmtpd.controller import Controller
from pipeline_support import FIXTURE_NOTEBOOKS
from test_hub import PASSWORD, Hub, wait_http
from test_notify import Hooks, Mailbox
from test_portal_support import MEMBERSHIP, archive_job, publish_status, seed

from runner.bus.embedded import EmbeddedBroker, free_port
from runner.bus.models import JobState
from runner.config import Settings
from runner.hub.launch import start_hub, stop_hub
from runner.pipeline.consumer import Runner
from runner.pipeline.submit import submit_request, wait_for_jobs
from tests.browser.test_portal_browser import browser, login  # noqa: F401 - the module-scoped browser fixture

pytestmark = [pytest.mark.broker, pytest.mark.slow]


class LiveHub(Hub):
    mailbox: Mailbox
    hooks: Hooks


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveHub]:
    """Hub + portal + notify service (from the hub's config) + runner, with an SMTP and a webhook server."""
    home = tmp_path_factory.mktemp("live-hub") / "home"
    home.mkdir()
    mailbox = Mailbox()
    smtp = Controller(mailbox, hostname="127.0.0.1", port=free_port())
    smtp.start()
    hooks = Hooks()
    threading.Thread(target=hooks.serve_forever, daemon=True).start()
    port = free_port()
    with pytest.MonkeyPatch.context() as mp:
        env = {"NBREDUCE_HOME": str(home), "NBREDUCE_DATA_ROOTS": str(home / "data"),
               "NBREDUCE_NOTEBOOKS": str(home / "notebooks"), "NBREDUCE_NOTIFY__SMTP_HOST": "127.0.0.1",
               "NBREDUCE_NOTIFY__SMTP_PORT": str(smtp.port), "NBREDUCE_NOTIFY__SMTP_FROM": "reductions@isis.example",
               "NBREDUCE_NOTIFY__WEBHOOK_BACKOFF_SECONDS": "0.2", "NBREDUCE_NOTIFY__WEBHOOK_RETRIES": "2",
               "NBREDUCE_NOTIFY__PORTAL_URL": f"http://127.0.0.1:{port}/services/portal/"}
        for name, value in env.items():
            mp.setenv(name, value)
        mp.delenv("NBREDUCE_BROKER__BOOTSTRAP_SERVERS", raising=False)
        settings = Settings.from_env()
        (home / "data").mkdir()
        broker = EmbeddedBroker(settings)
        broker.start(memory=True)
        jobs = seed(settings)
        for name in ("LONG", "WARN"):
            shutil.copytree(FIXTURE_NOTEBOOKS / name, settings.notebooks / name)
        # a second version of alice's run 1001 with a changed parameter (and so a changed result)
        jobs["alice_v2"] = archive_job(settings, instrument="MARI", rb="1920001", run=1001, title="vanadium alice",
                                       requested_by="alice", parameters={"ei": 42.0, "mode": "single-crystal"},
                                       rerun_of=jobs["alice"].job_id)
        publish_status(settings, jobs["alice_v2"])
        membership = home / "membership.yaml"
        membership.write_text(yaml.safe_dump(MEMBERSHIP))
        log = home / "hub.log"
        proc = start_hub(settings, port=port, membership=membership, password=PASSWORD, log_file=log)
        stop, ready = threading.Event(), threading.Event()
        runner = threading.Thread(target=Runner(settings).run, args=(stop, ready.set), daemon=True)
        runner.start()
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/hub/health")
            wait_http(f"{url}/services/portal/static/portal.css")
            assert ready.wait(60), "runner did not start"
            deadline = time.monotonic() + 90
            while "notify: " not in log.read_text() or "following nbreduce.reduction-status" not in log.read_text():
                assert time.monotonic() < deadline, "no notify service:\n" + log.read_text()[-3000:]
                time.sleep(0.3)
            hub = LiveHub(url, settings, jobs, log)
            hub.mailbox, hub.hooks = mailbox, hooks
            yield hub
        finally:
            stop.set()
            runner.join(60)
            stop_hub(proc)
            broker.stop()
            smtp.stop()
            hooks.shutdown()


def data_file(hub: Hub, name: str) -> str:
    path = hub.settings.data_roots[0] / name
    path.write_text("counts")
    return str(path)


def test_progress_bar_moves_and_log_grows_while_it_runs(browser, live: LiveHub, artifacts: Path) -> None:  # noqa: F811
    page = login(browser, live, "alice")
    job = submit_request(live.settings, instrument="LONG", run_number=5001, data=data_file(live, "LONG5001.txt"),
                         rb_number="1920001", requested_by="alice", run_title="slow sample scan",
                         reduction_arguments={"steps": 10, "step_seconds": 1.0})
    bar = page.locator(f'[data-progress="{job}"] progress')
    deadline = time.monotonic() + 60
    while bar.count() == 0:  # a new run: its row appears on the next load once the runner took it
        assert time.monotonic() < deadline, "the LONG run never showed as running"
        page.goto(f"{live.url}/services/portal/?instrument=LONG")
        time.sleep(0.5)
    first = float(bar.get_attribute("value") or 0)
    page.wait_for_function(  # the bar moves by itself (server-sent events), no reload
        f"() => document.querySelector('[data-progress=\"{job}\"] progress').value > {first}", timeout=30_000)
    page.screenshot(path=str(artifacts / "live-run-list-progress.png"), full_page=True)

    page.goto(f"{live.url}/services/portal/jobs/{job}")
    page.wait_for_selector("#live")
    page.wait_for_function("() => document.getElementById('log').textContent.includes('step 2 of 10 done')",
                           timeout=30_000)
    early = page.inner_text("#log")
    page.wait_for_function("() => document.getElementById('log').textContent.includes('step 5 of 10 done')",
                           timeout=30_000)
    assert page.inner_text("#state") == "running"  # the log grew while the job was still running
    later = page.inner_text("#log")
    assert later.startswith(early.strip()) and len(later) > len(early)
    assert "cell" in page.inner_text("#progress-text") and "Slow loop" in page.inner_text("#progress-text")
    page.screenshot(path=str(artifacts / "live-run-page-log.png"), full_page=True)
    page.wait_for_selector("#finished:not([hidden])", timeout=60_000)
    page.reload()
    assert page.inner_text("#state") == "succeeded"
    timings = page.inner_text("#timings")
    assert "Slow loop" in timings and "Save" in timings  # where the time went, from papermill's metadata
    page.screenshot(path=str(artifacts / "live-run-page-done.png"), full_page=True)


def test_suspect_result_shows_the_warning_badge(browser, live: LiveHub, artifacts: Path) -> None:  # noqa: F811
    job = submit_request(live.settings, instrument="WARN", run_number=5002, data=data_file(live, "WARN5002.txt"),
                         rb_number="1920001", requested_by="alice", run_title="MARI-like run, no elastic line")
    assert wait_for_jobs(live.settings, {job}, 120)[job].state is JobState.SUCCEEDED
    page = login(browser, live, "alice")
    page.goto(f"{live.url}/services/portal/?instrument=WARN")
    badge = page.locator(f'#runs .state[data-job="{job}"]')
    badge.wait_for()
    assert badge.inner_text() == "succeeded with warnings" and "state-warnings" in badge.get_attribute("class")
    page.screenshot(path=str(artifacts / "warnings-run-list.png"), full_page=True)
    page.click(f'#runs a[href$="jobs/{job}"]')
    page.wait_for_selector("#warnings")
    assert page.inner_text("#state") == "succeeded with warnings"
    text = page.inner_text("#warnings")
    assert "no elastic line found" in text and "UserWarning: peak fit did not converge" in text
    page.screenshot(path=str(artifacts / "warnings-run-page.png"), full_page=True)


def test_compare_v1_v2_shows_changes_and_the_nbdime_diff(browser, live: LiveHub, artifacts: Path) -> None:  # noqa: F811
    v1, v2 = live.jobs["alice"], live.jobs["alice_v2"]
    page = login(browser, live, "alice")
    page.set_viewport_size({"width": 1400, "height": 1000})
    page.goto(f"{live.url}/services/portal/jobs/{v2.job_id}")
    page.select_option("#compare-with", v1.job_id)
    with page.expect_navigation():
        page.click("#compare")
    changed = page.locator("#compare-parameters tr.changed")
    assert sorted(changed.evaluate_all("rows => rows.map(r => r.dataset.name)")) == ["ei", "mode"]
    row = page.inner_text('#compare-parameters tr[data-name="ei"]')
    assert "42.0" in row and "25.0" in row
    assert page.locator('#compare-parameters tr.changed[data-name="bins"]').count() == 0  # unchanged: not marked
    scrap = page.locator('#compare-scraps tr.changed[data-name="ei"]')
    assert scrap.count() == 1 and "differs" in scrap.inner_text() and "42" in scrap.inner_text()
    assert page.locator("#compare-plots img").count() == 2  # the figure of each version, side by side
    frame = page.frame_locator("#nbdime")
    frame.locator(".jp-Notebook-diff").wait_for(timeout=60_000)  # nbdime's own renderer drew the diff
    frame.locator(".jp-Cell-diff:not(.jp-Diff-unchanged)").first.wait_for()  # the changed cell is shown
    diff_text = frame.locator("#nbdime-root").inner_text()
    assert "42.0" in diff_text and "single-crystal" in diff_text
    page.screenshot(path=str(artifacts / "compare-v1-v2.png"), full_page=True)
    # the diff API answers only for runs the user may see
    bob = login(browser, live, "bob")
    bob.goto(f"{live.url}/services/portal/jobs/{live.jobs['bob'].job_id}")
    reply = bob.request.post(f"{live.url}/services/portal/nbdime/api/diff",
                             data=json.dumps({"base": v1.job_id, "remote": v2.job_id}))
    assert reply.status == 403


def test_subscription_sends_email_and_webhook(browser, live: LiveHub, artifacts: Path) -> None:  # noqa: F811
    page = login(browser, live, "alice")
    page.goto(f"{live.url}/services/portal/notifications")
    page.select_option("#s-target", "rb:1920001")
    page.fill("#s-email", "alice@isis.example")
    page.fill("#s-webhook", live.hooks.url)
    with page.expect_navigation():
        page.click("#subscribe")
    assert page.locator("#subscription-saved").count() == 1, page.inner_text("main")
    page.fill("#s-webhook", f"http://127.0.0.1:{free_port()}/nobody-listens")  # a second one, bound to fail
    page.fill("#s-email", "")
    with page.expect_navigation():
        page.click("#subscribe")
    assert page.locator("#subscriptions tbody tr").count() == 2
    time.sleep(1)  # the service folds the subscriptions topic (its table follows it live)

    job = submit_request(live.settings, instrument="WARN", run_number=5003, data=data_file(live, "WARN5003.txt"),
                         rb_number="1920001", requested_by="alice")
    [mail] = live.mailbox.wait(1, timeout=120)
    assert mail["To"] == "alice@isis.example"
    assert mail["Subject"] == "[nbreduce] WARN run 5003 v1 (RB1920001) succeeded with warnings"
    body = mail.get_payload(decode=True).decode()
    assert "no elastic line found" in body and f"/services/portal/jobs/{job}" in body
    [(headers, event)] = live.hooks.wait(1, timeout=60)
    assert event["job_id"] == job and event["warnings"][0] == "no elastic line found"
    assert headers["X-Nbreduce-Event"] == "succeeded with warnings"

    deadline = time.monotonic() + 60  # the failing webhook is retried, then its failure recorded
    while "FAILED" not in page.inner_text("#subscriptions"):
        assert time.monotonic() < deadline, page.inner_text("#subscriptions")
        time.sleep(1)
        page.reload()
    text = page.inner_text("#subscriptions")
    assert "sent" in text and "nobody-listens" in text and "3 attempts" in text
    page.screenshot(path=str(artifacts / "notifications.png"), full_page=True)
    assert len(live.mailbox.messages) == 1  # bob's experiment and the other RB are not alice's business
