"""The cluster configurations: ray_cluster.yaml against Ray's own schema and config code, the
KubeRay manifests against the operator's own CRD schemas made strict about unknown keys
(tests/crd_schema.py; the CRDs are read from ../shared/reference/kuberay/), and the project-specific
layout both must share (CPU head with no work, autoscaling GPU and CPU workers, install via
./setup.sh, no credentials in any file). No cloud or Kubernetes API is contacted."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import jsonschema
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
RAY_CLUSTER_YAML = ROOT / "ray_cluster.yaml"
K8S_DIR = ROOT / "cluster" / "k8s"
KUBERAY_CRDS = ROOT.parent / "shared" / "reference" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(RAY_CLUSTER_YAML.read_text())


@pytest.fixture(scope="module")
def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def node_types_by_role(config: dict) -> tuple[dict, dict, dict]:
    """(head, gpu worker, cpu worker) node types, found by their resources, not their names."""
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    workers = [t for name, t in types.items() if name != config["head_node_type"]]
    gpu = [t for t in workers if t["resources"].get("GPU", 0) > 0]
    cpu = [t for t in workers if t["resources"].get("GPU", 0) == 0]
    assert len(gpu) == 1 and len(cpu) == 1, "expected exactly one GPU and one CPU worker type"
    return head, gpu[0], cpu[0]


# ---- ray_cluster.yaml: Ray's schema and config code -----------------------------------------


def test_ray_cluster_yaml_matches_ray_schema(cluster_config, ray_schema):
    jsonschema.Draft7Validator.check_schema(ray_schema)
    errors = [
        f"{list(e.path)}: {e.message}" for e in jsonschema.Draft7Validator(ray_schema).iter_errors(cluster_config)
    ]
    assert not errors


def test_ray_cluster_yaml_passes_prepare_and_validate_config(cluster_config):
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(cluster_config))  # merges AWS defaults; no cloud calls
    validate_config(prepared)
    # Setup commands reach both node kinds after the merge.
    assert any("./setup.sh" in c for c in prepared["head_setup_commands"])
    assert any("./setup.sh" in c for c in prepared["worker_setup_commands"])


@pytest.mark.parametrize(
    "mutate",
    [
        lambda c: c["available_node_types"]["gpu_worker"].update(min_worker=0),  # typo
        lambda c: c["available_node_types"]["head"]["resources"].update(CPU="0"),  # wrong type
        lambda c: c.update(setup_command=[]),  # unknown top-level key
        lambda c: c.update(head_node_type="no_such_type"),
    ],
    ids=["typo-min_worker", "string-resource", "unknown-key", "missing-head-type"],
)
def test_ray_validation_rejects_broken_configs(cluster_config, mutate):
    from ray.autoscaler._private.util import prepare_config, validate_config

    broken = copy.deepcopy(cluster_config)
    mutate(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError, KeyError)):
        validate_config(prepare_config(broken))


# ---- ray_cluster.yaml: the project's layout --------------------------------------------------


def test_head_schedules_no_work(cluster_config):
    head, _, _ = node_types_by_role(cluster_config)
    assert head["resources"] == {"CPU": 0}
    assert head.get("max_workers", 0) == 0
    assert "--num-cpus" not in " ".join(cluster_config["head_start_ray_commands"])  # resources is the one place


def test_gpu_worker_type_autoscales(cluster_config):
    _, gpu, _ = node_types_by_role(cluster_config)
    assert gpu["resources"]["GPU"] >= 1 and gpu["resources"]["CPU"] >= 1
    assert 0 <= gpu["min_workers"] < gpu["max_workers"]
    assert re.match(r"^(g\d|p\d)", gpu["node_config"]["InstanceType"]), "GPU worker must be a GPU instance family"
    assert gpu["node_config"].get("InstanceMarketOptions") is None, "training runs on demand, not spot"


def test_cpu_worker_type_autoscales(cluster_config):
    _, gpu, cpu = node_types_by_role(cluster_config)
    assert cpu["resources"]["CPU"] >= 2 and "GPU" not in cpu["resources"]
    assert 0 <= cpu["min_workers"] < cpu["max_workers"]
    assert gpu["max_workers"] + cpu["max_workers"] <= cluster_config["max_workers"]


def test_setup_installs_the_project_like_the_readme(cluster_config):
    mounts = cluster_config["file_mounts"]
    remote = next(r for r, local in mounts.items() if local in (".", "./"))
    setup = cluster_config["setup_commands"]
    assert f"cd {remote} && ./setup.sh" in setup
    venv_bin = f"{remote}/.venv/bin"
    # Ray itself and job entrypoints come from the venv setup.sh built.
    assert any(f"{venv_bin}/pip" in c for c in cluster_config["head_setup_commands"])
    for commands in (cluster_config["head_start_ray_commands"], cluster_config["worker_start_ray_commands"]):
        start = commands[-1]
        assert "ray start" in start and ".venv/bin" in start and "RAY_AUTH_MODE=token" in start
    assert "--autoscaling-config=~/ray_bootstrap_config.yaml" in cluster_config["head_start_ray_commands"][-1]
    # The local venv and VCS data never travel.
    assert {".venv", ".git"} <= set(cluster_config["rsync_exclude"])


def test_credentials_come_from_instance_roles(cluster_config):
    for name, node_type in cluster_config["available_node_types"].items():
        assert "IamInstanceProfile" in node_type["node_config"], f"{name} has no instance profile"
    # The Ray token travels as a file from the launching machine, not as a value in the file.
    assert cluster_config["file_mounts"].get("~/.ray/auth_token") == "~/.ray/auth_token"


AWS_KEY_ID = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
ASSIGNED_SECRET = re.compile(
    r"(aws_secret_access_key|aws_access_key_id|aws_session_token|secret_?key|password)\s*[:=]\s*['\"]?[A-Za-z0-9/+=]{8,}",
    re.IGNORECASE,
)
BASE64_40 = re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])")


def cluster_files() -> list[Path]:
    files = [RAY_CLUSTER_YAML, *sorted((ROOT / "cluster").rglob("*"))]
    return [f for f in files if f.is_file() and f.suffix in {".yaml", ".yml", ".json", ".md", ".py"}]


@pytest.mark.parametrize("path", cluster_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_secrets_in_cluster_files(path):
    text = path.read_text()
    assert not AWS_KEY_ID.search(text), "AWS access key id"
    assert not ASSIGNED_SECRET.search(text), "a secret assigned a value"
    # A bare 40-character base64 run is what an AWS secret key looks like.
    suspicious = [m for m in BASE64_40.findall(text) if not m.isalpha() and not m.isdigit() and "/" not in m]
    assert not suspicious, f"secret-like strings: {suspicious}"


# ---- KubeRay manifests ---------------------------------------------------------------------


def load_manifests() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(K8S_DIR.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                docs.append((path.name, doc))
    return docs


MANIFESTS = load_manifests()
RAY_DOCS = [(name, doc) for name, doc in MANIFESTS if doc["apiVersion"] == "ray.io/v1"]


@pytest.fixture(scope="module")
def kuberay_validators() -> dict[str, jsonschema.Draft4Validator]:
    from tests.crd_schema import manifest_schema

    validators = {}
    for kind, name in CRD_FILES.items():
        path = KUBERAY_CRDS / name
        if not path.exists():
            pytest.fail(f"KubeRay CRD missing: {path} (shared/ must sit beside the repository)")
        schema = manifest_schema(path)
        jsonschema.Draft4Validator.check_schema(schema)
        validators[kind] = jsonschema.Draft4Validator(schema)
    return validators


# What the CRDs allow but this project's manifests must not do (the API server would take them).
RESOURCE_NAMES = {"cpu", "memory", "ephemeral-storage", "nvidia.com/gpu"}
SUBMISSION_MODES = {"K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"}  # KubeRay's documented modes


def manifest_errors(validators: dict, doc: dict) -> list[str]:
    """Schema errors of a KubeRay manifest, then the project's own rules."""
    errors = [f"{'.'.join(map(str, e.path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]
    cluster = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"].get("rayClusterSpec", {})
    groups = [cluster.get("headGroupSpec", {})] + list(cluster.get("workerGroupSpecs", []))
    for group in groups:
        for container in group.get("template", {}).get("spec", {}).get("containers", []):
            for kind in ("limits", "requests"):
                unknown = set(container.get("resources", {}).get(kind, {})) - RESOURCE_NAMES
                errors += [f"{container.get('name')}: unknown resource {name!r} in {kind}" for name in sorted(unknown)]
    if doc["kind"] == "RayJob" and doc["spec"].get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
        errors.append(f"spec.submissionMode: {doc['spec']['submissionMode']!r} is not one of {sorted(SUBMISSION_MODES)}")
    return errors


def the(kind: str) -> dict:
    found = [doc for _, doc in RAY_DOCS if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind} manifest"
    return found[0]


def test_manifests_present():
    kinds = sorted(doc["kind"] for _, doc in MANIFESTS)
    assert kinds == ["RayCluster", "RayJob", "ServiceAccount"]


@pytest.mark.parametrize("name,doc", RAY_DOCS, ids=[f"{n}:{d['kind']}" for n, d in RAY_DOCS])
def test_kuberay_manifest_matches_crd_schema(kuberay_validators, name, doc):
    assert not manifest_errors(kuberay_validators, doc)


def _set(path: str, value):
    def mutate(doc: dict) -> None:
        *parents, leaf = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[leaf] = value

    return mutate


def _rename(path: str, new: str):
    def mutate(doc: dict) -> None:
        *parents, leaf = path.split(".")
        node = doc
        for key in parents:
            node = node[int(key)] if key.isdigit() else node[key]
        node[new] = node.pop(leaf)

    return mutate


TYPOS = {
    "minReplica": ("RayCluster", _rename("spec.workerGroupSpecs.0.minReplicas", "minReplica")),
    "rayStartParam": ("RayCluster", _rename("spec.headGroupSpec.rayStartParams", "rayStartParam")),
    "enableInTreeAutoScaling": ("RayCluster", _rename("spec.enableInTreeAutoscaling", "enableInTreeAutoScaling")),
    "num-cpus-not-string": ("RayCluster", _set("spec.headGroupSpec.rayStartParams.num-cpus", 0)),
    "container-resource": (
        "RayCluster",
        _rename("spec.workerGroupSpecs.0.template.spec.containers.0.resources", "resource"),
    ),
    "gpu-resource-name": (
        "RayCluster",
        _set("spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits.gpu", "1"),
    ),
    "upscalingMode": ("RayCluster", _set("spec.autoscalerOptions.upscalingMode", "Fast")),
    "apiVersion": ("RayCluster", _set("apiVersion", "ray.io/v1alpha1")),
    "shutdownAfterJobFinish": ("RayJob", _rename("spec.shutdownAfterJobFinishes", "shutdownAfterJobFinish")),
    "clusterSpec": ("RayJob", _rename("spec.rayClusterSpec", "clusterSpec")),
    "submissionMode": ("RayJob", _set("spec.submissionMode", "K8sMode")),
    "job-maxReplica": ("RayJob", _rename("spec.rayClusterSpec.workerGroupSpecs.1.maxReplicas", "maxReplica")),
}


@pytest.mark.parametrize("kind,mutate", list(TYPOS.values()), ids=list(TYPOS))
def test_kuberay_schema_rejects_typos(kuberay_validators, kind, mutate):
    broken = copy.deepcopy(the(kind))
    mutate(broken)
    assert manifest_errors(kuberay_validators, broken), "a misspelt or mistyped field was accepted"


def containers(group: dict) -> list[dict]:
    return group["template"]["spec"]["containers"]


def gpus(container: dict, kind: str) -> int:
    return int(container.get("resources", {}).get(kind, {}).get("nvidia.com/gpu", 0))


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_layout(kind):
    doc = the(kind)
    spec = doc["spec"] if kind == "RayCluster" else doc["spec"]["rayClusterSpec"]
    assert spec["enableInTreeAutoscaling"] is True
    head = spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    assert all(gpus(c, "limits") == 0 for c in containers(head))

    groups = {g["groupName"]: g for g in spec["workerGroupSpecs"]}
    gpu_groups = [g for g in groups.values() if any(gpus(c, "limits") for c in containers(g))]
    cpu_groups = [g for g in groups.values() if g not in gpu_groups]
    assert len(gpu_groups) == 1 and len(cpu_groups) == 1
    for group in groups.values():
        assert 0 <= group["minReplicas"] <= group.get("replicas", 0) <= group["maxReplicas"]
        assert group["maxReplicas"] >= 1
        for container in containers(group):
            resources = container["resources"]
            assert resources["requests"] == resources["limits"], "requests and limits differ"
    gpu_group = gpu_groups[0]
    (container,) = containers(gpu_group)
    # Extended resources: the request must equal the limit, and Ray must advertise the same count.
    assert gpus(container, "limits") >= 1 and gpus(container, "requests") == gpus(container, "limits")
    assert int(gpu_group["rayStartParams"].get("num-gpus", gpus(container, "limits"))) == gpus(container, "limits")
    assert any(t.get("key") == "nvidia.com/gpu" for t in gpu_group["template"]["spec"].get("tolerations", []))


def test_rayjob_runs_pifuhd_on_the_raycluster_layout():
    job, cluster = the("RayJob"), the("RayCluster")
    assert job["spec"]["entrypoint"].startswith("pifuhd ")
    assert job["spec"]["shutdownAfterJobFinishes"] is True
    assert job["spec"]["rayClusterSpec"] == cluster["spec"], "RayJob's cluster drifted from raycluster.yaml"


def test_kubernetes_pods_share_image_and_identity():
    (account,) = [doc for _, doc in MANIFESTS if doc["kind"] == "ServiceAccount"]
    images, accounts = set(), set()
    for _, doc in RAY_DOCS:
        spec = doc["spec"] if doc["kind"] == "RayCluster" else doc["spec"]["rayClusterSpec"]
        for group in [spec["headGroupSpec"], *spec["workerGroupSpecs"]]:
            accounts.add(group["template"]["spec"].get("serviceAccountName"))
            for container in containers(group):
                images.add(container["image"])
                # Credentials only by reference (Secret / cloud identity), never as values.
                for env in container.get("env", []):
                    assert "value" not in env or not re.search(r"SECRET|TOKEN|PASSWORD|KEY", env["name"])
    assert len(images) == 1 and not images.pop().endswith(":latest")
    assert accounts == {account["metadata"]["name"]}


def test_cloud_and_kubernetes_layouts_agree(cluster_config):
    _, gpu, cpu = node_types_by_role(cluster_config)
    groups = {g["groupName"]: g for g in the("RayCluster")["spec"]["workerGroupSpecs"]}
    assert groups["gpu"]["maxReplicas"] == gpu["max_workers"]
    assert groups["cpu"]["maxReplicas"] == cpu["max_workers"]
    assert int(groups["gpu"]["rayStartParams"]["num-gpus"]) == gpu["resources"]["GPU"]
