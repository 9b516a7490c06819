"""The portal app on loopback with the real broker; the hub's identity is faked (unit level).

Access control is checked for every endpoint and every kind of user; the same endpoints through the
real hub and its OAuth are covered in test_hub.py.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
import requests
from jupyterhub.services.auth import HubOAuth
from test_portal_support import MEMBERSHIP, archive_job, publish_status, seed
from tornado.ioloop import IOLoop

from runner.bus.clients import read_topic
from runner.bus.embedded import free_port
from runner.bus.models import JobState, ReductionRequest, StatusEvent
from runner.bus.topics import PARAMETER_DEFAULTS, REDUCTION_REQUESTS
from runner.hub.access import Access, StaticMembership
from runner.portal.app import Portal, Subscriber, make_app
from runner.templates.defaults import ParameterDefaults, defaults_for

pytestmark = pytest.mark.broker
PREFIX = "/services/portal/"
MEMBERS = StaticMembership(MEMBERSHIP)


class HeaderAuth(HubOAuth):
    """Test identity: the user named in X-Test-User with their membership groups (no hub)."""

    def get_user(self, handler, *, sync=True):
        name = handler.request.headers.get("X-Test-User")
        groups = MEMBERS.groups(name) if name else None
        return None if groups is None else {"name": name, "kind": "user", "groups": groups}

    def check_xsrf_cookie(self, handler):  # the real hub check runs in test_hub.py
        return None


@dataclass
class Served:
    base: str
    portal: Portal
    jobs: dict

    def get(self, user: str | None, path: str, **kw) -> requests.Response:
        headers = {"X-Test-User": user} if user else {}
        return requests.get(self.base + path, headers=headers, allow_redirects=False, timeout=30, **kw)

    def post(self, user: str, path: str, data: dict) -> requests.Response:
        return requests.post(self.base + path, headers={"X-Test-User": user}, data=data, allow_redirects=False,
                             timeout=30)

    def wait_jobs(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while len(self.portal.index.jobs) < count:
            assert time.monotonic() < deadline, "portal did not fold the status topic"
            time.sleep(0.05)


@pytest.fixture
def served(broker) -> Iterator[Served]:
    jobs = seed(broker)
    portal = Portal(broker)
    port = free_port()
    stop = threading.Event()
    started = threading.Event()
    loop_box: list[asyncio.AbstractEventLoop] = []

    def serve() -> None:
        async def main() -> None:
            make_app(portal, HeaderAuth(api_url="http://127.0.0.1:1/hub/api", api_token="x", base_url=PREFIX),
                     PREFIX).listen(port, "127.0.0.1")
            portal.start_follower(IOLoop.current(), stop)
            loop_box.append(asyncio.get_running_loop())
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)

        asyncio.run(main())

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    assert started.wait(30)
    s = Served(f"http://127.0.0.1:{port}{PREFIX}", portal, jobs)
    s.wait_jobs(len(jobs))
    yield s
    stop.set()
    thread.join(10)


def test_run_list_shows_only_own_experiments(served: Served) -> None:
    def listed(user: str) -> set[str]:
        body = served.get(user, "api/runs").json()
        return {run["latest_job"] for run in body["runs"]}

    j = served.jobs
    assert listed("alice") == {j["alice"].job_id, j["alice_failed"].job_id}
    assert listed("bob") == {j["bob"].job_id}
    assert listed("carol") == {j["alice"].job_id, j["alice_failed"].job_id, j["other"].job_id}
    assert listed("dave") == {job.job_id for job in j.values()}
    assert listed("erin") == set()
    html = served.get("alice", "").text
    assert "vanadium alice" in html and "bob&#39;s crystal" not in html and "someone else" not in html


def test_filters_and_pagination(served: Served) -> None:
    def runs(**params) -> list[str]:
        return [r["run"] for r in served.get("dave", "api/runs", params=params).json()["runs"]]

    assert runs(instrument="wish") == ["2001"]
    assert runs(rb="1920001") == ["1002", "1001"]
    assert runs(state="failed") == ["1002"]
    assert runs(run_from=1002, run_to=1003) == ["1003", "1002"]
    assert runs(q="ALICE") == ["1002", "1001"]
    page = served.get("dave", "api/runs", params={"per_page": 3, "page": 2}).json()
    assert page["total"] == 4 and page["pages"] == 2 and len(page["runs"]) == 1
    assert served.get("dave", "api/runs", params={"page": 0}).status_code == 400
    assert served.get("dave", "api/runs", params={"state": "bogus"}).status_code == 400


ENDPOINTS = ["jobs/{id}", "api/jobs/{id}", "jobs/{id}/notebook", "jobs/{id}/files/summary.txt",
             "jobs/{id}/files/spectrum.png", "jobs/{id}/rerun"]


@pytest.mark.parametrize("endpoint", ENDPOINTS)
def test_every_job_endpoint_enforces_access(served: Served, endpoint: str) -> None:
    job = served.jobs["alice"]
    path = endpoint.format(id=job.job_id)
    for user in ("alice", "carol", "dave"):
        assert served.get(user, path).status_code == 200, (user, path)
    for user in ("bob", "erin"):
        assert served.get(user, path).status_code == 403, (user, path)
    assert served.get(None, path).status_code in (302, 403)  # not logged in: off to the hub's login
    assert served.post("bob", f"jobs/{job.job_id}/rerun", {"ei": "30"}).status_code == 403


def test_post_endpoints_enforce_access(served: Served) -> None:
    batch = {"instrument": "MARI", "run_from": "1001", "run_to": "1003", "ei": "30"}
    assert served.post("bob", "rerun", batch).status_code == 400  # nothing of his in the selection
    assert served.post("alice", "defaults/MARI", {"ei": "30"}).status_code == 403
    assert served.get("alice", "defaults/MARI").status_code == 403
    assert served.get("bob", "defaults/MARI").status_code == 403
    assert served.get("carol", "defaults/WISH").status_code == 403
    assert served.get("carol", "defaults/MARI").status_code == 200
    assert served.get("dave", "defaults/WISH").status_code == 200
    assert served.get("alice", "jobs/doesnotexist").status_code == 404


def test_run_page_content(served: Served) -> None:
    job = served.jobs["alice_failed"]
    html = served.get("alice", f"jobs/{job.job_id}").text
    for expected in ("ZeroDivisionError", "spectrum.png", "summary.txt", "data:image/png;base64",
                     "/hub/user-redirect/lab/tree/reductions/MARI/RB1920001/1002/v1/MARI_1002.ipynb", "v1"):
        assert expected in html, expected
    page = served.get("alice", f"jobs/{job.job_id}/notebook")
    assert page.status_code == 200 and "html output" in page.text
    assert page.headers["Content-Security-Policy"].startswith("sandbox")  # notebook scripts never run
    download = served.get("alice", f"jobs/{job.job_id}/files/summary.txt", params={"download": 1})
    assert download.text == "run 1002\n" and "attachment" in download.headers["Content-Disposition"]
    for sneaky in ("../../../RB1930003/1003/v1/summary.txt", "job.json", "..%2Fjob.json", "/etc/passwd"):
        assert served.get("alice", f"jobs/{job.job_id}/files/{sneaky}").status_code == 404, sneaky


def requests_on_topic(settings) -> list[ReductionRequest]:
    return [ReductionRequest.from_bytes(m.value()) for m in read_topic(settings, REDUCTION_REQUESTS)]


def test_rerun_form_prefilled_validated_and_published(served: Served, broker) -> None:
    job = served.jobs["alice"]
    form = served.get("alice", f"jobs/{job.job_id}/rerun").text
    assert 'name="ei" value="25.0"' in form and 'name="data_file"' not in form  # identity is not editable
    bad = served.post("alice", f"jobs/{job.job_id}/rerun",
                      {"ei": "__import__('os').system('id')", "bins": "1e3", "mode": "other", "masks": "[1, 'x']"})
    assert bad.status_code == 400
    assert requests_on_topic(broker) == []
    ok = served.post("alice", f"jobs/{job.job_id}/rerun",
                     {"ei": "30.5", "bins": "200", "mode": "single-crystal", "normalise": "false",
                      "masks": "[1, 2]", "label": 'x"; import os #'})
    assert ok.status_code == 302 and "requested=" in ok.headers["Location"]
    [request] = requests_on_topic(broker)
    assert request.rerun_of == job.job_id and request.requested_by == "alice"
    assert request.run_number == 1001 and request.rb_number == "1920001" and request.data == job.data
    assert request.reduction_arguments == {"ei": 30.5, "mode": "single-crystal", "bins": 200, "normalise": False,
                                           "masks": [1, 2], "label": 'x"; import os #'}


def test_batch_rerun_only_visible_runs(served: Served, broker) -> None:
    page = served.get("carol", "rerun", params={"instrument": "MARI", "run_from": 1000, "run_to": 1003})
    assert page.status_code == 200 and "3 runs selected" in page.text
    done = served.post("alice", "rerun", {"instrument": "MARI", "run_from": "1000", "run_to": "1003",
                                          "state": "failed", "bins": "50", "ei": ""})
    assert done.status_code == 302
    [request] = requests_on_topic(broker)  # alice's failed run only: not the other experiment's
    assert request.run_number == 1002 and request.reduction_arguments["bins"] == 50
    assert request.reduction_arguments["ei"] == 25.0  # blank = keep the run's own value


def test_defaults_set_by_instrument_scientist(served: Served, broker) -> None:
    assert served.post("carol", "defaults/MARI", {"ei": "40", "bins": ""}).status_code == 302
    assert served.post("carol", "defaults/MARI", {"rb": "1920001", "mode": "single-crystal"}).status_code == 302
    assert served.post("carol", "defaults/MARI", {"rb": "19x", "mode": "powder"}).status_code == 400
    assert served.post("carol", "defaults/MARI", {"ei": "1e9"}).status_code == 400  # outside range
    assert defaults_for(broker, "MARI", "1920001") == {"ei": 40.0, "mode": "single-crystal"}
    assert defaults_for(broker, "MARI", "1930003") == {"ei": 40.0}
    assert defaults_for(broker, "WISH", "1920001") == {}
    [first, *_] = [ParameterDefaults.from_bytes(m.value()) for m in read_topic(broker, PARAMETER_DEFAULTS)]
    assert first.set_by == "carol" and first.key == "instrument:MARI"
    assert 'value="40.0"' in served.get("carol", "defaults/MARI").text


def test_live_updates_are_filtered_by_access(served: Served, broker) -> None:
    stream = served.get("alice", "api/events", stream=True)
    new = archive_job(broker, instrument="MARI", rb="1920001", run=1001, state=JobState.SUCCEEDED,
                      requested_by="alice", rerun_of=served.jobs["alice"].job_id)
    publish_status(broker, new)
    seen = []
    for line in stream.iter_lines(decode_unicode=True):
        if line.startswith("data:"):
            seen.append(json.loads(line[5:]))
            break
    assert seen[0]["job_id"] == new.job_id and seen[0]["version"] == 2 and seen[0]["latest_job"] == new.job_id
    served.wait_jobs(5)
    versions = served.get("alice", f"api/jobs/{new.job_id}").json()["versions"]
    assert [v["version"] for v in versions] == [1, 2]
    stream.close()


def test_events_reach_only_subscribers_allowed_to_see_them(settings) -> None:
    portal = Portal(settings)
    subs = {name: Subscriber(Access.from_groups(MEMBERS.groups(name))) for name in ("alice", "bob", "carol")}
    portal.subscribers.update(subs.values())
    portal.on_event(StatusEvent(job_id="j1", state=JobState.RUNNING, instrument="MARI", rb_number="1920001",
                                run_number=7))
    assert {name: sub.queue.qsize() for name, sub in subs.items()} == {"alice": 1, "bob": 0, "carol": 1}
