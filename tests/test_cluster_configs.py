"""The shipped cluster configs and image definition are valid for the tools that consume them.

- cluster/aws.yaml passes Ray's own cluster-config schema (ray/autoscaler/ray-schema.json, the check
  `ray up` runs) after Ray fills in its AWS defaults.
- cluster/kuberay/*.yaml validate against the RayCluster / RayJob CRD schemas of KubeRay (kept in
  tests/data with their provenance), strictly: an unknown field fails here, as it would with
  `kubectl apply --validate=strict`.
- docker/Dockerfile builds on the official Ray image of the pinned Ray version and installs exactly
  pyproject.toml's dependency pins; everything runs one Ray version.
"""

from __future__ import annotations

import copy
import json
import os
import re
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet

from tltrain.spec.load import parse_spec

ROOT = Path(__file__).resolve().parents[1]
DATA = Path(__file__).resolve().parent / "data"
AWS_YAML = ROOT / "cluster" / "aws.yaml"
KUBERAY = ROOT / "cluster" / "kuberay"
DOCKERFILE = ROOT / "docker" / "Dockerfile"
CRD_SCHEMAS = {
    "RayCluster": DATA / "kuberay-v1.7.0-rayclusters-v1.schema.json",
    "RayJob": DATA / "kuberay-v1.7.0-rayjobs-v1.schema.json",
}


# ---------------------------------------------------------------------------------------------
# helpers


def _pyproject_deps() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"]]


def _pinned_ray_version() -> str:
    ray = next(r for r in _pyproject_deps() if r.name == "ray")
    pins = [s.version for s in ray.specifier if s.operator == "=="]
    assert pins, f"pyproject pins ray with ==: {ray}"
    return pins[0]


def _documents(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d is not None]


def _all_manifests() -> list[tuple[str, dict[str, Any]]]:
    return [(f"{p.name}:{d.get('kind')}", d) for p in sorted(KUBERAY.glob("*.yaml")) for d in _documents(p)]


def _strict(schema: Any) -> Any:
    """Copy of a CRD schema where objects with declared properties reject unknown keys.

    The API server prunes unknown fields silently (or rejects them with strict field validation);
    a typo in a manifest must fail the test, not be dropped on apply.
    """
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: _strict(v) for k, v in schema.items()}
    if (
        "properties" in out
        and "additionalProperties" not in out
        and not out.get("x-kubernetes-preserve-unknown-fields")
    ):
        out["additionalProperties"] = False
    return out


def _crd_validator(kind: str) -> jsonschema.Validator:
    doc = json.loads(CRD_SCHEMAS[kind].read_text())
    schema = _strict(doc["openAPIV3Schema"])
    # Kubernetes structural schemas are OpenAPI v3 subsets; draft 4 semantics match them.
    return jsonschema.Draft4Validator(schema)


def _cel_paths(schema: dict[str, Any], value: Any, path: str = "") -> Iterator[str]:
    """Manifest paths whose schema carries x-kubernetes-validations (CEL rules jsonschema can't run)."""
    if not isinstance(schema, dict):
        return
    if "x-kubernetes-validations" in schema:
        yield path or "/"
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        for key, sub in value.items():
            child = props.get(key, extra if isinstance(extra, dict) else None)
            if child is not None:
                yield from _cel_paths(child, sub, f"{path}/{key}")
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, sub in enumerate(value):
            yield from _cel_paths(schema["items"], sub, f"{path}/{i}")


# ---------------------------------------------------------------------------------------------
# AWS cluster launcher


def test_aws_launcher_yaml_passes_rays_schema() -> None:
    import ray.autoscaler
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load(AWS_YAML.read_text())
    # The raw file against the schema file shipped inside the installed ray package ...
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(config, schema)
    # ... and the way `ray up` checks it: Ray's AWS defaults merged in, then validate_config.
    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)

    # What the issue asks of it, so a later edit cannot quietly drop it.
    head = prepared["available_node_types"][prepared["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0, "the head is a CPU node"
    gpu_types = [t for t in prepared["available_node_types"].values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu_types and all(t["max_workers"] > t.get("min_workers", 0) for t in gpu_types), "autoscaling GPU group"
    assert prepared["docker"]["image"].endswith(":0.1.0") and "tltrain" in prepared["docker"]["image"]
    assert any("--shm-size" in o for o in prepared["docker"]["head_run_options"])
    assert all(any("--shm-size" in o for o in t["docker"]["worker_run_options"]) for t in gpu_types)
    # No per-node pip installs: Ray's defaults would otherwise add a `pip install ray` nightly line.
    assert prepared["setup_commands"] == [] and prepared["head_setup_commands"] == []
    # Workers read S3 through an instance role, not keys baked into the config.
    assert all("IamInstanceProfile" in t["node_config"] for t in gpu_types)
    assert "AWS_SECRET_ACCESS_KEY" not in AWS_YAML.read_text()


def test_aws_launcher_yaml_runs_the_pinned_ray_with_auth() -> None:
    config = yaml.safe_load(AWS_YAML.read_text())
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2
    for cmd in config["head_start_ray_commands"] + config["worker_start_ray_commands"]:
        if "ray start" in cmd:
            assert "--object-store-memory" in cmd  # so the /dev/shm sizes above are enough


# ---------------------------------------------------------------------------------------------
# KubeRay


def test_crd_schemas_carry_their_provenance() -> None:
    for kind, path in CRD_SCHEMAS.items():
        doc = json.loads(path.read_text())
        prov = doc["_provenance"]
        assert prov["repository"] == "https://github.com/ray-project/kuberay"
        assert prov["path"].startswith("ray-operator/config/crd/bases/ray.io_")
        assert re.fullmatch(r"v\d+\.\d+\.\d+", prov["tag"]) and re.fullmatch(r"[0-9a-f]{40}", prov["commit"])
        assert doc["kind"] == kind and doc["version"] == "v1" and doc["group"] == "ray.io"
        assert doc["openAPIV3Schema"]["properties"]["kind"]["type"] == "string"


def test_crd_validator_rejects_what_the_api_server_would() -> None:
    """The strict validator is not vacuous: typos, wrong types and missing required fields fail."""
    ((_, cluster),) = [(n, d) for n, d in _all_manifests() if d["kind"] == "RayCluster"]
    validator = _crd_validator("RayCluster")
    assert not list(validator.iter_errors(cluster))
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 8
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["workerGroupSpecs"][0]["minReplicas"] = "zero"
    missing = copy.deepcopy(cluster)
    del missing["spec"]["headGroupSpec"]["template"]
    bad_enum = copy.deepcopy(cluster)
    bad_enum["spec"]["authOptions"]["mode"] = "password"
    for broken in (typo, wrong_type, missing, bad_enum):
        assert list(validator.iter_errors(broken)), broken


@pytest.mark.parametrize("kind", ["RayCluster", "RayJob"])
def test_kuberay_manifests_validate_against_crd(kind: str) -> None:
    docs = [(name, d) for name, d in _all_manifests() if d.get("kind") == kind]
    assert docs, f"no {kind} manifest in {KUBERAY}"
    validator = _crd_validator(kind)
    for name, doc in docs:
        assert doc["apiVersion"] == "ray.io/v1", name
        errors = sorted(validator.iter_errors(doc), key=lambda e: list(e.absolute_path))
        assert not errors, f"{name}: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in errors
        )
        # CEL rules (x-kubernetes-validations) are not run by jsonschema: keep clear of fields that have them.
        schema = json.loads(CRD_SCHEMAS[kind].read_text())["openAPIV3Schema"]
        assert list(_cel_paths(schema, doc)) == [], name


def _cluster_specs() -> Iterator[tuple[str, dict[str, Any]]]:
    for name, doc in _all_manifests():
        if doc["kind"] == "RayCluster":
            yield name, doc["spec"]
        elif doc["kind"] == "RayJob":
            yield name, doc["spec"]["rayClusterSpec"]


def _pod_specs(cluster: dict[str, Any]) -> Iterator[tuple[str, dict[str, Any]]]:
    yield "head", cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["groupName"], group["template"]["spec"]


def test_kuberay_clusters_have_gpu_workers_and_memory_backed_shm() -> None:
    version = _pinned_ray_version()
    dockerfile_tag = _dockerfile_base()[1]
    for name, cluster in _cluster_specs():
        assert cluster["rayVersion"] == version, name
        assert cluster["authOptions"]["mode"] == "token", name
        head_limits = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]["resources"]["limits"]
        assert "nvidia.com/gpu" not in head_limits, f"{name}: the head is a CPU node"
        gpu_groups = [
            g
            for g in cluster["workerGroupSpecs"]
            if int(g["template"]["spec"]["containers"][0]["resources"]["limits"].get("nvidia.com/gpu", 0)) >= 1
        ]
        assert gpu_groups, f"{name}: a GPU worker group"
        for group_name, pod in _pod_specs(cluster):
            shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert shm and shm[0].get("emptyDir", {}).get("sizeLimit"), f"{name}/{group_name}: memory-backed /dev/shm"
            (container,) = pod["containers"]
            mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
            assert mounts[shm[0]["name"]] == "/dev/shm", f"{name}/{group_name}"
            assert container["image"].endswith(":0.1.0"), f"{name}/{group_name}: the project image"
        assert dockerfile_tag.startswith(version)


def test_rayjob_runs_tltrain_train_on_the_configmap_spec() -> None:
    manifests = [d for _, d in _all_manifests()]
    (job,) = [d for d in manifests if d["kind"] == "RayJob"]
    spec = job["spec"]
    argv = spec["entrypoint"].split()
    assert argv[:2] == ["tltrain", "train"], spec["entrypoint"]
    spec_path = Path(argv[2])
    assert spec["entrypointNumGpus"] == 0 and 0 < spec["entrypointNumCpus"] <= 1
    # The spec file comes from a ConfigMap mounted on every pod the driver may be placed on.
    configmaps = {d["metadata"]["name"]: d for d in manifests if d["kind"] == "ConfigMap"}
    for group_name, pod in _pod_specs(spec["rayClusterSpec"]):
        volumes = {v["name"]: v for v in pod["volumes"]}
        (mount,) = [m for m in pod["containers"][0]["volumeMounts"] if m["mountPath"] == str(spec_path.parent)]
        cm_name = volumes[mount["name"]]["configMap"]["name"]
        assert spec_path.name in configmaps[cm_name]["data"], group_name
    job_spec = parse_spec(yaml.safe_load(configmaps[cm_name]["data"][spec_path.name]), "rayjob ConfigMap")
    # Pods have no local copies of anything: data, weights and checkpoints live in object storage.
    for value in (job_spec.data.train, job_spec.data.val, job_spec.model.weights, job_spec.storage.uri):
        assert value is None or value.startswith("s3://"), value
    assert job_spec.scaling.use_gpu


def test_kuberay_pods_reference_only_shipped_service_account_and_optional_credentials() -> None:
    manifests = [d for _, d in _all_manifests()]
    accounts = {d["metadata"]["name"] for d in manifests if d["kind"] == "ServiceAccount"}
    configmaps = {d["metadata"]["name"] for d in manifests if d["kind"] == "ConfigMap"}
    for name, cluster in _cluster_specs():
        for group_name, pod in _pod_specs(cluster):
            assert pod["serviceAccountName"] in accounts, f"{name}/{group_name}"
            for source in pod["containers"][0].get("envFrom", []):
                ref = source.get("secretRef") or source.get("configMapRef")
                # A secret is never shipped in the repo: pods start without it (optional).
                assert ref.get("optional") is True or ("configMapRef" in source and ref["name"] in configmaps)


# ---------------------------------------------------------------------------------------------
# Docker image


def _dockerfile_base() -> tuple[str, str]:
    """(image, tag) of the FROM line, with ARG defaults substituted."""
    text = DOCKERFILE.read_text()
    args = dict(re.findall(r"^ARG\s+(\w+)=(\S+)", text, flags=re.M))
    (image,) = re.findall(r"^FROM\s+(\S+)", text, flags=re.M)
    image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: args[m.group(1) or m.group(2)], image)
    name, _, tag = image.partition(":")
    return name, tag


def _dockerfile_requirements() -> list[Requirement]:
    """The quoted requirements of the Dockerfile's dependency `pip install` (continuation lines joined)."""
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    runs = [line for line in text.splitlines() if line.startswith("RUN ") and "pip install" in line]
    reqs = [Requirement(r) for run in runs for r in re.findall(r'"([^"]+)"', run.split("&&")[0])]
    return reqs


def test_dockerfile_builds_on_the_official_ray_image_of_the_pinned_version() -> None:
    name, tag = _dockerfile_base()
    assert name == "rayproject/ray"
    version = _pinned_ray_version()
    assert re.fullmatch(rf"{re.escape(version)}-py311-cu\d+", tag), tag
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert SpecifierSet(project["requires-python"]).contains("3.11"), "the image's Python 3.11 is supported"


def test_dockerfile_installs_exactly_the_pyproject_pins() -> None:
    def norm(reqs: list[Requirement]) -> dict[str, tuple[frozenset[str], str]]:
        return {r.name.lower().replace("_", "-"): (frozenset(r.extras), str(r.specifier)) for r in reqs}

    docker, project = norm(_dockerfile_requirements()), norm(_pyproject_deps())
    assert docker == project
    # The headline pins, spelled out.
    assert docker["torch"][1] == "==2.14.1" and docker["torchvision"][1] == "==0.29.1"
    assert docker["ray"] == (frozenset({"default", "train", "tune"}), "==2.60.0")
    assert docker["mlflow"][1] == "==3.17.2" and docker["pyarrow"][1] == "<26"
    assert docker["timm"][1] == "==1.0.31"


def test_dockerfile_runs_as_the_images_non_root_user() -> None:
    users = re.findall(r"^USER\s+(\S+)", DOCKERFILE.read_text(), flags=re.M)
    assert users and users[-1] == "ray"
    # The package goes in with --no-deps: the pinned layer stays what runs.
    assert re.search(r"pip install --no-deps \S+", DOCKERFILE.read_text())


def test_every_config_uses_one_image_and_one_ray_version() -> None:
    aws = yaml.safe_load(AWS_YAML.read_text())
    images = {aws["docker"]["image"]}
    for _, cluster in _cluster_specs():
        images |= {pod["containers"][0]["image"] for _, pod in _pod_specs(cluster)}
    assert len(images) == 1, images
    assert os.path.basename(images.pop()).startswith("tltrain:")
