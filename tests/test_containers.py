"""The platform in containers: the images `make images-ci` builds, run from the CI overlay's Kubernetes
manifests (deploy/overlays/ci) with ``podman kube play``.

One deployment serves the whole module, in order: the images carry their version and the environment
hash nbreduce computes; every pod comes up; runs simulated on four spectroscopy instruments are shared by
both runner pods through their consumer group and each is published exactly once to the archive volume;
the portal answers on its host port and, through the hub's proxy and OAuth, shows those runs; a runner pod
killed in the middle of a reduction loses nothing (the other one reduces the run, once); the broker pod
restarted keeps everything on its volume; ``kube down`` leaves nothing behind. Everything is real: broker,
runners, kernels, hub, proxy, volumes.

Runs in ``make deploy-test`` (called by ``make test`` where podman is installed), which builds the images
first and sets DEPLOY_TEST=1; without it the module is skipped, as it needs images of this checkout.
Phase timings go to test-artifacts/deploy-test.json.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import time
import tomllib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from runner.kernels.environments import load as load_environment

REPO = Path(__file__).resolve().parent.parent
OVERLAY = REPO / "deploy" / "overlays" / "ci"
ARTIFACTS = REPO / "test-artifacts"
VERSION = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
PODMAN = shutil.which("podman")
KUBECTL = shutil.which("kubectl")
#: deploy/podman/containers.conf, as the Makefile sets it (runc, cgroupfs, file limits)
PODMAN_ENV = {**os.environ, "CONTAINERS_CONF": os.environ.get("CONTAINERS_CONF",
                                                              str(REPO / "deploy" / "podman" / "containers.conf"))}

ENVIRONMENT = "spectroscopy"
GROUP = f"nbreduce-runners-{ENVIRONMENT}"
RUNNER_IMAGE = f"localhost/nbreduce-runner-{ENVIRONMENT}:{VERSION}"
CI_IMAGES = (f"localhost/nbreduce:{VERSION}", RUNNER_IMAGE, f"localhost/nbreduce-hub:{VERSION}",
             f"localhost/nbreduce-proxy:{VERSION}")
NETWORK = "nbreduce-ci"
#: podman 4.3 names a Deployment's pods <deployment>-pod-<i> and a pod's containers <pod>-<container>
RUNNER_PODS = (f"nbreduce-runner-{ENVIRONMENT}-pod-0", f"nbreduce-runner-{ENVIRONMENT}-pod-1")
SIMULATOR = "nbreduce-simulator-simulate"
#: on four different partitions of nbreduce.run-completions (of six): each runner gets some, however the
#: group assigns them; watched by the CI overlay's lastrun watcher
INSTRUMENTS = ("MARI", "MERLIN", "LET", "IRIS")
#: not watched: the kill test submits its run itself, with parameters that make the reduction take seconds
KILL_INSTRUMENT = "MAPS"
DEMO_PASSWORD = secrets.token_hex(12)
WAIT = 240.0

pytestmark = [
    pytest.mark.skipif(PODMAN is None or KUBECTL is None,
                       reason="needs podman (apt-get install podman runc) and kubectl (renders the overlay)"),
    pytest.mark.skipif(os.environ.get("DEPLOY_TEST") != "1",
                       reason="runs in `make deploy-test`, which first builds the images of this checkout"),
]


# -- podman ------------------------------------------------------------------------------------------
def podman(*args: str, check: bool = True, timeout: float = 300, stdin: str | None = None,
           ) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([PODMAN, *args], capture_output=True, text=True, timeout=timeout, env=PODMAN_ENV,
                            input=stdin)
    if check and result.returncode != 0:
        pytest.fail(f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return result


def nbreduce(*args: str) -> str:
    """An nbreduce command in the simulator's container (it reaches the broker by the pods' names)."""
    return podman("exec", SIMULATOR, "nbreduce", *args, timeout=120).stdout


def names(*args: str) -> set[str]:
    return {line for line in podman(*args).stdout.split() if line}


def wait_for(what: str, check: Callable[[], Any], timeout: float = WAIT, interval: float = 2.0) -> Any:
    """``check()``'s first truthy result; fails with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def secret_json(values: dict[str, str]) -> str:
    """A podman secret that `kube play` resolves secretKeyRef against: JSON of base64 values."""
    return json.dumps({key: base64.b64encode(value.encode()).decode() for key, value in values.items()})


class Deployment:
    """The rendered CI overlay and what podman makes of it; teardown is idempotent."""

    def __init__(self, manifest: Path):
        self.manifest = manifest
        self.docs = [d for d in yaml.safe_load_all(manifest.read_text()) if d]
        pods: list[dict[str, Any]] = []
        self.pod_names: set[str] = set()
        for doc in self.docs:
            if doc["kind"] == "Pod":
                pods.append(doc["spec"])
                self.pod_names.add(doc["metadata"]["name"])
            elif doc["kind"] == "Deployment":
                pods.append(doc["spec"]["template"]["spec"])
                self.pod_names |= {f"{doc['metadata']['name']}-pod-{i}" for i in range(doc["spec"]["replicas"])}
        # podman 4.3 makes a named volume of every claim, and of every emptyDir and ConfigMap volume too
        self.volumes = {v.get("persistentVolumeClaim", {}).get("claimName") or v.get("configMap", {}).get("name")
                        or v["name"] for spec in pods for v in spec.get("volumes", [])}
        self.host_ports = {c["name"]: p["hostPort"] for spec in pods for c in spec["containers"]
                           for p in c.get("ports", []) if "hostPort" in p}
        self.secrets = {ref["name"] for spec in pods for c in spec.get("initContainers", []) + spec["containers"]
                        for var in c.get("env", []) if (ref := var.get("valueFrom", {}).get("secretKeyRef"))}
        self.timings: dict[str, float] = {}

    @property
    def portal(self) -> str:
        return f"http://127.0.0.1:{self.host_ports['portal']}/services/portal/"

    @property
    def hub(self) -> str:
        return f"http://127.0.0.1:{self.host_ports['proxy']}"

    def archive(self) -> Path:
        return Path(podman("volume", "inspect", "nbreduce-archive", "--format", "{{.Mountpoint}}").stdout.strip())

    def play(self) -> None:
        podman("network", "create", NETWORK)
        tokens = {"hub.services.portal.apiToken": secrets.token_hex(32),
                  "hub.config.ConfigurableHTTPProxy.auth_token": secrets.token_hex(32)}
        podman("secret", "create", "hub", "-", stdin=secret_json(tokens))
        podman("secret", "create", "nbreduce-hub", "-", stdin=secret_json({"demo-password": DEMO_PASSWORD}))
        assert self.secrets <= {"hub", "nbreduce-hub"}, f"secrets the test does not create: {self.secrets}"
        start = time.monotonic()
        podman("kube", "play", "--network", NETWORK, str(self.manifest), timeout=600)
        self.timings["kube play"] = round(time.monotonic() - start, 1)

    def leftovers(self) -> dict[str, set[str]]:
        return {
            "pods": names("pod", "ps", "--format", "{{.Name}}") & self.pod_names,
            "containers": {c for c in names("ps", "-a", "--format", "{{.Names}}")
                           if any(c.startswith(f"{pod}-") for pod in self.pod_names)},
            "volumes": names("volume", "ls", "--format", "{{.Name}}") & self.volumes,
            "secrets": names("secret", "ls", "--format", "{{.Name}}") & {"hub", "nbreduce-hub"},
            "networks": names("network", "ls", "--format", "{{.Name}}") & {NETWORK},
        }

    def save_logs(self) -> None:
        """Every container's log, with its state and restart count, in test-artifacts/deploy-logs (kept after down)."""
        folder = ARTIFACTS / "deploy-logs"
        folder.mkdir(parents=True, exist_ok=True)
        for container in sorted(self.leftovers()["containers"]):
            state = podman("inspect", container, "--format", "{{.State.Status}} exit {{.State.ExitCode}} "
                           "restarts {{.RestartCount}}", check=False).stdout.strip()
            logs = podman("logs", "--timestamps", container, check=False, timeout=60)
            (folder / f"{container}.log").write_text(f"# {container}: {state}\n{logs.stdout}{logs.stderr}")

    def down(self) -> None:
        """`kube down`, then what podman 4.3's kube down keeps: volumes, secrets (ours only), the network."""
        if self.leftovers()["containers"]:
            self.save_logs()
        start = time.monotonic()
        podman("kube", "down", str(self.manifest), check=False, timeout=600)
        left = self.leftovers()
        for pod in left["pods"]:  # a pod killed by the tests is not always taken down with the others
            podman("pod", "rm", "--force", pod, check=False)
        if left["volumes"]:
            podman("volume", "rm", "--force", *sorted(left["volumes"]), check=False)
        if left["secrets"]:
            podman("secret", "rm", *sorted(left["secrets"]), check=False)
        if left["networks"]:
            podman("network", "rm", NETWORK, check=False)
        self.timings["kube down and clean-up"] = round(time.monotonic() - start, 1)

    def save_timings(self) -> None:
        ARTIFACTS.mkdir(exist_ok=True)
        (ARTIFACTS / "deploy-test.json").write_text(json.dumps(self.timings, indent=2) + "\n")


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    missing = [image for image in CI_IMAGES if podman("image", "exists", image, check=False).returncode]
    if missing:
        pytest.fail(f"images missing: {missing}; `make deploy-test` builds them (make images-ci)")
    rendered = subprocess.run([KUBECTL, "kustomize", str(OVERLAY)], capture_output=True, text=True, timeout=120)
    assert rendered.returncode == 0, rendered.stderr
    manifest = tmp_path_factory.mktemp("ci") / "ci.yaml"
    manifest.write_text(rendered.stdout)
    platform = Deployment(manifest)
    platform.down()  # what an interrupted earlier run left
    for name, port in platform.host_ports.items():
        with socket.socket() as probe:
            if probe.connect_ex(("127.0.0.1", port)) == 0:
                pytest.fail(f"host port {port} ({name}) is in use: the CI overlay publishes it")
    platform.timings.clear()
    platform.play()
    try:
        yield platform
    finally:
        if podman("pod", "exists", "hub", check=False).returncode == 0:  # the last test did not run or failed
            platform.down()
        platform.save_timings()


# -- what the tests read -----------------------------------------------------------------------------
def live_runners() -> list[dict[str, Any]]:
    return [r for r in json.loads(nbreduce("runners", "--json")) if r["group"] == GROUP]


def runs_once_the_broker_answers() -> list[dict[str, Any]] | None:
    """The jobs, or None while the broker does not answer (the CLI says so in one line within seconds)."""
    result = podman("exec", SIMULATOR, "nbreduce", "runs", "--json", "--limit", "1000", check=False, timeout=120)
    if result.returncode != 0 and "did not answer" in result.stderr:
        print(f"nbreduce runs: {result.stderr.strip()}; asking again")  # shown with a failure; pod logs are kept
        return None
    if result.returncode != 0:
        pytest.fail(f"nbreduce runs failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return json.loads(result.stdout)


def jobs(timeout: float = 60) -> list[dict[str, Any]]:
    """The jobs as ``nbreduce runs`` shows them, once the broker answers (a busy broker may miss the CLI's 5 s)."""
    def answered() -> tuple[list[dict[str, Any]]] | None:
        found = runs_once_the_broker_answers()
        return None if found is None else (found,)

    return wait_for("the broker to answer nbreduce runs", answered, timeout)[0]


def jobs_once_the_broker_answers() -> dict[str, str] | None:
    """Job states, or None while the broker is still coming back."""
    found = runs_once_the_broker_answers()
    return None if found is None else {j["job_id"]: j["state"] for j in found}


def pod_of(runner: str | None) -> str:
    """Runner identities are ``<hostname>:<pid>``; a pod's hostname is its name."""
    return (runner or "").split(":", 1)[0]


def versions(archive: Path, instrument: str, rb: str, run: int) -> list[str]:
    folder = archive / instrument / f"RB{rb}" / str(run)
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def simulate(instrument: str, *extra: str) -> dict[str, Any]:
    """One run written into the data volume (``lastrun.txt`` included), not announced on Kafka."""
    line = nbreduce("simulate", "-i", instrument, "--runs", "1", "--no-publish", *extra).strip()
    match = re.match(r"(\w+) run (\d+) RB(\d+): (\S+)", line)
    assert match, line
    return {"instrument": match[1], "run": int(match[2]), "rb": match[3], "data": match[4]}


# -- the tests, in the order they run ----------------------------------------------------------------
def test_images_carry_version_and_the_environment_hash_nbreduce_computes() -> None:
    """The runner image's environment build is the one `nbreduce env build` makes from the same lock."""
    lock_hash = load_environment(ENVIRONMENT, REPO / "environments").sha256
    for image in CI_IMAGES:
        labels = json.loads(podman("image", "inspect", image, "--format", "{{json .Labels}}").stdout)
        assert labels["org.opencontainers.image.version"] == VERSION, image
        assert labels["org.opencontainers.image.revision"] not in ("", "unknown"), image
    labels = json.loads(podman("image", "inspect", RUNNER_IMAGE, "--format", "{{json .Labels}}").stdout)
    assert labels["io.nbreduce.environment"] == ENVIRONMENT
    assert labels["io.nbreduce.environment.sha256"] == lock_hash
    probe = (
        "import json, sys\n"
        "from runner.config import Settings\n"
        "from runner.kernels.environments import builds_of, discover, kernel_spec_manager\n"
        "s = Settings(); env = discover(s.environments)[sys.argv[1]]\n"
        "specs = kernel_spec_manager(s).get_all_specs()\n"
        "print(json.dumps({'lock': env.sha256, 'builds': [b.sha256 for b in builds_of(s, env.name)],\n"
        "    'kernel': specs[env.kernel_name]['spec']['metadata']['nbreduce']['sha256']}))\n"
    )
    found = json.loads(podman("run", "--rm", "--network", "none", "--entrypoint", "python", RUNNER_IMAGE,
                              "-c", probe, ENVIRONMENT).stdout)
    assert found == {"lock": lock_hash, "builds": [lock_hash], "kernel": lock_hash}


def test_every_pod_comes_up(deployment: Deployment) -> None:
    running = names("pod", "ps", "--filter", "status=running", "--format", "{{.Name}}")
    assert deployment.pod_names <= running, f"not running: {deployment.pod_names - running}"
    assert set(RUNNER_PODS) <= deployment.pod_names
    assert "all topics exist" in nbreduce("topics", "wait", "--timeout", "60")
    start = time.monotonic()

    def both_assigned() -> list[dict[str, Any]] | None:
        beats = live_runners()
        completions = [[p for p in r["partitions"] if p.startswith("nbreduce.run-completions")] for r in beats]
        if len(beats) == 2 and all(completions) and sum(map(len, completions)) == 6:
            return beats
        return None

    beats = wait_for("both runners to join their group and hold partitions", both_assigned)
    deployment.timings["runners ready after kube play"] = round(time.monotonic() - start, 1)
    assert {r["host"] for r in beats} == set(RUNNER_PODS)
    assert all(r["environments"] == [ENVIRONMENT] for r in beats)


def test_runs_are_shared_by_both_runners_and_published_once(deployment: Deployment) -> None:
    start = time.monotonic()
    runs = [simulate(instrument) for instrument in INSTRUMENTS]
    deployment.timings[f"{len(runs)} runs simulated"] = round(time.monotonic() - start, 1)
    wanted = {(r["instrument"], r["run"]) for r in runs}

    def finished() -> list[dict[str, Any]] | None:
        done = [j for j in jobs() if (j.get("instrument"), j.get("run_number")) in wanted
                and j["state"] in ("succeeded", "failed", "skipped")]
        return done if len(done) == len(wanted) else None

    done = wait_for(f"{len(wanted)} simulated runs to be reduced", finished)
    deployment.timings[f"{len(wanted)} runs simulated and reduced"] = round(time.monotonic() - start, 1)
    assert {j["state"] for j in done} == {"succeeded"}, [(j["instrument"], j["state"], j.get("reason")) for j in done]
    # scale-out: the consumer group gave both runner pods work
    assert {pod_of(j.get("runner")) for j in done} == set(RUNNER_PODS), [j.get("runner") for j in done]
    beats = live_runners()
    assert sorted(r["host"] for r in beats if r["jobs_done"] >= 1) == sorted(RUNNER_PODS)
    # exactly once: one version per run in the archive volume, with its notebook and record
    archive = deployment.archive()
    for run in runs:
        assert versions(archive, run["instrument"], run["rb"], run["run"]) == ["v1"], run
        folder = archive / run["instrument"] / f"RB{run['rb']}" / str(run["run"]) / "v1"
        assert (folder / "job.json").is_file() and list(folder.glob("*.ipynb")), sorted(folder.iterdir())
    assert json.loads(nbreduce("dead-letters", "--json")) == []


def test_portal_answers_on_its_host_port_and_through_the_hub(deployment: Deployment) -> None:
    direct = requests.get(deployment.portal + "static/portal.css", timeout=30)
    assert direct.status_code == 200 and "{" in direct.text
    anonymous = requests.get(deployment.portal, timeout=30, allow_redirects=False)
    assert anonymous.status_code == 302 and "/hub/api/oauth2/authorize" in anonymous.headers["Location"]

    def login(user: str) -> requests.Session:
        session = requests.Session()
        page = session.get(f"{deployment.hub}/hub/login", timeout=30)
        xsrf = re.search(r'name="_xsrf"\s+value="([^"]+)"', page.text)
        assert page.status_code == 200 and xsrf, page.text[:500]
        reply = session.post(f"{deployment.hub}/hub/login", timeout=30,
                             data={"username": user, "password": DEMO_PASSWORD, "_xsrf": xsrf[1]})
        assert reply.status_code == 200 and "/hub/login" not in reply.url, reply.url
        return session

    # through the hub's proxy: OAuth with the hub (pod `hub`), the portal (its own pod) reads the status topic
    # and the archive volume
    admin = login("dave")
    listing = admin.get(f"{deployment.hub}/services/portal/api/runs", timeout=30)
    assert listing.status_code == 200, listing.text[:500]
    shown = {(r["instrument"], r["state"]) for r in listing.json()["runs"]}
    assert {(instrument, "succeeded") for instrument in INSTRUMENTS} <= shown
    job = next(r["latest_job"] for r in listing.json()["runs"] if r["instrument"] == "MARI")
    notebook = admin.get(f"{deployment.hub}/services/portal/jobs/{job}/notebook", timeout=60)
    assert notebook.status_code == 200 and "MARI" in notebook.text
    # groups come from the hub: a member of another experiment sees none of these runs
    member = login("alice")
    assert member.get(f"{deployment.hub}/services/portal/api/runs", timeout=30).json()["runs"] == []


#: In the simulator's container: follow the status topic, submit one run with fine binning (a reduction of
#: seconds), report the runner that starts it, then its final state.
FOLLOW_AND_SUBMIT = """
import json, queue, sys, threading
from runner.bus.status import StatusView
from runner.config import Settings
from runner.pipeline.submit import submit_request
instrument, run, data = sys.argv[1], int(sys.argv[2]), sys.argv[3]
settings, stop, events = Settings(), threading.Event(), queue.Queue()
view = StatusView(settings)
view.start(stop, events.put)
view.caught_up.wait(60)
job = submit_request(settings, instrument=instrument, run_number=run, data=data, requested_by="deploy-test",
                     reduction_arguments={"energy_bin_fraction": 0.0005, "two_theta_bin_width": 0.1})
print(json.dumps({"job": job}), flush=True)
running = False
while True:
    event = events.get(timeout=600)
    if event.job_id != job:
        continue
    if event.state.value == "running" and not running:
        running = True
        print(json.dumps({"running": event.runner}), flush=True)
    if event.state.final:
        print(json.dumps({"final": event.state.value, "runner": event.runner, "version": event.version}), flush=True)
        break
stop.set()
"""


def test_a_runner_pod_killed_mid_run_loses_nothing(deployment: Deployment) -> None:
    run = simulate(KILL_INSTRUMENT, "--events", "2000000")
    follower = subprocess.Popen(
        [PODMAN, "exec", "-i", SIMULATOR, "python", "-", KILL_INSTRUMENT, str(run["run"]), run["data"]],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=PODMAN_ENV)
    assert follower.stdin and follower.stdout
    follower.stdin.write(FOLLOW_AND_SUBMIT)
    follower.stdin.close()
    try:
        job = json.loads(follower.stdout.readline())["job"]
        started = follower.stdout.readline()
        assert started, follower.stderr.read() if follower.stderr else ""
        victim = pod_of(json.loads(started)["running"])
        assert victim in RUNNER_PODS
        start = time.monotonic()
        podman("pod", "kill", victim)  # SIGKILL to every container: the node is gone
        final = json.loads(follower.stdout.readline() or "{}")
        deployment.timings["kill to run published by the other runner"] = round(time.monotonic() - start, 1)
        follower.wait(60)
    finally:
        if follower.poll() is None:
            follower.kill()
    assert final.get("final") == "succeeded", final
    survivor = next(pod for pod in RUNNER_PODS if pod != victim)
    assert pod_of(final["runner"]) == survivor and final["version"] == 1
    # the run was killed in the middle of its reduction, redelivered, reduced once, into the same version
    killed = podman("inspect", f"{victim}-runner", "--format", "{{.State.Status}} {{.State.ExitCode}}").stdout.split()
    assert killed[0] in ("exited", "stopped") and killed[1] == "137", killed
    archive = deployment.archive()
    assert versions(archive, KILL_INSTRUMENT, run["rb"], run["run"]) == ["v1"]
    staging = archive / ".staging"
    assert not staging.exists() or not list(staging.iterdir()), "the killed runner's half-written version is left"
    assert [j["state"] for j in jobs() if j["job_id"] == job] == ["succeeded"]
    # the survivor holds every partition now and keeps serving
    beats = wait_for("the surviving runner to hold all partitions",
                     lambda: [r for r in live_runners() if r["host"] == survivor
                              and len([p for p in r["partitions"] if p.startswith("nbreduce.run-completions")]) == 6])
    assert beats[0]["jobs_done"] >= 2


def test_the_broker_keeps_everything_on_its_volume(deployment: Deployment) -> None:
    """The broker pod restarted: job history, trigger bookkeeping and the group's offsets are on its PVC."""
    before = {j["job_id"]: j["state"] for j in jobs()}
    assert len(before) == len(INSTRUMENTS) + 1
    start = time.monotonic()
    podman("pod", "restart", "nbreduce-broker", timeout=120)
    after = wait_for("the restarted broker to serve the job history", jobs_once_the_broker_answers)
    deployment.timings["broker restart to job history served"] = round(time.monotonic() - start, 1)
    assert after == before
    # the runners reconnect by themselves and nothing is reduced a second time
    run = simulate("MARI")
    done = wait_for("a run after the broker restart", lambda: [j for j in jobs() if j.get("run_number") == run["run"]
                                                              and j["state"] == "succeeded"])
    assert len(done) == 1 and len(jobs()) == len(before) + 1
    assert versions(deployment.archive(), "MARI", run["rb"], run["run"]) == ["v1"]


def test_kube_down_leaves_nothing_behind(deployment: Deployment) -> None:
    deployment.down()
    assert deployment.leftovers() == {"pods": set(), "containers": set(), "volumes": set(), "secrets": set(),
                                      "networks": set()}
