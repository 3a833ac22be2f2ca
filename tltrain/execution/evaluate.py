"""The held-out test evaluation: once, after training, on the selected checkpoint.

Nothing the run chose (best epoch, best trial, exported EMA twin, registered version) ever sees the
test split: it is scored here, after every choice is made, and only reported. It runs as one Ray
task with one training worker's resources (a GPU when scaling.use_gpu), so it works on a cluster
whose driver has no GPU; the model and preprocessing come from the checkpoint's meta.json, so the
best trial of a sweep that searched the model is scored as it was trained.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import ray
import torch

from tltrain import storage
from tltrain.core.checkpoint import TWIN_FILE, load_meta, load_model_state, verify_checkpoint
from tltrain.core.model import build_model
from tltrain.core.plan import TrainPlan
from tltrain.core.steps import evaluate
from tltrain.data import build_eval_loader, build_transform
from tltrain.data.orientation import tta_views
from tltrain.execution.worker import rebase
from tltrain.spec.metrics import Split, Twin, is_metric_value, twin_split
from tltrain.spec.schema import JobSpec, ModelSpec

# The eval batch: no gradients, so larger than training's; bounded so a CPU node's memory holds it.
_BATCH = 64


def test_split_of(spec: JobSpec) -> bool:
    """Whether the spec holds out a test split (data.test or data.test_fraction)."""
    return spec.data.test is not None or spec.data.test_fraction is not None


def score_checkpoint(spec: JobSpec, plan: TrainPlan, checkpoint_uri: str) -> dict[str, Any]:
    """test/* of the checkpoint's exported weights (and test_raw/* or test_ema/* of its EMA twin),
    with data.tta: the scalar scores (what the summary, MLflow and registry lineage carry)."""
    resources: dict[str, Any] = {"num_cpus": spec.scaling.cpus_per_worker, "num_gpus": 1 if spec.scaling.use_gpu else 0}
    task = ray.remote(**resources)(_score)
    return ray.get(task.remote(spec.to_dict(), plan.to_dict(), checkpoint_uri))


def _score(spec_dict: dict[str, Any], plan_dict: dict[str, Any], checkpoint_uri: str) -> dict[str, Any]:
    spec, plan = JobSpec.model_validate(spec_dict), TrainPlan(**plan_dict)
    device = torch.device("cuda" if spec.scaling.use_gpu and torch.cuda.is_available() else "cpu")
    root = storage.localize(spec.data.test or spec.data.train, spec.data.cache_dir)
    samples = rebase(plan.test, plan.test_root, root)
    with tempfile.TemporaryDirectory(prefix="tltrain-test-") as directory:
        storage.download_tree(checkpoint_uri, directory, retry_s=storage.OUTAGE_RETRY_S)
        verify_checkpoint(directory, source=checkpoint_uri)
        meta = load_meta(directory)
        trained = JobSpec.model_validate(meta.spec)
        model_spec = ModelSpec.model_validate({**trained.model.model_dump(), "weights": None})
        model = build_model(model_spec, len(meta.class_names), image_size=trained.data.image_size)
        loader = build_eval_loader(
            samples, build_transform(meta.data_config, False), _BATCH, 0, 1, spec.data.loader_workers
        )
        twins = [(Split.TEST, load_model_state(directory, checkpoint_uri))]
        other = Twin.RAW if meta.exported_weights == Twin.EMA else Twin.EMA
        if (Path(directory) / TWIN_FILE.format(other)).is_file():
            state = load_model_state(directory, checkpoint_uri, TWIN_FILE.format(other))
            twins.append((twin_split(Split.TEST, other), state))
    if meta.lora:  # the checkpoint holds adapters + head: made whole on the source weights
        from tltrain.core.lora import rebuild_merged

        source = storage.fetch_weights(meta.source_weights_uri, spec.data.cache_dir)
        merged = rebuild_merged(
            trained, len(meta.class_names), source, meta.source_weights_sha256, [s for _, s in twins]
        )
        twins = [(split, state) for (split, _), state in zip(twins, merged)]
    out: dict[str, Any] = {}
    views = None if spec.data.tta == "none" else (lambda x: tta_views(x, spec.data.tta))
    for split, state in twins:
        model.load_state_dict(state)
        model.to(device)
        metrics = evaluate(model, loader, device, len(meta.class_names), trained.loop.precision, False,
                           split=split, views=views)  # fmt: skip
        out.update({k: v for k, v in metrics.items() if is_metric_value(v)})
    return out
