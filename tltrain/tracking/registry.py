"""The MLflow model registry: checkpoint -> pyfunc model version, aliases, lineage, pull, predict.

A version is registered from a checkpoint directory (see docs/ARCHITECTURE.md) in object storage.
The model package holds the safetensors weights, a sanitized meta.json and tltrain/pyfunc_model.py
(logged as "models from code"), so the downstream process needs mlflow, torch and timm but never
tltrain, and loading it unpickles nothing. It is logged with a signature (one string column of
base64 / data-URI images in; label, probability, prob_<class> out), a tiny PNG input example
(MLflow checks the logged model answers it), the class names and eval preprocessing as metadata,
and a model_config whose keys a loading process may override (allow_local_paths off by default).
Version tags carry the lineage; `checkpoint_sha256` makes registration idempotent.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import tempfile
import time
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version
from pathlib import Path
from typing import Any

import mlflow
import mlflow.pyfunc
from mlflow import MlflowClient
from mlflow.entities.model_registry import ModelVersion
from mlflow.models import Model, ModelSignature
from mlflow.tracking._tracking_service.utils import _use_tracking_uri
from mlflow.types.schema import ColSpec, Schema, TensorSpec

from tltrain import storage
from tltrain.core.checkpoint import (
    MANIFEST_FILE,
    META_FILE,
    MODEL_FILE,
    CheckpointError,
    CheckpointMeta,
    checkpoint_sha256,
    load_meta,
    load_model_state,
    verify_checkpoint,
)
from tltrain.tracking.tracker import (
    LINEAGE_TAG_KEYS,
    MAX_TAG_VAL_LENGTH,
    _clip,
    get_or_create_experiment,
    lineage_tags,
    quiet_prints,
    redact,
    resolve_tracking_uri,
    sanitize_spec,
)

log = logging.getLogger(__name__)

PYFUNC_FILE = Path(__file__).with_name("pyfunc_model.py")
DEFAULT_EXPERIMENT = "tltrain"
# What the downstream process must install; pinned to the versions that built and checked the
# package (local build tags like "+cpu" dropped so a CUDA build satisfies them too).
_RUNTIME_DISTS = ("mlflow", "torch", "timm", "safetensors", "pillow", "numpy", "pandas")


@dataclass(frozen=True)
class ModelVersionInfo:
    name: str
    version: str
    created: bool  # False when this checkpoint (same sha256) was already registered


def _client(tracking_uri: str | None) -> tuple[MlflowClient, str]:
    uri = resolve_tracking_uri(tracking_uri)
    return MlflowClient(tracking_uri=uri, registry_uri=uri), uri


def _requirements(model_name: str) -> list[str]:
    dists = list(_RUNTIME_DISTS) + (["torchvision"] if model_name.startswith("torchvision:") else [])
    reqs = []
    for dist in dists:
        try:
            reqs.append(f"{dist}=={dist_version(dist).split('+')[0]}")
        except PackageNotFoundError:
            reqs.append(dist)
    return reqs


def _signature(class_names: list[str]) -> ModelSignature:
    # Input: one unnamed string column, an image per row as base64 / data:image/...;base64, — what
    # an HTTP client sends. Unnamed, so MLflow's schema enforcement takes a plain list (named, it
    # would demand a DataFrame with that column); "string", because MLflow passes an object column
    # through unconverted, so in-process bytes and Series of arrays still reach the pyfunc as they
    # are ("binary" would base64-decode the strings, breaking data URIs). Type hints on predict
    # could not say this: list[str] refuses bytes, list[Any] warns at every load.
    outputs: list[ColSpec | TensorSpec] = [ColSpec("string", "label"), ColSpec("double", "probability")]
    outputs += [ColSpec("double", f"prob_{name}") for name in class_names]
    return ModelSignature(inputs=Schema([ColSpec("string")]), outputs=Schema(outputs))


def _input_example() -> list[str]:
    """One tiny grey PNG as the data URI an HTTP client posts: MLflow writes it to
    serving_input_example.json, shows it in the UI and checks at logging that the model answers it."""
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (128, 128, 128)).save(buf, format="PNG")
    return ["data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")]


def _model_config(meta: CheckpointMeta) -> dict[str, Any]:
    # MLflow lets load_model(model_config=...) override only the keys logged here, so every key the
    # pyfunc reads is listed; None means the pyfunc's own default (device: cuda when there is one;
    # max_pixels: pyfunc_model.MAX_PIXELS). Files named in the input are never read unless the
    # loading process turns allow_local_paths on.
    return {
        "tta": str(meta.spec.get("data", {}).get("tta", "none")),  # the run's test-time augmentation
        "device": None,
        "allow_local_paths": False,
        "max_pixels": None,
    }


def _find_by_sha(client: MlflowClient, name: str, sha: str) -> ModelVersion | None:
    found = client.search_model_versions(f"name = '{_quote(name)}' and tag.checkpoint_sha256 = '{sha}'")
    return min(found, key=lambda mv: int(mv.version)) if found else None


def _quote(text: str) -> str:
    return text.replace("'", "\\'")


def _manifest_sha(checkpoint_uri: str, tmp: Path) -> str:
    """The checkpoint's sha256 from its manifest alone, so a re-registration downloads one file."""
    manifest_uri = f"{checkpoint_uri.rstrip('/')}/{MANIFEST_FILE}"
    if not storage.exists(manifest_uri):
        raise CheckpointError(
            f"checkpoint {checkpoint_uri} is incomplete: no {MANIFEST_FILE} (its upload did not finish)"
        )
    storage.download_file(manifest_uri, str(tmp / MANIFEST_FILE))
    return checkpoint_sha256(tmp)


def _merged_lora_weights(local: Path, meta: CheckpointMeta, out_dir: Path) -> Path:
    """A LoRA checkpoint's exported weights folded into its source weights (fetched and checked
    against the checkpoint's sha256), as a plain model.safetensors the pyfunc loads with timm."""
    from safetensors.torch import save_file

    from tltrain.core.lora import rebuild_merged
    from tltrain.spec.schema import JobSpec

    spec = JobSpec.model_validate(meta.spec)
    source = storage.fetch_weights(meta.source_weights_uri, spec.data.cache_dir)
    (merged,) = rebuild_merged(
        spec, len(meta.class_names), source, meta.source_weights_sha256, [load_model_state(local)]
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in merged.items()}, str(out_dir / MODEL_FILE))
    return out_dir / MODEL_FILE


def register_checkpoint(
    checkpoint_uri: str,
    registry_name: str,
    *,
    tracking_uri: str | None = None,
    run_id: str | None = None,
    alias: str | None = "challenger",
    experiment: str | None = None,
    tags: dict[str, Any] | None = None,
) -> ModelVersionInfo:
    """Register a checkpoint (local dir or s3:// URI) as a pyfunc model version and point `alias`
    at it. With run_id the model is logged into that run and the run's lineage tags are copied
    onto the version; without, a short "register-<name>" run is created in `experiment` (default:
    the experiment in the checkpoint's spec). Registering the same checkpoint again creates no
    version: it returns the existing one (created=False) and still sets the alias."""
    client, uri = _client(tracking_uri)
    if not storage.is_s3(checkpoint_uri):
        checkpoint_uri = str(Path(checkpoint_uri).expanduser().absolute())
    with tempfile.TemporaryDirectory(prefix="tltrain-register-") as tmp_name:
        tmp = Path(tmp_name)
        existing = _find_by_sha(client, registry_name, _manifest_sha(checkpoint_uri, tmp / "manifest"))
        if existing is not None:
            log.info("checkpoint already registered as %s version %s", registry_name, existing.version)
            if alias:
                client.set_registered_model_alias(registry_name, alias, existing.version)
            return ModelVersionInfo(registry_name, str(existing.version), created=False)

        local = tmp / "checkpoint"
        storage.download_tree(checkpoint_uri, str(local))
        verify_checkpoint(local, source=checkpoint_uri)  # CheckpointError: incomplete or corrupt upload
        sha = checkpoint_sha256(local)
        meta = load_meta(local)
        clean_meta = sanitize_spec(meta.to_dict())  # the package carries the spec; it must carry no secret
        meta_path = tmp / META_FILE
        meta_path.write_text(json.dumps(clean_meta, indent=2, sort_keys=True))

        weights_file = local / MODEL_FILE
        lora = meta.lora
        if lora:  # adapters + head only: the package gets merged full weights (no peft downstream)
            weights_file = _merged_lora_weights(local, meta, tmp / "merged")

        version_tags: dict[str, Any] = lineage_tags(meta)
        own_run = run_id is None
        if run_id is None:
            exp_name = experiment or (meta.spec.get("tracking") or {}).get("experiment") or DEFAULT_EXPERIMENT
            exp_id = get_or_create_experiment(client, exp_name, uri)
            run_id = client.create_run(exp_id, run_name=f"register-{registry_name}", tags=version_tags).info.run_id
        else:
            run_tags = client.get_run(run_id).data.tags
            version_tags.update({k: run_tags[k] for k in LINEAGE_TAG_KEYS if k in run_tags})
        version_tags.update(
            checkpoint_uri=checkpoint_uri,
            checkpoint_sha256=sha,
            model_name=meta.model_name,
            epoch=meta.epoch,
            global_step=meta.global_step,
            metrics=json.dumps(meta.metrics, sort_keys=True),
            spec=json.dumps(clean_meta["spec"], sort_keys=True),
            **(tags or {}),
        )
        version_tags = {k: _clip(redact(str(v)), MAX_TAG_VAL_LENGTH) for k, v in version_tags.items() if v is not None}

        # Create the LoggedModel ourselves: Model.log would file it under the fluent API's active
        # (default "0") experiment instead of the run's experiment.
        status = "FAILED"
        try:
            experiment_id = client.get_run(run_id).info.experiment_id
            logged = client.create_logged_model(
                experiment_id, name="model", source_run_id=run_id, tags={"checkpoint_sha256": sha}
            )
            with _use_tracking_uri(uri):
                info = Model.log(
                    artifact_path=None,
                    name="model",
                    flavor=mlflow.pyfunc,
                    flavor_name="pyfunc.ModelFromCode",
                    run_id=run_id,
                    model_id=logged.model_id,
                    python_model=str(PYFUNC_FILE),
                    artifacts={"weights": str(weights_file), "meta": str(meta_path)},
                    signature=_signature(meta.class_names),
                    input_example=_input_example(),
                    model_config=_model_config(meta),
                    pip_requirements=_requirements(meta.model_name),
                    # What `mlflow models` and the UI show a downstream user: the classes in label
                    # order and the eval preprocessing the pyfunc applies.
                    metadata={
                        "class_names": meta.class_names,
                        "model_name": meta.model_name,
                        "data_config": meta.data_config,
                        "checkpoint_sha256": sha,
                    },
                )
                with quiet_prints():
                    mv = mlflow.register_model(info.model_uri, registry_name, tags=version_tags)
            status = "FINISHED"
        finally:
            if own_run:  # a run we opened must not stay RUNNING, whatever happened
                client.set_terminated(run_id, status)
    if alias:
        client.set_registered_model_alias(registry_name, alias, mv.version)
    log.info("registered %s version %s from %s", registry_name, mv.version, redact(checkpoint_uri))
    return ModelVersionInfo(registry_name, str(mv.version), created=True)


# --- reading the registry --------------------------------------------------------------------


def parse_ref(ref: str) -> tuple[str, str | None, str | None]:
    """NAME | NAME@ALIAS | NAME/VERSION (optionally prefixed models:/) -> (name, alias, version)."""
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        name, alias = ref.rsplit("@", 1)
        return name, alias, None
    head, _, tail = ref.rpartition("/")
    if head and tail.isdigit():
        return head, None, tail
    return ref, None, None


def resolve_version(client: MlflowClient, ref: str) -> ModelVersion:
    name, alias, version = parse_ref(ref)
    if alias:
        return client.get_model_version_by_alias(name, alias)
    if version:
        return client.get_model_version(name, version)
    versions = client.search_model_versions(f"name = '{_quote(name)}'")
    if not versions:
        raise LookupError(f"registered model {name!r} has no versions (see `tltrain registry list`)")
    return max(versions, key=lambda mv: int(mv.version))


def list_models(*, tracking_uri: str | None = None) -> list[dict[str, Any]]:
    client, _ = _client(tracking_uri)
    out = []
    for rm in client.search_registered_models(max_results=1000):
        versions = client.search_model_versions(f"name = '{_quote(rm.name)}'")
        out.append(
            {
                "name": rm.name,
                "latest_version": max((int(v.version) for v in versions), default=None),
                "num_versions": len(versions),
                "aliases": dict(rm.aliases or {}),
                "updated": _iso(rm.last_updated_timestamp),
            }
        )
    return out


def _iso(ms: int | None) -> str | None:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)) if ms else None


def _json_tag(tags: dict[str, str], key: str) -> Any:
    try:
        return json.loads(tags[key]) if key in tags else None
    except json.JSONDecodeError:  # clipped at MLflow's tag length limit
        return tags[key]


def show(ref: str, *, tracking_uri: str | None = None) -> dict[str, Any]:
    """A version's lineage: checkpoint, source weights, dataset fingerprint, spec, metrics, trial."""
    client, _ = _client(tracking_uri)
    mv = resolve_version(client, ref)
    aliases = [a for a, v in (client.get_registered_model(mv.name).aliases or {}).items() if str(v) == str(mv.version)]
    t = dict(mv.tags or {})
    return {
        "name": mv.name,
        "version": str(mv.version),
        "aliases": sorted(aliases),
        "created": _iso(mv.creation_timestamp),
        "model_uri": f"models:/{mv.name}/{mv.version}",
        "run_id": mv.run_id,
        "checkpoint_uri": t.get("checkpoint_uri"),
        "checkpoint_sha256": t.get("checkpoint_sha256"),
        "model_name": t.get("model_name"),
        "source_weights_uri": t.get("source_weights_uri"),
        "source_weights_sha256": t.get("source_weights_sha256"),
        "dataset": {
            "sha256": t.get("dataset_sha256"),
            "num_files": t.get("dataset_num_files"),
            "class_names": _json_tag(t, "dataset_class_names"),
        },
        # Under domain adaptation: the unlabelled target images the features were aligned to.
        "target_unlabelled": {"sha256": t["target_sha256"], "num_files": t.get("target_num_files")}
        if "target_sha256" in t
        else None,
        "lora": _json_tag(t, "lora"),
        "domain_adaptation": _json_tag(t, "domain_adaptation"),
        "trial": t.get("trial"),
        "ray_run": t.get("ray_run"),
        "epoch": t.get("epoch"),
        "metrics": _json_tag(t, "metrics"),
        "spec": _json_tag(t, "spec"),
        "tltrain_version": t.get("tltrain_version"),
        "git_commit": t.get("git_commit"),
    }


def promote(name: str, version: str | int, alias: str = "champion", *, tracking_uri: str | None = None) -> str | None:
    """Point `alias` at `version`; returns the version it pointed at before (None if unset)."""
    client, _ = _client(tracking_uri)
    client.get_model_version(name, str(version))  # fail clearly on an unknown version
    before = (client.get_registered_model(name).aliases or {}).get(alias)
    client.set_registered_model_alias(name, alias, str(version))
    return str(before) if before is not None else None


def pull(ref: str, to_dir: str, *, tracking_uri: str | None = None) -> Path:
    """Download the version's checkpoint (all files, from its checkpoint_uri) into to_dir and check
    it is the very checkpoint that was registered."""
    client, _ = _client(tracking_uri)
    mv = resolve_version(client, ref)
    tags = dict(mv.tags or {})
    if "checkpoint_uri" not in tags:
        raise LookupError(f"{mv.name} version {mv.version} was not registered by tltrain (no checkpoint_uri tag)")
    dest = Path(to_dir).expanduser()
    storage.download_tree(tags["checkpoint_uri"], str(dest))
    verify_checkpoint(dest, source=tags["checkpoint_uri"])
    if checkpoint_sha256(dest) != tags.get("checkpoint_sha256"):
        raise RuntimeError(f"{tags['checkpoint_uri']} changed since {mv.name} version {mv.version} was registered")
    return dest


def model_uri(ref: str) -> str:
    """NAME@ALIAS / NAME/VERSION shorthands -> models:/...; runs:/, models:/ and paths unchanged."""
    if "://" in ref or ref.startswith(("models:/", "runs:/")) or Path(ref).expanduser().exists():
        return ref
    return f"models:/{ref}"
