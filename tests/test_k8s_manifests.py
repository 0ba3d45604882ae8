"""The Kubernetes manifests in deploy/k8s: schema-valid, and consistent with the app, its settings and the image.

There is no cluster and, in general, no ``kustomize`` binary here, so the kustomizations are rendered by
a small renderer below that supports only the kustomize features they use (resources, a ConfigMap
generator from env files, labels, strategic-merge patches, images) and refuses anything else. When a
``kubectl`` is on PATH, its ``kubectl kustomize`` output is compared with that renderer's. Schemas come
from ``kubernetes-validate`` (bundled JSON schemas; no network).
"""

from __future__ import annotations

import copy
import re
import shutil
import socket
import subprocess
from pathlib import Path, PurePosixPath
from typing import Any

import kubernetes_validate
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
BASE = K8S / "base"
GPU = K8S / "overlays" / "gpu"
DOCKERFILE = ROOT / "Dockerfile"
KUSTOMIZATIONS = {"cpu": K8S, "gpu": GPU}
# the oldest Kubernetes the manifests are meant for, and the newest kubernetes-validate knows
K8S_VERSIONS = ["1.30.0", kubernetes_validate.latest_version()]
# read by the captioner library itself (captioner.onnx_backend.cache_dir), not a Settings field
LIBRARY_ENV = {"CAPTIONER_CACHE_DIR"}
SUPPORTED_KUSTOMIZATION_KEYS = {"apiVersion", "kind", "resources", "configMapGenerator", "labels", "patches", "images"}
# strategic-merge keys of the lists a patch of a pod template may touch; other lists are replaced
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "envFrom": None,
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
}


# --- a minimal kustomize -------------------------------------------------------------------------------


def load_docs(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def load_kustomization(folder: Path) -> dict[str, Any]:
    path = folder / "kustomization.yaml"
    assert path.is_file(), f"{folder} has no kustomization.yaml"
    (doc,) = load_docs(path)
    assert doc.get("apiVersion") == "kustomize.config.k8s.io/v1beta1" and doc.get("kind") == "Kustomization"
    unsupported = set(doc) - SUPPORTED_KUSTOMIZATION_KEYS
    assert not unsupported, f"{path}: extend this test's renderer to support {sorted(unsupported)}"
    return doc


def read_env_file(path: Path) -> dict[str, str]:
    data = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.partition("=")
        assert sep and re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key), f"{path}: bad line {line!r}"
        assert key not in data, f"{path}: {key} twice"
        data[key] = value
    return data


def strategic_merge(base: Any, patch: Any, field: str | None = None) -> Any:
    if isinstance(patch, dict):
        assert not any(key.startswith("$") for key in patch), "patch directives are not supported here"
        if not isinstance(base, dict):
            return copy.deepcopy(patch)
        merged = dict(base)
        for key, value in patch.items():
            if value is None:
                merged.pop(key, None)
            else:
                merged[key] = strategic_merge(base.get(key), value, key)
        return merged
    if isinstance(patch, list) and isinstance(base, list) and MERGE_KEYS.get(field or ""):
        key = MERGE_KEYS[field]
        merged = list(base)
        for item in patch:
            index = next((i for i, old in enumerate(merged) if old.get(key) == item.get(key)), None)
            if index is None:
                merged.append(copy.deepcopy(item))
            else:
                merged[index] = strategic_merge(merged[index], item, field)
        return merged
    return copy.deepcopy(patch)


def _matches(resource: dict[str, Any], target: dict[str, Any]) -> bool:
    group, _, version = resource["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": resource["kind"], "name": resource["metadata"]["name"]}
    unsupported = set(target) - set(wanted)
    assert not unsupported, f"patch target fields {sorted(unsupported)} are not supported here"
    return all(wanted[key] == value for key, value in target.items())


def render(folder: Path) -> list[dict[str, Any]]:
    """``kustomize build folder``, for the features these manifests use (no name hashes)."""
    kustomization = load_kustomization(folder)
    resources: list[dict[str, Any]] = []
    for entry in kustomization.get("resources", []):
        path = (folder / entry).resolve()
        resources.extend(render(path) if path.is_dir() else load_docs(path))
    for generator in kustomization.get("configMapGenerator", []):
        assert set(generator) <= {"name", "envs", "literals"}, f"unsupported generator fields in {generator}"
        data: dict[str, str] = {}
        for env_file in generator.get("envs", []):
            data.update(read_env_file(folder / env_file))
        for literal in generator.get("literals", []):
            key, _, value = literal.partition("=")
            data[key] = value
        resources.append(
            {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": generator["name"]}, "data": data}
        )
    for entry in kustomization.get("patches", []):
        assert set(entry) <= {"path", "target"}, f"only strategic-merge patch files are supported here: {entry}"
        (patch,) = load_docs(folder / entry["path"])
        target = entry.get("target") or {"kind": patch["kind"], "name": patch["metadata"]["name"]}
        hits = [i for i, resource in enumerate(resources) if _matches(resource, target)]
        assert len(hits) == 1, f"patch {entry['path']} matches {len(hits)} resources, not 1"
        resources[hits[0]] = strategic_merge(resources[hits[0]], patch)
    for entry in kustomization.get("labels", []):
        assert set(entry) <= {"pairs", "includeTemplates"}, f"unsupported labels fields in {entry}"
        for resource in resources:
            resource["metadata"].setdefault("labels", {}).update(entry["pairs"])
            template = resource.get("spec", {}).get("template")
            if entry.get("includeTemplates") and template is not None:
                template.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    for image in kustomization.get("images", []):
        for container in containers(resources):
            if container["image"].partition(":")[0].partition("@")[0] == image["name"]:
                name = image.get("newName", image["name"])
                suffix = f"@{image['digest']}" if "digest" in image else f":{image.get('newTag', 'latest')}"
                container["image"] = name + suffix
    return resources


def containers(resources: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [c for r in resources if r["kind"] == "Deployment" for c in r["spec"]["template"]["spec"]["containers"]]


def one(resources: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    (resource,) = [r for r in resources if r["kind"] == kind]
    return resource


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def rendered(request) -> list[dict[str, Any]]:
    return render(KUSTOMIZATIONS[request.param])


@pytest.fixture(scope="module")
def gpu() -> list[dict[str, Any]]:
    return render(GPU)


def _container(resources: list[dict[str, Any]]) -> dict[str, Any]:
    (container,) = containers(resources)
    return container


def _pod_spec(resources: list[dict[str, Any]]) -> dict[str, Any]:
    return one(resources, "Deployment")["spec"]["template"]["spec"]


# --- the image ----------------------------------------------------------------------------------------


def dockerfile_uid() -> int:
    match = re.search(r"useradd\b[^\n&]*--uid\s+(\d+)\s+(\S+)", DOCKERFILE.read_text())
    assert match, "the Dockerfile no longer creates its user with useradd --uid"
    assert re.search(rf"^USER\s+({match.group(2)}|{match.group(1)})\s*$", DOCKERFILE.read_text(), re.M)
    return int(match.group(1))


def dockerfile_port() -> int:
    text = DOCKERFILE.read_text()
    # one port and one command, whichever image (full or slim) the manifests run
    (expose,) = set(re.findall(r"^EXPOSE\s+(\d+)\s*$", text, re.M))
    (cmd,) = set(re.findall(r"^CMD\s+(\[.*\])\s*$", text, re.M))
    args = yaml.safe_load(cmd)
    assert args[args.index("--host") + 1] == "0.0.0.0", "the image's server must listen on all interfaces"
    assert int(args[args.index("--port") + 1]) == int(expose)
    return int(expose)


# --- tests ---------------------------------------------------------------------------------------------


def test_kustomizations_reference_every_file_and_nothing_missing() -> None:
    referenced: set[Path] = set()
    for folder in [K8S, BASE, GPU]:
        kustomization = load_kustomization(folder)
        referenced.add(folder / "kustomization.yaml")
        paths = list(kustomization.get("resources", []))
        paths += [f for g in kustomization.get("configMapGenerator", []) for f in g.get("envs", [])]
        paths += [p["path"] for p in kustomization.get("patches", [])]
        for entry in paths:
            path = (folder / entry).resolve()
            assert path.exists(), f"{folder / 'kustomization.yaml'} lists {entry}, which does not exist"
            assert path.is_relative_to(K8S), f"{entry} lies outside deploy/k8s"
            if path.is_dir():
                assert (path / "kustomization.yaml").is_file(), f"{entry} is a folder without kustomization.yaml"
            referenced.add(path)
    files = {p.resolve() for p in K8S.rglob("*") if p.is_file()}
    examples = {p for p in files if p.name.endswith(".example.yaml")}
    unlisted = sorted(str(p.relative_to(K8S)) for p in files - referenced - examples)
    assert not unlisted, f"files in deploy/k8s that no kustomization lists: {unlisted}"
    assert examples == {(BASE / "secret.example.yaml").resolve()}


def test_overlay_patch_targets_a_base_resource() -> None:
    base = render(BASE)
    for entry in load_kustomization(GPU)["patches"]:
        (patch,) = load_docs(GPU / entry["path"])
        assert [r for r in base if r["kind"] == patch["kind"] and r["metadata"]["name"] == patch["metadata"]["name"]]
        assert _matches(patch, entry.get("target", {}))


@pytest.fixture()
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("schema validation tried to use the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_validate_against_the_kubernetes_schema(rendered, version, no_network) -> None:
    documents = rendered + load_docs(BASE / "secret.example.yaml")
    errors = []
    for doc in documents:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            where = "/".join(map(str, exc.absolute_path))
            errors.append(f"{doc['kind']}/{doc['metadata']['name']} at {where}: {exc.message}")
    assert not errors, f"invalid on Kubernetes {version}:\n" + "\n".join(errors)
    assert {d["kind"] for d in rendered} == {
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "Ingress",
        "ConfigMap",
    }


def test_the_validator_rejects_a_broken_manifest() -> None:
    (deployment,) = load_docs(BASE / "deployment.yaml")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/ready"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, K8S_VERSIONS[0], strict=True)


def test_probes_hit_real_routes_on_the_image_port(rendered) -> None:
    from fastapi.testclient import TestClient

    from service.app import create_app
    from service.settings import Settings

    # no `with`: the lifespan (model loading) does not run, as before the model has loaded
    client = TestClient(create_app(Settings()))
    assert client.get("/no-such-probe-path").status_code == 404
    container = _container(rendered)
    port = dockerfile_port()
    named = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert named.get("http") == port, "the container's port named http must be the image's EXPOSE/CMD port"
    assert "command" not in container and "args" not in container, "the image's CMD starts the server"
    probes = {kind: container[kind]["httpGet"] for kind in ("startupProbe", "readinessProbe", "livenessProbe")}
    for kind, probe in probes.items():
        assert probe.get("scheme", "HTTP") == "HTTP" and not probe.get("httpHeaders"), f"{kind}: plain GET"
        assert named.get(probe["port"], probe["port"]) == port, f"{kind} probes another port"
    assert probes["readinessProbe"]["path"] == "/ready"
    assert probes["livenessProbe"]["path"] == "/health"
    # liveness and startup succeed without the model (a loading or busy pod is not restarted); readiness does not
    assert client.get(probes["readinessProbe"]["path"]).status_code == 503
    for kind in ("startupProbe", "livenessProbe"):
        assert client.get(probes[kind]["path"]).status_code == 200, f"{kind} asks a path that is not 200"
    startup = container["startupProbe"]
    allowed = startup.get("initialDelaySeconds", 0) + startup.get("periodSeconds", 10) * startup["failureThreshold"]
    assert allowed >= 120, "the startup probe must allow at least 2 minutes for loading the model"

    # the Prometheus annotations name the image's port and the real metrics route (docs/deploy.md's scrape job)
    annotations = one(rendered, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert int(annotations["prometheus.io/port"]) == port
    client.get("/")  # counted, so the exposition below has samples
    metrics = client.get(annotations["prometheus.io/path"])
    assert metrics.status_code == 200 and "captioner_" in metrics.text, metrics.text[:200]

    service = one(rendered, "Service")
    (service_port,) = service["spec"]["ports"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert service_port["port"] == 80
    assert named.get(service_port["targetPort"], service_port["targetPort"]) == port


def test_selectors_and_scaling_fit_the_pods(rendered) -> None:
    deployment = one(rendered, "Deployment")
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selectors = {
        "Deployment": deployment["spec"]["selector"]["matchLabels"],
        "Service": one(rendered, "Service")["spec"]["selector"],
        "PodDisruptionBudget": one(rendered, "PodDisruptionBudget")["spec"]["selector"]["matchLabels"],
    }
    for kind, selector in selectors.items():
        assert selector and selector.items() <= pod_labels.items(), f"the {kind}'s selector misses the pods"
    hpa = one(rendered, "HorizontalPodAutoscaler")["spec"]
    assert hpa["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": deployment["metadata"]["name"],
    }
    assert 2 <= hpa["minReplicas"] <= hpa["maxReplicas"]
    assert "replicas" not in deployment["spec"], "the HPA owns the replica count"
    (metric,) = hpa["metrics"]
    assert metric["resource"]["name"] == "cpu" and metric["resource"]["target"]["type"] == "Utilization"
    resources = _container(rendered)["resources"]
    assert resources["requests"]["cpu"], "CPU utilisation is relative to the CPU request"
    assert resources["requests"]["memory"] and resources["limits"]["memory"]
    pdb = one(rendered, "PodDisruptionBudget")["spec"]
    assert pdb.get("maxUnavailable") == 1 or pdb.get("minAvailable") == 1


def _memory_bytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)([KMGT]i)?", quantity).groups()
    return int(number) * 1024 ** ("_KMGT".index(unit[0]) if unit else 0)


def test_memory_fits_the_measured_figures(rendered) -> None:
    resources = _container(rendered)["resources"]
    request, limit = (_memory_bytes(resources[k]["memory"]) for k in ("requests", "limits"))
    assert 1.5 * 2**30 <= request <= limit, "one replica stays below 1.5 GB under load: request at least that"


def test_env_names_are_settings() -> None:
    from service.settings import Settings

    fields = set(Settings.model_fields)
    rendered = render(K8S) + render(GPU) + load_docs(BASE / "secret.example.yaml")
    names = set()
    for resource in rendered:
        if resource["kind"] == "ConfigMap":
            names |= set(resource["data"])
        if resource["kind"] == "Secret":
            names |= set(resource.get("stringData", {})) | set(resource.get("data", {}))
        if resource["kind"] == "Deployment":
            names |= {
                env["name"] for c in resource["spec"]["template"]["spec"]["containers"] for env in c.get("env", [])
            }
    # and every CAPTIONER_* name in the files, comments included
    for path in K8S.rglob("*"):
        if path.is_file():
            names |= set(re.findall(r"\bCAPTIONER_[A-Z0-9_]+", path.read_text()))
    names = {name for name in names if name.startswith("CAPTIONER_")}
    assert "CAPTIONER_API_KEYS" in names and "CAPTIONER_DEVICE" in names
    unknown = sorted(n for n in names - LIBRARY_ENV if n.removeprefix("CAPTIONER_").lower() not in fields)
    assert not unknown, f"not fields of service.settings.Settings: {unknown}"


@pytest.mark.parametrize("folder", [K8S, GPU], ids=["cpu", "gpu"])
def test_settings_accept_the_values(folder: Path, monkeypatch) -> None:
    from service.settings import Settings

    rendered = render(folder)
    values = dict(one(rendered, "ConfigMap")["data"])
    values.update({e["name"]: e["value"] for e in _container(rendered).get("env", [])})
    (secret,) = load_docs(BASE / "secret.example.yaml")
    values.update(secret["stringData"])  # the keys the pods get from the Secret
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    settings = Settings()  # raises on a value the service would refuse at start
    fields = {name.removeprefix("CAPTIONER_").lower() for name in values} & set(Settings.model_fields)
    assert fields and fields <= settings.model_fields_set, "the settings were not read from the environment"


def _memory_bytes(quantity: str) -> int:
    match = re.fullmatch(r"(\d+)(Ki|Mi|Gi)?", quantity)
    assert match, f"memory quantity {quantity!r} not understood"
    return int(match.group(1)) * {None: 1, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30}[match.group(2)]


def test_the_worst_case_of_everything_in_flight_fits_the_memory_limit(monkeypatch) -> None:
    """service.memory_plan's sum under the ConfigMap's settings stays within the CPU Deployment's memory limit."""
    from service.memory_plan import total_mib, worst_case
    from service.settings import Settings

    rendered = render(K8S)
    values = dict(one(rendered, "ConfigMap")["data"])
    (secret,) = load_docs(BASE / "secret.example.yaml")
    values.update(secret["stringData"])
    for name, value in values.items():
        monkeypatch.setenv(name, value)
    items = worst_case(Settings())
    limit = _memory_bytes(_container(rendered)["resources"]["limits"]["memory"])
    assert total_mib(items) * 2**20 <= limit, [(i.name, round(i.mib)) for i in items]


def test_configmap_and_secret_are_wired_in(rendered) -> None:
    (config,) = load_kustomization(BASE)["configMapGenerator"]
    (secret,) = load_docs(BASE / "secret.example.yaml")
    env_from = _container(rendered)["envFrom"]
    assert {"configMapRef": {"name": config["name"]}} in env_from
    assert {"secretRef": {"name": secret["metadata"]["name"], "optional": True}} in env_from
    assert not [r for r in rendered if r["kind"] == "Secret"], "keys never ship with the manifests"
    keys = secret["stringData"]["CAPTIONER_API_KEYS"].split(",")
    assert keys and all(key.startswith("REPLACE") for key in keys), "the example holds placeholders only"
    assert one(rendered, "ConfigMap")["data"]["CAPTIONER_ACCESS_LOG"] == "json"


@pytest.mark.parametrize("folder", [K8S, GPU], ids=["cpu", "gpu"])
def test_a_missing_secret_fails_closed(folder: Path, monkeypatch) -> None:
    """The Secret is optional for Kubernetes, so without it the pod starts with no keys: the settings it then has
    must stop the server (captioner-serve exits saying why), not serve an open API."""
    from pydantic import ValidationError

    from service.settings import Settings

    rendered = render(folder)
    for name, value in one(rendered, "ConfigMap")["data"].items():
        monkeypatch.setenv(name, value)
    for env in _container(rendered).get("env", []):
        monkeypatch.setenv(env["name"], env["value"])
    monkeypatch.delenv("CAPTIONER_API_KEYS", raising=False)
    with pytest.raises(ValidationError, match="CAPTIONER_API_KEYS is empty"):
        Settings()
    monkeypatch.setenv("CAPTIONER_API_KEYS", "")  # a Secret with an empty value
    with pytest.raises(ValidationError, match="CAPTIONER_API_KEYS is empty"):
        Settings()
    monkeypatch.setenv("CAPTIONER_API_KEYS", "a-real-key")
    assert Settings().api_keys == ["a-real-key"]


def _shutdown_grace_s(resources: list[dict[str, Any]]) -> float:
    from service.settings import Settings

    data = one(resources, "ConfigMap")["data"]
    env = {e["name"]: e.get("value") for e in _container(resources).get("env", [])}
    value = env.get("CAPTIONER_SHUTDOWN_GRACE_S") or data.get("CAPTIONER_SHUTDOWN_GRACE_S")
    if value is None:
        value = Settings.model_fields["shutdown_grace_s"].default
    return float(value)


def test_termination_grace_outlasts_prestop_and_shutdown(rendered) -> None:
    pre_stop = _container(rendered)["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        sleep = float(pre_stop["sleep"]["seconds"])
    else:
        command = pre_stop["exec"]["command"]
        assert PurePosixPath(command[0]).name == "sleep" and len(command) == 2, f"preStop should sleep: {command}"
        sleep = float(command[1])
        base_image = re.search(r"^ARG BASE_IMAGE=(\S+)", DOCKERFILE.read_text(), re.M).group(1)
        assert re.search(r"bookworm|bullseye|trixie|debian|ubuntu", base_image), f"{base_image}: has it sleep?"
    assert sleep >= 1
    grace = _pod_spec(rendered)["terminationGracePeriodSeconds"]
    assert grace > sleep + _shutdown_grace_s(rendered), "SIGKILL would cut the shutdown grace short"


def test_pods_run_as_the_image_user_on_a_read_only_root(rendered) -> None:
    uid = dockerfile_uid()
    pod = _pod_spec(rendered)
    container = _container(rendered)
    pod_context, context = pod["securityContext"], container["securityContext"]
    for ctx in (pod_context, context):
        assert ctx.get("runAsNonRoot") is True
        assert ctx.get("runAsUser", uid) == uid, "runAsUser must be the image's user (Dockerfile useradd --uid)"
    assert pod_context["runAsUser"] == uid
    assert context["allowPrivilegeEscalation"] is False
    assert context.get("privileged") is not True
    assert context["readOnlyRootFilesystem"] is True
    assert context["capabilities"]["drop"] == ["ALL"] and not context["capabilities"].get("add")
    seccomp = context.get("seccompProfile") or pod_context.get("seccompProfile")
    assert seccomp == {"type": "RuntimeDefault"}
    assert pod.get("automountServiceAccountToken") is False
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]], "a read-only root needs a writable /tmp"


def test_image_can_be_set_by_name() -> None:
    (container,) = containers(load_docs(BASE / "deployment.yaml"))
    assert container["image"] == "captioner", "kustomize edit set image captioner=... must match it"
    for folder in [K8S, BASE, GPU]:
        for image in load_kustomization(folder).get("images", []):
            assert image["name"] == "captioner", f"{folder}: images: entry for an image the manifests do not use"


@pytest.mark.parametrize(("name", "suffix"), [("cpu", ""), ("gpu", "-cuda")])
def test_the_image_is_pinned_to_the_project_version(name: str, suffix: str) -> None:
    from captioner import __version__

    container = _container(render(KUSTOMIZATIONS[name]))
    image = container["image"]
    assert "@sha256:" not in image, "a digest pins it too; then drop this test's tag check"
    repository, _, tag = image.rpartition(":")
    assert repository and "/" not in tag, f"{image}: no tag"
    assert tag != "latest" and tag == f"{__version__}{suffix}", f"{image}: tag it {__version__}{suffix}"
    assert container["imagePullPolicy"] == "IfNotPresent"


def _pod_labels(resources: list[dict[str, Any]]) -> dict[str, str]:
    return one(resources, "Deployment")["spec"]["template"]["metadata"]["labels"]


def test_replicas_spread_over_zones_and_nodes(rendered) -> None:
    constraints = {c["topologyKey"]: c for c in _pod_spec(rendered)["topologySpreadConstraints"]}
    assert set(constraints) == {"topology.kubernetes.io/zone", "kubernetes.io/hostname"}
    for key, constraint in constraints.items():
        assert constraint["maxSkew"] == 1
        # never DoNotSchedule: a full node or a cluster without zone labels must not leave replicas Pending
        assert constraint["whenUnsatisfiable"] == "ScheduleAnyway", key
        assert constraint["labelSelector"]["matchLabels"].items() <= _pod_labels(rendered).items()
        assert constraint.get("matchLabelKeys") == ["pod-template-hash"]


def test_network_policy_admits_only_the_listed_peers_and_no_egress(rendered) -> None:
    policy = one(rendered, "NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= _pod_labels(rendered).items()
    assert set(policy["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["egress"] == [], "the server connects to nothing"
    port = dockerfile_port()
    named = {p["name"]: p["containerPort"] for p in _container(rendered)["ports"]}
    for rule in policy["ingress"]:
        assert rule["ports"], "a rule without ports admits every port"
        assert {named.get(p["port"], p["port"]) for p in rule["ports"]} == {port}
        assert rule["from"], "a rule without `from` admits everyone"
        for peer in rule["from"]:
            assert "ipBlock" not in peer
            # an empty selector ({}) selects every pod or namespace: each one must name labels
            selectors = [peer[k] for k in ("namespaceSelector", "podSelector") if k in peer]
            assert selectors and all(s.get("matchLabels") or s.get("matchExpressions") for s in selectors), peer
    namespaces = {
        peer["namespaceSelector"]["matchLabels"].get("kubernetes.io/metadata.name")
        for rule in policy["ingress"]
        for peer in rule["from"]
        if "namespaceSelector" in peer
    }
    assert namespaces == {"ingress-nginx", "monitoring"}


NGINX_CONF = ROOT / "deploy" / "nginx" / "captioner.conf"


def _nginx_directive(pattern: str) -> str:
    text = "\n".join(line for line in NGINX_CONF.read_text().splitlines() if not line.lstrip().startswith("#"))
    (value,) = re.findall(pattern, text)
    return value


def test_the_ingress_routes_to_the_service_with_the_nginx_configs_limits(rendered) -> None:
    ingress = one(rendered, "Ingress")
    service = one(rendered, "Service")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    backends = [path["backend"]["service"] for rule in ingress["spec"]["rules"] for path in rule["http"]["paths"]]
    assert backends and all(b["name"] == service["metadata"]["name"] for b in backends)
    assert {b["port"]["name"] for b in backends} <= {p["name"] for p in service["spec"]["ports"]}
    annotations = {
        k.removeprefix("nginx.ingress.kubernetes.io/"): v for k, v in ingress["metadata"]["annotations"].items()
    }
    # the same limits as deploy/nginx/captioner.conf, which scripts/replicas-smoke.sh checks in a real nginx
    assert annotations["proxy-body-size"] == _nginx_directive(r"client_max_body_size\s+(\w+);")
    assert annotations["client-body-buffer-size"] == _nginx_directive(r"client_body_buffer_size\s+(\w+);")
    rate = int(_nginx_directive(r"limit_req_zone\s+\S+\s+zone=\S+\s+rate=(\d+)r/s;"))
    assert int(annotations["limit-rps"]) == rate
    assert int(annotations["limit-rps"]) * int(annotations["limit-burst-multiplier"]) == int(
        _nginx_directive(r"limit_req\s+zone=\S+\s+burst=(\d+)")
    )
    assert annotations["limit-connections"] == _nginx_directive(r"limit_conn\s+\S+\s+(\d+);")
    # bodies up to the server's own limit reach it, so that it answers them with its JSON 413
    max_upload = int(one(rendered, "ConfigMap")["data"]["CAPTIONER_MAX_UPLOAD_BYTES"])
    assert _memory_bytes(annotations["proxy-body-size"].replace("m", "Mi")) > max_upload


def _controller_config() -> dict[str, str]:
    """The ingress-nginx controller ConfigMap that docs/deploy.md shows."""
    text = (ROOT / "docs" / "deploy.md").read_text()
    blocks = [yaml.safe_load(b) for b in re.findall(r"^```yaml\n(.*?)^```", text, re.MULTILINE | re.DOTALL)]
    (config,) = [
        b for b in blocks if b.get("kind") == "ConfigMap" and b["metadata"]["name"] == "ingress-nginx-controller"
    ]
    kubernetes_validate.validate(config, K8S_VERSIONS[0], strict=True)
    return config["data"]


def test_the_documented_controller_settings_match_the_nginx_config() -> None:
    data = _controller_config()
    assert data["limit-req-status-code"] == _nginx_directive(r"limit_req_status\s+(\d+);") == "429"
    assert data["limit-conn-status-code"] == _nginx_directive(r"limit_conn_status\s+(\d+);") == "429"
    assert data["large-client-header-buffers"] == _nginx_directive(r"large_client_header_buffers\s+([^;]+);")
    assert data["client-header-buffer-size"] == _nginx_directive(r"client_header_buffer_size\s+(\w+);")
    for key, directive in (
        ("client-header-timeout", "client_header_timeout"),
        ("client-body-timeout", "client_body_timeout"),
    ):
        assert f"{data[key]}s" == _nginx_directive(rf"{directive}\s+(\w+);")


def test_gpu_overlay(gpu) -> None:
    base = _container(render(K8S))
    container = _container(gpu)
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env["CAPTIONER_DEVICE"] == "cuda" and env["CAPTIONER_BACKEND"] == "torch"
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    tolerations = _pod_spec(gpu)["tolerations"]
    assert any(t["key"] == "nvidia.com/gpu" and t["operator"] == "Exists" for t in tolerations)
    # the patch merged into the base container rather than replacing it (the image: same name, its own tag)
    assert container["image"].partition(":")[0] == base["image"].partition(":")[0]
    for key in ("ports", "envFrom", "startupProbe", "readinessProbe", "livenessProbe", "securityContext"):
        assert container[key] == base[key], f"the gpu overlay lost the base's {key}"
    assert container["resources"]["requests"]["cpu"] == base["resources"]["requests"]["cpu"]


def test_renderer_merges_by_name_and_refuses_the_unsupported(tmp_path) -> None:
    merged = strategic_merge(
        {"containers": [{"name": "a", "env": [{"name": "X", "value": "1"}], "args": ["p"]}, {"name": "b"}]},
        {"containers": [{"name": "a", "env": [{"name": "Y", "value": "2"}], "args": ["q"]}]},
    )
    assert merged["containers"][0] == {
        "name": "a",
        "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
        "args": ["q"],
    }
    assert merged["containers"][1] == {"name": "b"}
    (tmp_path / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamePrefix: x-\n"
    )
    with pytest.raises(AssertionError, match="namePrefix"):
        render(tmp_path)


def _without_hashes(documents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """kustomize's output with the ConfigMap's name-hash suffix taken off, in a stable order."""
    text = yaml.safe_dump_all(documents)
    names = {d["metadata"]["name"] for d in documents if d["kind"] == "ConfigMap"}
    for name in names:
        text = text.replace(name, re.sub(r"-[a-z0-9]{10}$", "", name))
    return sorted(yaml.safe_load_all(text), key=lambda d: (d["kind"], d["metadata"]["name"]))


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="no kubectl (its built-in kustomize) on PATH")
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_kubectl_kustomize_agrees_with_the_renderer(name: str) -> None:
    folder = KUSTOMIZATIONS[name]
    try:
        result = subprocess.run(
            ["kubectl", "kustomize", str(folder)], capture_output=True, text=True, timeout=60, check=False
        )
    except subprocess.TimeoutExpired:
        pytest.skip("kubectl kustomize did not answer")
    assert result.returncode == 0, result.stderr
    built = [d for d in yaml.safe_load_all(result.stdout) if d is not None]
    for doc in built:
        kubernetes_validate.validate(doc, K8S_VERSIONS[0], strict=True)
    assert _without_hashes(built) == _without_hashes(render(folder))
