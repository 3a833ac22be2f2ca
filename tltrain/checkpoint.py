"""The checkpoint directory format (see docs/ARCHITECTURE.md).

Weights are safetensors and the training state loads with `weights_only=True`, so loading a
checkpoint never unpickles arbitrary objects. MANIFEST.json (sha256 of every file) is written last:
a directory without it, or whose hashes disagree, is incomplete or corrupt and is never loaded.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger(__name__)

MODEL_FILE = "model.safetensors"
STATE_FILE = "train_state.pt"
META_FILE = "meta.json"
MANIFEST_FILE = "MANIFEST.json"


class CheckpointError(RuntimeError):
    """A checkpoint is incomplete or corrupt."""


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


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
    manifest = {"files": {name: _sha256(d / name) for name in files}}
    _write_atomic(d / MANIFEST_FILE, json.dumps(manifest, indent=2).encode())
    return d


def verify_checkpoint(directory: str | Path) -> None:
    """Raise CheckpointError unless every file in the manifest exists with its recorded sha256."""
    d = Path(directory)
    manifest_path = d / MANIFEST_FILE
    if not manifest_path.is_file():
        raise CheckpointError(f"checkpoint {d} is incomplete: no {MANIFEST_FILE} (its upload did not finish)")
    manifest = json.loads(manifest_path.read_text())
    for name, expected in manifest["files"].items():
        path = d / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {d} is incomplete: {name} is missing")
        if _sha256(path) != expected:
            raise CheckpointError(f"checkpoint {d} is corrupt: {name} does not match its sha256")


def is_valid_checkpoint(directory: str | Path) -> bool:
    try:
        verify_checkpoint(directory)
    except CheckpointError as err:
        log.warning("%s", err)
        return False
    return True


def load_meta(directory: str | Path) -> dict[str, Any]:
    return json.loads((Path(directory) / META_FILE).read_text())


def load_model_state(directory: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / MODEL_FILE))


def load_train_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    path = Path(directory) / STATE_FILE
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)


def checkpoint_sha256(directory: str | Path) -> str:
    """One digest for the whole checkpoint: the hash of its manifest (which hashes every file)."""
    return _sha256(Path(directory) / MANIFEST_FILE)
