"""deploy/: every overlay renders with ``kubectl kustomize`` and keeps the properties the platform relies on.

The rendered manifests are parsed and checked structurally: pods non-root and restricted, resources set,
one image tag per release, only environment variables nbreduce (or JupyterHub's service library) really
reads, selectors that match their pods, a runner grace period that covers the longest reduction, one
processing environment per consumer group and a runner group for every environment. The CI overlay is
also checked against what podman 4.3's ``kube play`` can run (tests/test_containers.py runs it). The
z2jh values file and its KubeSpawner hook are checked against the same manifests. Nothing here needs a
cluster.
"""

from __future__ import annotations

import functools
import importlib.util
import re
import shutil
import subprocess
import sys
import tomllib
import zlib
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import yaml

from runner.bus.topics import RUN_COMPLETIONS, TOPICS
from runner.config import variables
from runner.hub.access import ACCESS_ENV, Access
from runner.kernels.environments import discover
from runner.sim.runs import instrument_model
from runner.templates.registry import InstrumentConfig, TemplateRegistry

REPO = Path(__file__).resolve().parent.parent
DEPLOY = REPO / "deploy"
OVERLAYS = sorted(p.name for p in (DEPLOY / "overlays").iterdir() if (p / "kustomization.yaml").is_file())
KUBECTL = shutil.which("kubectl")
needs_kubectl = pytest.mark.skipif(
    KUBECTL is None, reason="kubectl not found: it renders deploy/ with its built-in kustomize (Debian: kubectl)")

WORKLOADS = ("Deployment", "StatefulSet", "Job", "CronJob", "Pod")
#: Secrets made outside the manifests: by the JupyterHub chart (`hub`) and by hand (`nbreduce-hub`,
#: deploy/jupyterhub/values.yaml); in the CI overlay both with `podman secret create` (tests/test_containers.py).
EXTERNAL_SECRETS = {"hub", "nbreduce-hub"}
#: Environments with a runner group in every overlay but CI: those that give kernels (environment.toml's
#: `kernel`, default true), but the test environment.
RUNNER_ENVIRONMENTS = sorted(name for name, env in discover(REPO / "environments").items() if name != "minimal"
                             and tomllib.loads((env.path / "environment.toml").read_text()).get("kernel", True))
#: What podman 4.3's `kube play` runs, and what it ignores harmlessly (Services, PDBs, ServiceAccounts).
PODMAN_KINDS = {"Pod", "Deployment", "ConfigMap", "PersistentVolumeClaim"}
PODMAN_IGNORED = {"Service", "ServiceAccount", "PodDisruptionBudget"}
#: Oldest Kubernetes the manifests are written for (fsGroupChangePolicy, PDB policy/v1, ...).
KUBERNETES_VERSION = "1.30"
#: Seconds a runner needs after its longest reduction to publish the version and commit.
PUBLISH_MARGIN = 60


#: Images the repository builds (Makefile `images`): the platform, one runner per environment (kernels/),
#: the hub and the proxy of deploy/images/.
NBREDUCE_IMAGES = {"nbreduce", "nbreduce-hub", "nbreduce-proxy", "nbreduce-lab",
                   *(f"nbreduce-runner-{env}" for env in RUNNER_ENVIRONMENTS)}


# -- rendering and walking the manifests ------------------------------------------------------------
@functools.cache
def render(overlay: str) -> tuple[dict[str, Any], ...]:
    result = subprocess.run([KUBECTL, "kustomize", str(DEPLOY / "overlays" / overlay)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def objects(docs: tuple[dict[str, Any], ...], kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for d in docs if d["kind"] == kind}


def pod_template(workload: dict[str, Any]) -> dict[str, Any]:
    if workload["kind"] == "Pod":
        return {"metadata": workload["metadata"], "spec": workload["spec"]}
    spec = workload["spec"]
    if workload["kind"] == "CronJob":
        spec = spec["jobTemplate"]["spec"]
    return spec["template"]


def workloads(docs: tuple[dict[str, Any], ...]) -> Iterator[tuple[str, dict[str, Any], dict[str, Any]]]:
    """(``Kind/name``, workload, pod spec) of everything that runs pods."""
    for doc in docs:
        if doc["kind"] in WORKLOADS:
            yield f"{doc['kind']}/{doc['metadata']['name']}", doc, pod_template(doc)["spec"]


def containers(pod: dict[str, Any]) -> list[dict[str, Any]]:
    return pod.get("initContainers", []) + pod["containers"]


def is_nbreduce_image(image: str) -> bool:
    return image.rsplit("/", 1)[-1].startswith("nbreduce-")


def split_image(image: str) -> tuple[str, str | None, str | None]:
    """(repository, tag, digest) of an image reference."""
    name, _, digest = image.partition("@")
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, tag = name.rsplit(":", 1)
        return name, tag, digest or None
    return name, None, digest or None


def config_maps(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, str]]:
    return {name: cm.get("data", {}) for name, cm in objects(docs, "ConfigMap").items()}


def container_env(docs: tuple[dict[str, Any], ...], container: dict[str, Any]) -> dict[str, str | None]:
    """Environment of a container: envFrom ConfigMaps, then env (None for values from Secrets/fields)."""
    maps = config_maps(docs)
    env: dict[str, str | None] = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    for var in container.get("env", []):
        env[var["name"]] = var.get("value")
    return env


def runners(docs: tuple[dict[str, Any], ...]) -> dict[str, dict[str, Any]]:
    return {name: d for name, d in objects(docs, "Deployment").items()
            if d["metadata"]["labels"].get("app.kubernetes.io/component") == "runner"}


# -- what nbreduce reads ----------------------------------------------------------------------------
@functools.cache
def nbreduce_env_names() -> frozenset[str]:
    """Every NBREDUCE_* name nbreduce reads: the settings tree's variables, one per key of its dict settings
    (retention per topic: the topics nbreduce has), and the variables kernelspecs set for notebooks."""
    names = {variable for variable, _, _ in variables()}
    names |= {f"NBREDUCE_RETENTION__TOPIC_DAYS__{spec.short_name.upper()}" for spec in TOPICS}
    return frozenset(names | {"NBREDUCE_ENVIRONMENT", "NBREDUCE_ENVIRONMENT_HASH"})


@functools.cache
def jupyterhub_env_names() -> frozenset[str]:
    """JUPYTERHUB_* names read by JupyterHub's own service library (the portal is a hub service), and the
    CONFIGPROXY_* ones JupyterHub reads for its proxy (the CI overlay's hub)."""
    spec = importlib.util.find_spec("jupyterhub")
    assert spec is not None and spec.submodule_search_locations
    package = Path(next(iter(spec.submodule_search_locations)))
    pattern = re.compile(r"(?:JUPYTERHUB|CONFIGPROXY)_[A-Z_]+")
    found = (n for path in package.rglob("*.py") for n in pattern.findall(path.read_text()))
    return frozenset(n for n in found if not n.endswith("_"))


@functools.cache
def other_env_names() -> frozenset[str]:
    """What else an nbreduce image's process reads: the S3 variables runner/bus/embedded.py gives Tansu (the
    CI overlay's broker pod), and what the overlays' own hub configurations read (deploy/overlays/*/hub/)."""
    tansu = re.findall(r"\b(AWS_[A-Z_]+)=", (REPO / "runner" / "bus" / "embedded.py").read_text())
    assert tansu, "runner/bus/embedded.py no longer configures Tansu's S3 storage by AWS_* variables"
    hub = [n for path in (DEPLOY / "overlays").glob("*/hub/*.py")
           for n in re.findall(r"os\.environ(?:\.get\(|\[)[\"']([A-Z_]+)[\"']", path.read_text())]
    return frozenset(tansu + hub)


def longest_instrument_timeout() -> float:
    """The longest whole-run ``timeout`` of any template (InstrumentConfig's default where none is set)."""
    timeouts = [InstrumentConfig.model_validate(tomllib.loads(path.read_text())).timeout
                for path in (REPO / "notebooks").glob("*/instrument.toml")]
    assert timeouts, "no notebooks/*/instrument.toml found"
    return max(timeouts)


# -- every overlay ----------------------------------------------------------------------------------
@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_deploys_every_component(overlay: str) -> None:
    docs = render(overlay)
    deployments = objects(docs, "Deployment")
    args = {tuple(c.get("args", [])[:2]) for d in deployments.values() for c in pod_template(d)["spec"]["containers"]}
    assert {("runner",), ("watch", "--interval")} <= args
    assert {"nbreduce-archive", "nbreduce-data"} <= set(objects(docs, "PersistentVolumeClaim"))
    assert "nbreduce-portal" in objects(docs, "Service")
    if overlay == "ci":  # on podman: see test_ci_overlay_is_what_podman_plays
        assert {"nbreduce-runner-spectroscopy", "nbreduce-watch", "nbreduce-portal"} == set(deployments)
        assert {"nbreduce-broker", "nbreduce-simulator", "hub"} == set(objects(docs, "Pod"))
        return
    # one runner group per processing environment (minimal is for tests)
    assert {f"nbreduce-runner-{env}" for env in RUNNER_ENVIRONMENTS} == set(runners(docs)), f"{overlay}: runners"
    for name in ("nbreduce-watch", "nbreduce-bridge-runinfo", "nbreduce-bridge-legacy", "nbreduce-portal"):
        assert name in deployments, f"{overlay}: Deployment {name} missing"
    assert "nbreduce-topics" in objects(docs, "Job")
    namespaces = {d["metadata"].get("namespace") for d in docs if d["kind"] not in ("Namespace", "PersistentVolume")}
    assert len(namespaces) == 1 and None not in namespaces, f"{overlay}: one namespace for everything: {namespaces}"
    assert {("trigger", "runinfo"), ("trigger", "legacy")} <= args


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_manifests_match_the_kubernetes_schemas(overlay: str) -> None:
    """Strict: a misspelt field (which the API server would silently drop) fails here."""
    import kubernetes_validate as validator
    for doc in render(overlay):
        try:
            validator.validate(doc, KUBERNETES_VERSION, strict=True)
        except validator.ValidationError as exc:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {exc.message} at {list(exc.path)}")


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_container_is_non_root_restricted_and_sized(overlay: str) -> None:
    docs = render(overlay)
    accounts = objects(docs, "ServiceAccount")
    for where, _, pod in workloads(docs):
        security = pod.get("securityContext", {})
        assert security.get("runAsNonRoot") is True, f"{where}: runAsNonRoot"
        assert security.get("runAsUser", 0) != 0, f"{where}: explicit non-root runAsUser"
        assert security.get("seccompProfile", {}).get("type") == "RuntimeDefault", f"{where}: seccomp"
        assert pod.get("automountServiceAccountToken") is False, f"{where}: no API token"
        account = pod.get("serviceAccountName")
        assert account in accounts and accounts[account].get("automountServiceAccountToken") is False, where
        for c in containers(pod):
            name = f"{where} container {c['name']}"
            context = c.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, name
            assert context.get("capabilities", {}).get("drop") == ["ALL"], name
            assert not context.get("capabilities", {}).get("add"), name
            assert context.get("privileged") is not True, name
            if is_nbreduce_image(c["image"]):
                assert context.get("readOnlyRootFilesystem") is True, name
            resources = c.get("resources", {})
            for part in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(resources.get(part, {})), f"{name}: {part} cpu and memory"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_images_are_pinned_and_one_release(overlay: str) -> None:
    docs = render(overlay)
    tags = set()
    for where, _, pod in workloads(docs):
        for c in containers(pod):
            repository, tag, digest = split_image(c["image"])
            assert tag or digest, f"{where}: {c['image']} has neither tag nor digest"
            assert tag != "latest", f"{where}: {c['image']} is not pinned"
            if is_nbreduce_image(c["image"]):
                assert repository.rsplit("/", 1)[-1] in NBREDUCE_IMAGES, f"{c['image']}: no Dockerfile builds it"
                tags.add(digest or tag)
    assert len(tags) == 1, f"{overlay}: nbreduce images of one deployment must share one release tag, got {tags}"
    # the runner images of one overlay come from one registry path
    prefixes = {split_image(c["image"])[0].rsplit("/", 1)[0] if "/" in c["image"] else ""
                for _, _, pod in workloads(docs) for c in containers(pod) if is_nbreduce_image(c["image"])}
    assert len(prefixes) == 1, prefixes


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_environment_variables_are_ones_nbreduce_reads(overlay: str) -> None:
    docs = render(overlay)
    known, hub_known, other_known = nbreduce_env_names(), jupyterhub_env_names(), other_env_names()
    maps, secrets = config_maps(docs), set(objects(docs, "Secret")) | EXTERNAL_SECRETS
    for where, _, pod in workloads(docs):
        for c in containers(pod):
            for source in c.get("envFrom", []):
                assert source["configMapRef"]["name"] in maps, f"{where}: unknown ConfigMap {source}"
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref["name"] in secrets, f"{where}: unknown Secret {ref}"
            if not is_nbreduce_image(c["image"]):
                continue
            for name in container_env(docs, c):
                if name.startswith(("JUPYTERHUB_", "CONFIGPROXY_")):
                    assert name in hub_known, f"{where}: JupyterHub reads no {name}"
                else:
                    assert name in known | other_known, f"{where}: nbreduce reads no {name} (names: {sorted(known)})"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_selectors_match_their_pods(overlay: str) -> None:
    docs = render(overlay)
    pod_labels = {}
    for where, workload, _ in workloads(docs):
        labels = pod_template(workload)["metadata"]["labels"]
        pod_labels[where] = labels
        if workload["kind"] in ("Deployment", "StatefulSet"):
            selector = workload["spec"]["selector"]["matchLabels"]
            assert selector.items() <= labels.items(), f"{where}: selector {selector} vs template {labels}"
    for kind in ("Service", "PodDisruptionBudget"):
        for name, obj in objects(docs, kind).items():
            spec = obj["spec"]
            selector = spec["selector"] if kind == "Service" else spec["selector"]["matchLabels"]
            matched = [w for w, labels in pod_labels.items() if selector.items() <= labels.items()]
            assert matched, f"{kind}/{name}: selector {selector} matches no pod template"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_runner_shutdown_lets_reductions_finish_once(overlay: str) -> None:
    """SIGTERM lets running reductions finish: the grace period must cover the longest one; runners of a
    group are replaced all at once (Recreate), so no partition moves while their reductions finish."""
    needed = longest_instrument_timeout() + PUBLISH_MARGIN
    found = runners(render(overlay))
    assert found
    for name, deployment in found.items():
        grace = pod_template(deployment)["spec"].get("terminationGracePeriodSeconds", 30)
        assert grace >= needed, f"{name}: terminationGracePeriodSeconds {grace} < longest timeout + margin {needed}"
        assert deployment["spec"]["strategy"]["type"] == "Recreate", name


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_one_processing_environment_per_consumer_group(overlay: str) -> None:
    """Partitions are assigned by instrument, not environment: a group must not mix environment images,
    or a run would execute in another environment's fallback kernel."""
    docs = render(overlay)
    environments = defaultdict(set)
    for name, deployment in runners(docs).items():
        if deployment["spec"].get("replicas", 1) == 0:
            continue
        container = pod_template(deployment)["spec"]["containers"][0]
        env = container_env(docs, container)
        group = env.get("NBREDUCE_RUNNER__GROUP") or "nbreduce-runners"
        environments[group].add(deployment["metadata"]["labels"]["nbreduce.io/environment"])
        assert env.get("NBREDUCE_RUNNER__ENVIRONMENTS") == deployment["metadata"]["labels"]["nbreduce.io/environment"]
        assert container["image"].split("@")[0].rsplit(":", 1)[0].endswith(
            "-" + deployment["metadata"]["labels"]["nbreduce.io/environment"]), f"{name}: image of another environment"
    assert environments, f"{overlay}: no runner is scaled up"
    for group, envs in environments.items():
        assert len(envs) == 1, f"{overlay}: consumer group {group} mixes environments {envs}"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_volumes_and_what_may_write_them(overlay: str) -> None:
    docs = render(overlay)
    for where, workload, pod in workloads(docs):
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        volumes |= {t["metadata"]["name"]: t for t in workload["spec"].get("volumeClaimTemplates", [])}
        component = pod_template(workload)["metadata"]["labels"].get("app.kubernetes.io/component")
        for c in containers(pod):
            for mount in c.get("volumeMounts", []):
                volume = volumes.get(mount["name"])
                assert volume is not None, f"{where}: mount of undefined volume {mount['name']}"
                claim = volume.get("persistentVolumeClaim", {}).get("claimName")
                writable = not mount.get("readOnly", False)
                if claim == "nbreduce-data":  # the facility's data: only the dev simulator writes it
                    assert not writable or component == "simulate", f"{where}: data archive mounted writable"
                if claim == "nbreduce-archive" and writable:  # versions are published by runners only
                    assert component == "runner", f"{where}: archive mounted writable"


@needs_kubectl
@pytest.mark.parametrize("overlay", OVERLAYS)
def test_broker_configuration(overlay: str) -> None:
    docs = render(overlay)
    config = next(data for name, data in config_maps(docs).items() if name.startswith("nbreduce-config"))
    assert config.get("NBREDUCE_BROKER__BOOTSTRAP_SERVERS"), f"{overlay}: no broker configured"
    if overlay == "production":
        assert config["NBREDUCE_BROKER__REPLICATION_FACTOR"] == "3"
        assert not objects(docs, "StatefulSet"), "production uses the facility's Redpanda, not an in-cluster one"
    if overlay == "dev":
        broker = objects(docs, "StatefulSet")["nbreduce-redpanda"]
        service = broker["spec"]["serviceName"]
        assert config["NBREDUCE_BROKER__BOOTSTRAP_SERVERS"].split(":")[0] in (service, f"{service}-0.{service}")
    if overlay == "ci":  # the embedded broker in a pod: it advertises the name the other pods reach it by
        pod = objects(docs, "Pod")["nbreduce-broker"]
        kafka = next(c for c in pod["spec"]["containers"] if c["command"][0] == "tansu")
        assert f"--advertised-listener-url=tcp://{config['NBREDUCE_BROKER__BOOTSTRAP_SERVERS']}" in kafka["args"]
        assert config["NBREDUCE_BROKER__BOOTSTRAP_SERVERS"].split(":")[0] == pod["metadata"]["name"]


# -- the CI overlay on podman 4.3 (tests/test_containers.py runs it) ---------------------------------
@needs_kubectl
def test_ci_overlay_is_what_podman_plays() -> None:
    """Measured limits of `podman kube play` 4.3: no Job, StatefulSet, DaemonSet, Namespace (skipped without
    a word), Secrets through kube play broken, init containers of a Deployment restarted for ever, every
    containerPort published on the host, probes turned into health checks that run curl/nc in the image."""
    docs = render("ci")
    kinds = {d["kind"] for d in docs}
    assert kinds <= PODMAN_KINDS | PODMAN_IGNORED, f"podman 4.3 does not play {kinds - PODMAN_KINDS - PODMAN_IGNORED}"
    order = [f"{d['kind']}/{d['metadata']['name']}" for d in docs if d["kind"] in ("Pod", "Deployment")]
    # kube play starts pods in file order and waits for init containers: broker, then the topics, then the rest
    assert order[:2] == ["Pod/nbreduce-broker", "Pod/nbreduce-simulator"], order
    for where, workload, pod in workloads(docs):
        if pod.get("initContainers"):
            assert workload["kind"] == "Pod" and pod.get("restartPolicy", "Always") != "Always", where
        assert not any("secret" in v for v in pod.get("volumes", [])), f"{where}: secret volumes crash podman 4.3"
        for c in containers(pod):
            assert all("hostPort" in p for p in c.get("ports", [])), f"{where}: port published by accident"
            assert not {"livenessProbe", "readinessProbe", "startupProbe"} & set(c), f"{where}: probe"
            for var in c.get("env", []):
                ref = var.get("valueFrom", {}).get("secretKeyRef")
                assert ref is None or ref["name"] in EXTERNAL_SECRETS, f"{where}: secret {ref} not created by the test"
    init = objects(docs, "Pod")["nbreduce-simulator"]["spec"]["initContainers"]
    assert [c["command"] for c in init] == [["nbreduce", "topics", "ensure"]]
    # the hub's proxy routes the portal's external service to the pod podman makes of Deployment nbreduce-portal
    hub_config = (DEPLOY / "overlays" / "ci" / "hub" / "jupyterhub_config.py").read_text()
    port = objects(docs, "Service")["nbreduce-portal"]["spec"]["ports"][0]["port"]
    assert f'"http://nbreduce-portal-pod-0:{port}"' in hub_config
    portal = pod_template(objects(docs, "Deployment")["nbreduce-portal"])["spec"]["containers"][0]
    # and the portal calls the hub's API by the hub pod's name
    assert container_env(docs, portal)["JUPYTERHUB_API_URL"].startswith("http://hub:") and "hub" in objects(docs, "Pod")


@needs_kubectl
def test_ci_runs_spread_over_the_runner_group() -> None:
    """The CI watcher publishes the instruments the tests simulate from the simulation models' first runs; they
    are of the CI runner group's environment and sit on at least four of the six partitions (the producer
    keys by instrument; librdkafka's default partitioner is CRC-32 of the key), so each of two runners gets
    some whatever the group's assignment."""
    docs = render("ci")
    (runner,) = runners(docs).values()
    environment = runner["metadata"]["labels"]["nbreduce.io/environment"]
    assert runner["spec"]["replicas"] == 2
    args = pod_template(objects(docs, "Deployment")["nbreduce-watch"])["spec"]["containers"][0]["args"]
    watched = [args[i + 1] for i, a in enumerate(args) if a == "-i"]
    starts = dict(args[i + 1].split("=") for i, a in enumerate(args) if a == "--from")
    registry = TemplateRegistry(REPO / "notebooks")
    assert set(starts) == set(watched)
    for instrument in watched:
        config = registry.config(instrument)
        assert config.environment == environment, instrument
        assert int(starts[instrument]) == instrument_model(config).first_run, instrument
    partitions = next(spec.partitions for spec in TOPICS if spec.name == RUN_COMPLETIONS)
    assert len({zlib.crc32(i.encode()) % partitions for i in watched}) >= 4


@needs_kubectl
def test_production_disruption_budgets_and_network_policies() -> None:
    docs = render("production")
    budgets = objects(docs, "PodDisruptionBudget")
    for name, deployment in runners(docs).items():
        labels = pod_template(deployment)["metadata"]["labels"]
        assert any(b["spec"]["selector"]["matchLabels"].items() <= labels.items() for b in budgets.values()), name
    policies = objects(docs, "NetworkPolicy")
    deny = [p for p in policies.values()
            if set(p["spec"]["policyTypes"]) == {"Ingress", "Egress"} and "ingress" not in p["spec"]
            and "egress" not in p["spec"]]
    assert deny, "a default-deny policy for nbreduce pods"
    for where, workload, _ in workloads(docs):
        labels = pod_template(workload)["metadata"]["labels"]
        assert any(p["spec"]["podSelector"]["matchLabels"].items() <= labels.items() for p in deny), where
    # the only way in: the hub's proxy to the portal's port
    ingress = [(name, rule) for name, p in policies.items() for rule in p["spec"].get("ingress", [])]
    assert [name for name, _ in ingress] == ["nbreduce-portal"]
    portal_port = objects(docs, "Deployment")["nbreduce-portal"]["spec"]["template"]["spec"]["containers"][0]["ports"]
    assert {p["port"] for _, rule in ingress for p in rule["ports"]} == {portal_port[0]["containerPort"]}


# -- JupyterHub (zero-to-jupyterhub values) ---------------------------------------------------------
@functools.cache
def hub_values() -> dict[str, Any]:
    return yaml.safe_load((DEPLOY / "jupyterhub" / "values.yaml").read_text())


@needs_kubectl
def test_hub_values_fit_the_manifests() -> None:
    values, docs = hub_values(), render("production")
    portal = objects(docs, "Service")["nbreduce-portal"]
    port = portal["spec"]["ports"][0]["port"]
    assert values["hub"]["services"]["portal"]["url"] == f"http://nbreduce-portal:{port}"
    portal_env = container_env(docs, objects(docs, "Deployment")["nbreduce-portal"]["spec"]["template"]["spec"]
                               ["containers"][0])
    assert portal_env["JUPYTERHUB_SERVICE_NAME"] == "portal"
    assert f"access:services!service={portal_env['JUPYTERHUB_SERVICE_NAME']}" in values["hub"]["loadRoles"]["user"][
        "scopes"]
    claims = set(objects(docs, "PersistentVolumeClaim"))
    volumes = values["hub"]["extraVolumes"] + values["singleuser"]["storage"]["extraVolumes"]
    for volume in volumes:
        if "persistentVolumeClaim" in volume:
            assert volume["persistentVolumeClaim"]["claimName"] in claims
            assert volume["persistentVolumeClaim"]["readOnly"] is True, "JupyterHub only reads the archive"
    runner = objects(docs, "Deployment")["nbreduce-runner-scipp"]["spec"]["template"]["spec"]
    assert values["singleuser"]["uid"] == runner["securityContext"]["runAsUser"], "the image's user"
    runner_env = container_env(docs, runner["containers"][0])
    assert values["hub"]["extraEnv"]["NBREDUCE_ARCHIVE"] == runner_env["NBREDUCE_ARCHIVE"]
    assert values["singleuser"]["extraEnv"]["NBREDUCE_DATA_ROOTS"] == runner_env["NBREDUCE_DATA_ROOTS"]
    for name in [*values["hub"]["extraEnv"], *values["singleuser"]["extraEnv"]]:
        assert name in nbreduce_env_names(), name


def test_hub_values_wire_nbreduce() -> None:
    values = hub_values()
    hook_module = load_hook_module()
    assert values["hub"]["config"]["JupyterHub"]["authenticator_class"] == "runner.hub.auth.MembershipAuthenticator"
    extra = "\n".join(values["hub"]["extraConfig"].values())
    assert "c.KubeSpawner.pre_spawn_hook = nbreduce_kubespawner.pre_spawn_hook" in extra
    assert callable(hook_module.pre_spawn_hook)
    archive_volumes = [v["name"] for v in values["singleuser"]["storage"]["extraVolumes"]
                       if v.get("persistentVolumeClaim", {}).get("claimName") == "nbreduce-archive"]
    assert archive_volumes == [hook_module.ARCHIVE_VOLUME]
    manager = "--ServerApp.contents_manager_class=runner.hub.contents.ReductionsContentsManager"
    assert manager in values["singleuser"]["cmd"]


# -- the KubeSpawner hook (deploy/jupyterhub/nbreduce_kubespawner.py) ------------------------------
@functools.cache
def load_hook_module():
    spec = importlib.util.spec_from_file_location("nbreduce_kubespawner",
                                                  DEPLOY / "jupyterhub" / "nbreduce_kubespawner.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("nbreduce_kubespawner", module)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def archive(tmp_path: Path) -> Path:
    root = tmp_path / "archive"
    for folder in ("MARI/RB1920001/25581/v1", "WISH/RB1920002/38237/v1", "WISH/RB1920001/38238/v1",
                   "MARI/RB1111111/1/v1", ".staging/job"):
        (root / folder).mkdir(parents=True)
    return root


def test_users_see_only_their_experiments_and_instruments(archive: Path) -> None:
    hook = load_hook_module()
    member = Access(rbs=frozenset({"1920001", "9999999"}))  # 9999999 has no reductions yet: no mount
    assert hook.visible_folders(member, archive) == ["MARI/RB1920001", "WISH/RB1920001"]
    scientist = Access(instruments=frozenset({"MARI"}), rbs=frozenset({"1920001"}))
    assert hook.visible_folders(scientist, archive) == ["MARI", "WISH/RB1920001"]
    assert hook.visible_folders(Access(admin=True), archive) is None
    assert hook.visible_folders(Access(), archive) == []
    hostile = Access(rbs=frozenset({"*", "../x"}), instruments=frozenset({"..", "MARI/../WISH"}))
    assert hook.visible_folders(hostile, archive) == []
    mounts = hook.archive_mounts(member, archive)
    assert mounts == [{"name": hook.ARCHIVE_VOLUME, "mountPath": str(archive / f), "subPath": f, "readOnly": True}
                      for f in ("MARI/RB1920001", "WISH/RB1920001")]
    assert hook.archive_mounts(Access(admin=True), archive) == [
        {"name": hook.ARCHIVE_VOLUME, "mountPath": str(archive), "readOnly": True}]


def test_a_new_spawn_replaces_the_previous_archive_mounts(archive: Path) -> None:
    hook = load_hook_module()
    home = {"name": "home", "mountPath": "/home/nbreduce"}
    old = {"name": hook.ARCHIVE_VOLUME, "mountPath": "/archive/WISH", "subPath": "WISH", "readOnly": True}
    new = hook.archive_mounts(Access(rbs=frozenset({"1920002"})), archive)
    assert hook.replace_mounts([home, old], new) == [home, *new]
    replaced = hook.replace_mounts({"00-home": home, "x": old}, new)
    assert replaced == {"00-home": home, f"{hook.ARCHIVE_VOLUME}-0": new[0]}


def test_pre_spawn_hook_gives_access_kernels_and_mounts(archive: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    hook = load_hook_module()
    monkeypatch.setenv("NBREDUCE_HOME", "/opt/nbreduce")
    monkeypatch.setenv("NBREDUCE_ARCHIVE", str(archive))
    user = SimpleNamespace(name="alice", admin=False, groups=[SimpleNamespace(name="rb-1920001")])
    log = SimpleNamespace(info=lambda *args: None)
    spawner = SimpleNamespace(user=user, environment={}, volume_mounts=[{"name": "home", "mountPath": "/h"}], log=log)
    hook.pre_spawn_hook(spawner)
    assert Access.from_env(spawner.environment[ACCESS_ENV]).rbs == {"1920001"}
    assert spawner.environment["NBREDUCE_ARCHIVE"] == str(archive)
    assert spawner.environment["JUPYTER_PATH"].split(":")[0] == "/opt/nbreduce/jupyter"
    assert [m.get("subPath") for m in spawner.volume_mounts] == [None, "MARI/RB1920001", "WISH/RB1920001"]
    assert all(m["readOnly"] for m in spawner.volume_mounts[1:])
