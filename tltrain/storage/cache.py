"""Local copies of remote inputs: dataset folders and weights files under `data.cache_dir`.

Each node keeps its own copy, at the same path as the driver's when cache_dir is the same, so the
sample paths in a TrainPlan resolve on every worker.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from pathlib import Path

from tltrain.spec.schema import DEFAULT_STORE_DIR, expand_path
from tltrain.storage.store import download_file, download_tree, exists, is_s3, split_s3

DEFAULT_CACHE_DIR = f"{DEFAULT_STORE_DIR}/cache"


def cache_dir_for(uri: str, cache_dir: str = DEFAULT_CACHE_DIR) -> str:
    """Local mirror folder of an s3:// dataset: readable name + short hash (so a/b and a_b differ)."""
    readable = re.sub(r"[^A-Za-z0-9._-]+", "_", uri.split("://", 1)[-1]).strip("_")[:100]
    digest = hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:10]
    return str(Path(cache_dir).expanduser().absolute() / f"{readable}-{digest}")


def localize(uri: str, cache_dir: str = DEFAULT_CACHE_DIR, *, retry_s: float = 0.0) -> str:
    """Local directory holding the dataset at uri: the path itself, or the cache mirror of an
    s3:// root (downloaded once; later calls only list the bucket). Raises FileNotFoundError for
    an s3:// prefix with no objects under it."""
    if not is_s3(uri):
        return str(Path(uri).expanduser().absolute())
    if not exists(uri):
        raise FileNotFoundError(f"{uri} does not exist (no objects under that prefix); check the URI")
    local = cache_dir_for(uri, cache_dir)
    download_tree(uri, local, retry_s=retry_s)
    return local


def localizer(cache_dir: str) -> Callable[[str], str]:
    """`localize` bound to a cache directory: what data.plan_dataset takes to read s3:// roots."""
    return lambda uri: localize(uri, cache_dir)


def weights_cache_path(uri: str, cache_dir: str) -> Path:
    return Path(cache_dir_for(uri, cache_dir)) / Path(split_s3(uri)[1]).name


def fetch_weights(uri: str | None, cache_dir: str) -> Path | None:
    """Local file of model.weights (downloaded once per node for s3:// URIs); None for hub/none."""
    if uri is None or uri == "hub":
        return None
    if is_s3(uri):
        local = weights_cache_path(uri, cache_dir)
        if not local.is_file():
            local.parent.mkdir(parents=True, exist_ok=True)
            download_file(uri, str(local))
        return local
    return Path(expand_path(uri))
