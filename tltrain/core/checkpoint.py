"""The checkpoint directory format (see docs/ARCHITECTURE.md).

Weights are safetensors and the training state loads with `weights_only=True`, so loading a
checkpoint never unpickles arbitrary objects. MANIFEST.json (sha256 of every file) is written last:
a directory without it, or whose hashes disagree, is incomplete or corrupt and is never loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tltrain.spec.metrics import Twin

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"  # the exported weights (with EMA on: the better of raw and EMA)
# With loop.ema_decay on, the twin that is not exported: raw.safetensors or ema.safetensors.
TWIN_FILE = "{}.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "MANIFEST.json"
# Ray Train names a run's checkpoint folders checkpoint_<YYYY-mm-dd_HH-MM-SS.ffffff>: name order is time order.
CHECKPOINT_PREFIX = "checkpoint_"


def sha256_file(path: str | Path) -> str:
    with open(Path(path).expanduser(), "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or corrupt."""


@dataclass
class LoopState:
    """Where the loop stands after an epoch: saved with every checkpoint, restored on resume."""

    epoch: int = 0  # epochs completed
    global_step: int = 0  # optimizer steps taken
    best_metric: float | None = None  # best storage.metric so far
    evals_without_improvement: int = 0  # for early stopping
    history: list[dict[str, Any]] = field(default_factory=list)  # every epoch's scalar metrics


@dataclass
class CheckpointMeta:
    """meta.json: what a checkpoint is, besides its tensors. Written once per checkpoint by the loop
    and read typed by resume, registry, sweeps and tracking (docs/ARCHITECTURE.md lists the fields;
    tests/test_layout.py checks the list against this class)."""

    # Defaults everywhere so that a meta.json of any version loads; the worker fills every field.
    spec: dict[str, Any] = field(default_factory=dict)  # the resolved JobSpec (JobSpec.to_dict())
    class_names: list[str] = field(default_factory=list)  # index = label
    model_name: str = ""  # timm name or torchvision:<name>
    data_config: dict[str, Any] = field(default_factory=dict)  # eval preprocessing: input_size, mean, std, ...
    source_weights_uri: str | None = None  # model.weights the run started from
    source_weights_sha256: str | None = None
    dataset_fingerprint: dict[str, Any] | None = None  # class_names, num_files, sha256 (data.plan_dataset)
    layer_groups: list[str] = field(default_factory=list)  # group names, stem first, head last
    tltrain_version: str | None = None
    # Checkpoints of this run that a restore found corrupt or incomplete, carried forward so that
    # the best-checkpoint rule never picks one of them.
    invalid_checkpoints: list[str] = field(default_factory=list)
    epoch: int = 0  # epochs completed when this checkpoint was written
    global_step: int = 0
    metrics: dict[str, Any] = field(default_factory=dict)  # that epoch's report (no lr/ entries)
    confusion_matrix: list[list[int]] | None = None  # val, rows = true class
    exported_weights: str = Twin.RAW  # which twin model.safetensors holds: "raw", or "ema" (loop.ema_decay)
    loop_state: LoopState = field(default_factory=LoopState)

    @property
    def lora(self) -> dict[str, Any] | None:
        """The run's strategy.lora when its checkpoints are LoRA's (model.safetensors then holds the
        trained tensors only, to be put on the source weights); None for full-weight checkpoints."""
        return (self.spec.get("strategy") or {}).get("lora")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True, default=str)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> CheckpointMeta:
        """From a meta.json of any tltrain version: fields it lacks get their defaults, keys this
        version does not know are ignored."""
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in known}
        loop_state = kwargs.get("loop_state") or {}
        loop_fields = {f.name for f in dataclasses.fields(LoopState)}
        kwargs["loop_state"] = LoopState(**{k: v for k, v in loop_state.items() if k in loop_fields})
        return cls(**kwargs)

    @classmethod
    def from_json(cls, text: str) -> CheckpointMeta:
        return cls.from_dict(json.loads(text))


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | Path,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any] | None,
    meta: CheckpointMeta,
    twin: tuple[str, dict[str, torch.Tensor]] | None = None,
) -> Path:
    """Write a complete checkpoint into `directory` (created if needed); MANIFEST.json last.
    `twin` = (name, weights) of the EMA twin that is not exported, saved as <name>.safetensors."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    files = [MODEL_FILE, META_FILE]
    _save_weights(model_state, d / MODEL_FILE)
    if twin is not None:
        files.append(TWIN_FILE.format(twin[0]))
        _save_weights(twin[1], d / files[-1])
    if train_state is not None:
        torch.save(train_state, d / STATE_FILE)
        files.append(STATE_FILE)
    _write_atomic(d / META_FILE, meta.to_json().encode())
    manifest = {"files": {name: sha256_file(d / name) for name in files}}
    _write_atomic(d / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    return d


def _save_weights(state: dict[str, torch.Tensor], path: Path) -> None:
    # safetensors refuses shared or non-contiguous storage; clone detaches from DDP/compile wrappers.
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in state.items()}, str(path))


def verify_checkpoint(directory: str | Path, source: str | None = None) -> None:
    """Raise CheckpointError unless every file in the manifest exists with its recorded sha256.
    `source` names the checkpoint in messages when `directory` is a local copy (its URI)."""
    d = Path(directory)
    name = source or str(d)
    manifest_path = d / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {name} is incomplete: no {MANIFEST_FILE} (its upload did not finish)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = dict(manifest["files"])
    except (ValueError, KeyError, TypeError):
        raise CheckpointError(f"checkpoint {name} is corrupt: {MANIFEST_FILE} is not a valid manifest") from None
    for fname, expected in files.items():
        path = d / fname
        if not path.is_file():
            raise CheckpointError(f"checkpoint {name} is incomplete: {fname} is missing")
        if sha256_file(path) != expected:
            raise CheckpointError(f"checkpoint {name} is corrupt: {fname} does not match its sha256")


def is_valid_checkpoint(directory: str | Path) -> bool:
    try:
        verify_checkpoint(directory)
    except CheckpointError as err:
        log.warning("%s", err)
        return False
    return True


def load_meta(directory: str | Path) -> CheckpointMeta:
    return CheckpointMeta.from_json((Path(directory) / META_FILE).read_text())


def load_model_state(
    directory: str | Path, source: str | None = None, file: str = MODEL_FILE
) -> dict[str, torch.Tensor]:
    """The (exported) weights, from safetensors (a format that holds tensors only: loading runs no code)."""
    path = Path(directory) / file
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(
            f"checkpoint {source or path.parent}: {file} is not a valid safetensors file ({err})"
        ) from None


def load_twins(
    directory: str | Path, meta: CheckpointMeta, source: str | None = None
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None]:
    """(raw weights, EMA weights or None) of a checkpoint: what a resume loads into the model and
    the EMA. model.safetensors holds whichever twin was exported; the other is beside it."""
    exported = load_model_state(directory, source)
    d = Path(directory)
    if meta.exported_weights == Twin.EMA:
        return load_model_state(d, source, TWIN_FILE.format(Twin.RAW)), exported
    twin = d / TWIN_FILE.format(Twin.EMA)
    return exported, (load_model_state(d, source, twin.name) if twin.is_file() else None)


def load_train_state(
    directory: str | Path, map_location: str | torch.device = "cpu", source: str | None = None
) -> dict[str, Any] | None:
    """Optimizer/scheduler/scaler state. `weights_only=True`: tensors and plain containers only,
    so a tampered file cannot run code when loaded; it is refused instead."""
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        # torch's message advises weights_only=False, the one thing not to do; keep only its reason.
        lines = [ln.strip() for ln in str(err).splitlines() if "GLOBAL" in ln or "Unsupported" in ln]
        raise CheckpointError(
            f"checkpoint {source or path.parent}: refused to load {STATE_FILE}: it holds Python objects other than "
            f"tensors and plain containers ({lines[0] if lines else type(err).__name__})"
        ) from None


def checkpoint_sha256(directory: str | Path) -> str:
    """One digest for the whole checkpoint: the hash of its manifest (which hashes every file)."""
    return sha256_file(Path(directory) / MANIFEST_FILE)
