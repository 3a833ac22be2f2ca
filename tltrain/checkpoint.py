"""The checkpoint directory format (see docs/ARCHITECTURE.md).

Weights are safetensors and the training state loads with `weights_only=True`, so loading a
checkpoint never unpickles arbitrary objects. MANIFEST.json (sha256 of every file) is written last:
a directory without it, or whose hashes disagree, is incomplete or corrupt and is never loaded.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from tltrain.storage import sha256_file

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "MANIFEST.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or corrupt."""


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_checkpoint(
    directory: str | Path,
    model_state: dict[str, torch.Tensor],
    train_state: dict[str, Any] | None,
    meta: dict[str, Any],
) -> Path:
    """Write a complete checkpoint into `directory` (created if needed); MANIFEST.json last."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    # safetensors refuses shared or non-contiguous storage; clone detaches from DDP/compile wrappers.
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in model_state.items()}
    save_file(tensors, str(d / MODEL_FILE))
    files = [MODEL_FILE, META_FILE]
    if train_state is not None:
        torch.save(train_state, d / STATE_FILE)
        files.append(STATE_FILE)
    _write_atomic(d / META_FILE, json.dumps(meta, indent=2, sort_keys=True, default=str).encode())
    manifest = {"files": {name: sha256_file(d / name) for name in files}}
    _write_atomic(d / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    return d


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


def load_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text())


def load_model_state(directory: str | Path, source: str | None = None) -> dict[str, torch.Tensor]:
    """The weights, from safetensors (a format that holds tensors only: loading runs no code)."""
    path = Path(directory) / MODEL_FILE
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for a damaged header
        raise CheckpointError(
            f"checkpoint {source or path.parent}: {MODEL_FILE} is not a valid safetensors file ({err})"
        ) from None


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
