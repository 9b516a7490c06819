"""The real thing on loopback: JupyterHub + configurable-http-proxy + the portal service + a
single-user JupyterLab, with the embedded broker (memory storage) and an isolated NBREDUCE_HOME.

One hub serves the whole module (starting one takes seconds); tests only read, or write what no
other test looks at.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
import yaml
from test_portal_support import MEMBERSHIP, seed

from runner.archive.permissions import archive_permissions
from runner.bus.clients import read_topic
from runner.bus.embedded import EmbeddedBroker, free_port
from runner.bus.models import ReductionRequest
from runner.bus.topics import REDUCTION_REQUESTS
from runner.config import Settings
from runner.hub.launch import start_hub, stop_hub
from runner.kernels.environments import build

pytestmark = [pytest.mark.broker, pytest.mark.slow]
PASSWORD = "test-demo-password"
ARTIFACTS = Path(__file__).resolve().parent.parent / "test-artifacts"


@dataclass
class Hub:
    url: str
    settings: Settings
    jobs: dict
    log: Path

    def login(self, user: str, password: str = PASSWORD) -> requests.Session:
        session = requests.Session()
        page = session.get(f"{self.url}/hub/login", timeout=30)
        xsrf = find_xsrf(page.text)
        reply = session.post(f"{self.url}/hub/login", data={"username": user, "password": password, "_xsrf": xsrf},
                             timeout=30)
        session.logged_in = reply.ok and "/hub/login" not in reply.url  # type: ignore[attr-defined]
        return session

    def token(self, session: requests.Session, user: str) -> str:
        reply = session.post(f"{self.url}/hub/api/users/{user}/tokens", json={"note": "test"},
                             headers={"X-XSRFToken": session.cookies.get("_xsrf", path="/hub/")}, timeout=30)
        reply.raise_for_status()
        return reply.json()["token"]


def find_xsrf(html: str) -> str:
    match = re.search(r'name="_xsrf"\s+value="([^"]+)"', html)
    assert match, html[:2000]
    return match.group(1)


def wait_http(url: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if requests.get(url, timeout=5).status_code == 200:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer in {timeout}s")


@pytest.fixture(scope="module")
def hub(request: pytest.FixtureRequest) -> Iterator[Hub]:
    # as root, users' servers run as their own accounts: the home must be reachable by them (pytest's temporary
    # folders are private to root), and kernels need an interpreter every account can run
    top = Path(tempfile.mkdtemp(prefix="nbreduce-hub-", dir="/tmp"))
    top.chmod(0o755)
    home = top / "home"
    home.mkdir()
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("NBREDUCE_HOME", str(home))
        mp.setenv("NBREDUCE_KERNELS__PYTHON", "/usr/bin/python3")
        mp.setenv("NBREDUCE_ARCHIVE_PERMISSIONS", "experiment-groups")
        mp.setenv("NBREDUCE_DATA_ROOTS", str(home / "data"))
        mp.delenv("NBREDUCE_BROKER__BOOTSTRAP_SERVERS", raising=False)
        mp.setenv("NBREDUCE_NOTEBOOKS", str(home / "notebooks"))
        settings = Settings.from_env()
        broker = EmbeddedBroker(settings)
        broker.start(memory=True)
        jobs = seed(settings)
        archive_permissions(settings.archive_permissions).apply(settings.archive)  # as a runner would have
        [built] = build(settings, ["minimal"])  # an instrument kernel every account can run
        assert built.status in ("built", "unchanged"), built.message
        kernel = settings.jupyter_dir / "kernels" / "nbreduce-testenv"
        kernel.mkdir(parents=True)
        (kernel / "kernel.json").write_text(json.dumps({
            "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "nbreduce testenv", "language": "python"}))
        membership = home / "membership.yaml"
        membership.write_text(yaml.safe_dump(MEMBERSHIP))
        port = free_port()
        log = home / "hub.log"
        proc = start_hub(settings, port=port, membership=membership, password=PASSWORD, log_file=log)
        url = f"http://127.0.0.1:{port}"
        try:
            wait_http(f"{url}/hub/health")
            wait_http(f"{url}/services/portal/static/portal.css")
            yield Hub(url, settings, jobs, log)
        finally:
            stop_hub(proc)
            broker.stop()
            ARTIFACTS.mkdir(exist_ok=True)  # the hub's log, for when a test failed
            shutil.copy(log, ARTIFACTS / f"hub-{request.module.__name__.rsplit('.', 1)[-1]}.log")
            shutil.rmtree(top, ignore_errors=True)


def test_hub_state_lives_under_nbreduce_home(hub: Hub) -> None:
    state = hub.settings.home / "hub"
    assert (state / "jupyterhub.sqlite").is_file() and (state / "jupyterhub_cookie_secret").is_file()


def test_login_sets_membership_groups(hub: Hub) -> None:
    expected = {"alice": (["rb-1920001"], False), "carol": (["instrument-MARI"], False), "dave": (["admin"], True)}
    for user, (groups, admin) in expected.items():
        session = hub.login(user)
        assert session.logged_in, user
        model = requests.get(f"{hub.url}/hub/api/user", timeout=30,
                             headers={"Authorization": f"token {hub.token(session, user)}"}).json()
        assert sorted(model["groups"]) == groups and model["admin"] is admin
    assert not hub.login("alice", "wrong-password").logged_in
    assert not hub.login("mallory").logged_in  # not in the membership file


def test_portal_through_hub_oauth_enforces_access(hub: Hub) -> None:
    alice, bob = hub.login("alice"), hub.login("bob")
    portal = f"{hub.url}/services/portal/"
    runs = alice.get(portal + "api/runs", timeout=30).json()["runs"]
    assert {r["run"] for r in runs} == {"1001", "1002"}
    job = hub.jobs["alice"].job_id
    for path in (f"jobs/{job}", f"jobs/{job}/notebook", f"jobs/{job}/files/summary.txt", f"jobs/{job}/rerun"):
        assert alice.get(portal + path, timeout=30).status_code == 200, path
        assert bob.get(portal + path, timeout=30).status_code == 403, path
    anonymous = requests.get(portal, timeout=30)
    assert "/hub/login" in anonymous.url  # not logged in: the hub's login page


def test_rerun_through_hub_needs_xsrf_and_is_published(hub: Hub) -> None:
    alice = hub.login("alice")
    job = hub.jobs["alice_failed"]
    url = f"{hub.url}/services/portal/jobs/{job.job_id}/rerun"
    form = alice.get(url, timeout=30).text
    xsrf = find_xsrf(form)
    assert alice.post(url, data={"ei": "31"}, timeout=30, allow_redirects=False).status_code == 403  # no token
    done = alice.post(url, data={"_xsrf": xsrf, "ei": "31"}, timeout=30, allow_redirects=False)
    assert done.status_code == 302
    found = [ReductionRequest.from_bytes(m.value()) for m in read_topic(hub.settings, REDUCTION_REQUESTS)]
    assert [(r.rerun_of, r.requested_by, r.reduction_arguments["ei"]) for r in found] == [(job.job_id, "alice", 31.0)]


@pytest.fixture(scope="module")
def lab(hub: Hub) -> Iterator[tuple[str, dict]]:
    """Alice's running single-user server: (its URL, token headers)."""
    session = hub.login("alice")
    headers = {"Authorization": f"token {hub.token(session, 'alice')}"}
    requests.post(f"{hub.url}/hub/api/users/alice/server", headers=headers, timeout=30).raise_for_status()
    deadline = time.monotonic() + 120
    while not requests.get(f"{hub.url}/hub/api/users/alice", headers=headers, timeout=30).json()["servers"] \
            .get("", {}).get("ready"):
        assert time.monotonic() < deadline, hub.log.read_text()[-3000:]
        time.sleep(0.5)
    yield f"{hub.url}/user/alice", headers
    requests.delete(f"{hub.url}/hub/api/users/alice/server", headers=headers, timeout=60)


def test_reductions_tree_shows_exactly_the_users_experiments(lab: tuple[str, dict]) -> None:
    url, headers = lab

    def names(path: str) -> set[str]:
        reply = requests.get(f"{url}/api/contents/{path}", headers=headers, timeout=30)
        reply.raise_for_status()
        return {entry["name"] for entry in reply.json()["content"]}

    assert "reductions" in names("")
    assert names("reductions") == {"MARI"}
    assert names("reductions/MARI") == {"RB1920001"}
    assert names("reductions/MARI/RB1920001") == {"1001", "1002"}
    notebook = requests.get(f"{url}/api/contents/reductions/MARI/RB1920001/1001/v1/MARI_1001.ipynb",
                            headers=headers, timeout=30)
    assert notebook.status_code == 200 and notebook.json()["writable"] is False
    for hidden in ("reductions/WISH", "reductions/MARI/RB1930003", "reductions/MARI/RB1930003/1003/v1/summary.txt"):
        assert requests.get(f"{url}/api/contents/{hidden}", headers=headers, timeout=30).status_code == 404, hidden


def test_reductions_are_read_only_through_the_rest_api(lab: tuple[str, dict], hub: Hub) -> None:
    url, headers = lab
    version = "reductions/MARI/RB1920001/1001/v1"
    notebook = f"{version}/MARI_1001.ipynb"
    api = f"{url}/api/contents"
    original = (hub.settings.archive / "MARI/RB1920001/1001/v1/MARI_1001.ipynb").read_bytes()
    model = requests.get(f"{api}/{notebook}", headers=headers, timeout=30).json()
    attempts = {
        "overwrite": requests.put(f"{api}/{notebook}", headers=headers, timeout=30,
                                  json={"type": "notebook", "format": "json", "content": model["content"]}),
        "upload": requests.put(f"{api}/{version}/new.txt", headers=headers, timeout=30,
                               json={"type": "file", "format": "text", "content": "x"}),
        "new": requests.post(f"{api}/{version}", headers=headers, timeout=30, json={"type": "notebook"}),
        "delete": requests.delete(f"{api}/{notebook}", headers=headers, timeout=30),
        "delete tree": requests.delete(f"{api}/reductions", headers=headers, timeout=30),
        "rename": requests.patch(f"{api}/{notebook}", headers=headers, timeout=30, json={"path": "stolen.ipynb"}),
        "checkpoint": requests.post(f"{api}/{notebook}/checkpoints", headers=headers, timeout=30),
        "copy in": requests.post(f"{api}/{version}", headers=headers, timeout=30, json={"copy_from": notebook}),
    }
    assert {name: reply.status_code for name, reply in attempts.items()} == dict.fromkeys(attempts, 403)
    assert (hub.settings.archive / "MARI/RB1920001/1001/v1/MARI_1001.ipynb").read_bytes() == original
    copy = requests.post(f"{api}/", headers=headers, timeout=30, json={"copy_from": notebook})
    assert copy.status_code == 201 and copy.json()["path"] == "MARI_1001.ipynb"  # a copy in the home is fine
    assert requests.put(f"{api}/MARI_1001.ipynb", headers=headers, timeout=30,
                        json={"type": "notebook", "format": "json", "content": model["content"]}).status_code == 200


def test_instrument_kernels_are_available(lab: tuple[str, dict]) -> None:
    url, headers = lab
    specs = requests.get(f"{url}/api/kernelspecs", headers=headers, timeout=30).json()["kernelspecs"]
    assert {"python3", "nbreduce-testenv"} <= set(specs)
