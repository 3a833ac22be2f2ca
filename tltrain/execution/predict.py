"""`tltrain predict`: which files to score, and Ray Data scheduling the registry's Scorer over them.

Everything a user can get wrong is checked before Ray starts: --out (extension, already there,
bucket), every SOURCE (exists, holds images), MODEL_URI (resolved and its package fetched). Then
either this process scores a few named files itself (no cluster is worth starting for them), or
Ray Data runs `tracking.scoring.Scorer` in an actor pool sized from the cluster (one GPU per actor
when the cluster has GPUs), and the driver prints progress as the scored batches come back.

Which files count is the training scan's rule (data/folder.py): its image extensions, hidden files
and folders left out. Other files are ignored and counted; an image file that cannot be read or
decoded is skipped and counted with its reason.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pandas as pd
import ray
import ray.data

from tltrain import storage
from tltrain.core.live import tenth
from tltrain.data.folder import IMAGE_EXTENSIONS, _is_hidden
from tltrain.execution.trainer import ensure_ray
from tltrain.reports import console
from tltrain.tracking.scoring import (
    LABEL,
    PATH,
    PROBABILITY,
    FetchedModel,
    Scorer,
    ScoringInputError,
    check_out,
    fetch_model,
    ordered,
    pack_model,
    split_rows,
    write_results,
)

DEFAULT_BATCH_SIZE = 64  # images per model call: the pyfunc's own chunk, fits a small GPU at 224 px
# CPU actors: threads per actor (torch's intra-op parallelism stops paying off beyond a few for
# batch-64 inference); more CPUs give more actors, each holding one model copy.
_CPUS_PER_ACTOR = 4
_MAX_BLOCKS = 2000
PROGRESS_EVERY_S = 10.0  # a progress line at least this often, and at every further ~10 %


@dataclass
class Sources:
    files: list[str] = field(default_factory=list)  # local absolute paths and s3:// URIs, in order
    ignored: int = 0  # files without an image extension (or hidden) under a folder or prefix


def _is_image(rel: str) -> bool:
    parts = rel.split("/")
    return not any(_is_hidden(p) for p in parts) and os.path.splitext(parts[-1])[1].lower() in IMAGE_EXTENSIONS


def _extensions() -> str:
    return ", ".join(sorted(IMAGE_EXTENSIONS))


def collect_sources(sources: Sequence[str]) -> Sources:
    """Every image under the SOURCE arguments (an image file, a local folder walked recursively, an
    s3:// object or prefix), each once; ScoringInputError naming the SOURCE that has none."""
    out = Sources()
    seen: set[str] = set()
    for source in sources:
        if storage.is_s3(source):
            found, ignored = _s3_source(source)
        else:
            found, ignored = _local_source(source)
        out.ignored += ignored
        for f in found:
            if f not in seen:
                seen.add(f)
                out.files.append(f)
    return out


def _local_source(source: str) -> tuple[list[str], int]:
    path = Path(source).expanduser().absolute()
    if path.is_file():
        if os.path.splitext(path.name)[1].lower() not in IMAGE_EXTENSIONS:
            raise ScoringInputError(f"SOURCE {source}: not an image file (extensions scored: {_extensions()})")
        return [str(path)], 0
    if not path.is_dir():
        raise ScoringInputError(f"SOURCE {source}: no such file or folder")
    rels = storage.list_files(str(path))
    found = [str(path / rel) for rel in rels if _is_image(rel)]
    if not found:
        raise ScoringInputError(f"SOURCE {source}: no image files in this folder (extensions scored: {_extensions()})")
    return found, len(rels) - len(found)


def _s3_source(source: str) -> tuple[list[str], int]:
    bucket, key = storage.split_s3(source)
    if not storage.exists(f"s3://{bucket}"):
        raise ScoringInputError(f"SOURCE {source}: bucket {bucket} does not exist")
    rels = storage.list_files(source)
    if not rels:
        if key and storage.exists(source):  # one object, named exactly
            if os.path.splitext(key)[1].lower() not in IMAGE_EXTENSIONS:
                raise ScoringInputError(f"SOURCE {source}: not an image file (extensions scored: {_extensions()})")
            return [source], 0
        raise ScoringInputError(f"SOURCE {source}: no objects under this prefix")
    base = source.rstrip("/")
    found = [f"{base}/{rel}" for rel in rels if _is_image(rel)]
    if not found:
        raise ScoringInputError(
            f"SOURCE {source}: no image files under this prefix (extensions scored: {_extensions()})"
        )
    return found, len(rels) - len(found)


@dataclass(frozen=True)
class ActorPlan:
    actors: int
    num_cpus: float
    num_gpus: float

    def describe(self) -> str:
        each = f"{self.num_gpus:g} GPU" if self.num_gpus else f"{self.num_cpus:g} CPU"
        return f"{self.actors} actor{'s' if self.actors != 1 else ''} with {each} each"


def plan_actors(resources: dict[str, float], batches: int) -> ActorPlan:
    """One actor per GPU when the cluster has GPUs, else CPU actors of up to _CPUS_PER_ACTOR CPUs
    each; never more actors than batches (each one loads the model)."""
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    if gpus:
        return ActorPlan(max(1, min(gpus, batches)), 1, 1)
    per_actor = min(_CPUS_PER_ACTOR, cpus)
    return ActorPlan(max(1, min(cpus // per_actor, batches)), per_actor, 0)


class _ClusterScorer(Scorer):
    """The Scorer inside a Ray Data actor: its model package comes from Ray's object store (one
    copy per node), not pickled into every actor's constructor arguments."""

    def __init__(self, package: ray.ObjectRef) -> None:
        super().__init__(ray.get(package))


class ScoreProgress:
    """Images scored / total and img/s: a line every ~10 % of the images or PROGRESS_EVERY_S."""

    def __init__(self, total: int, out: TextIO) -> None:
        self.total, self.out = total, out
        self.done = self.skipped = 0
        self.started = self._last_at = time.monotonic()
        self._last_tenth = 0

    def update(self, scored: int, skipped: int) -> None:
        self.done += scored + skipped
        self.skipped += skipped
        now = time.monotonic()
        now_tenth = tenth(self.done, self.total)
        if self.done >= self.total or (now_tenth <= self._last_tenth and now - self._last_at < PROGRESS_EVERY_S):
            return
        self._last_tenth, self._last_at = now_tenth, now
        print(f"scored {self.done}/{self.total} images ({100 * self.done // max(self.total, 1)} %), "
              f"{self.rate():.1f} img/s" + (f", {self.skipped} unreadable" if self.skipped else ""),
              file=self.out, flush=True)  # fmt: skip

    def rate(self) -> float:
        return self.done / max(time.monotonic() - self.started, 1e-9)


def _quiet_ray_data() -> None:
    """Our progress line replaces Ray Data's bars and its per-execution INFO lines; those lines stay
    in Ray Data's own log file (ray-data.log in Ray's session logs) and, with --library-logs, on the
    terminal too."""
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    if not console.library_logs():
        # `import ray.data` gave its logger a console handler of its own and no propagation.
        data_log = logging.getLogger("ray.data")
        for handler in [h for h in data_log.handlers if h.get_name() == "console"]:
            data_log.removeHandler(handler)


def score_on_cluster(model: FetchedModel, files: list[str], *, address: str | None, batch_size: int) -> pd.DataFrame:
    """Ray Data: the files in blocks of one batch each, `map_batches` over the Scorer in an actor
    pool; the scored rows (with the error column) in the order of `files`. Progress goes to
    sys.stderr as it is once Ray is up (reports.console may have moved it)."""
    ensure_ray(address)
    out = sys.stderr
    _quiet_ray_data()
    batches = math.ceil(len(files) / batch_size)
    plan = plan_actors(ray.cluster_resources(), batches)
    print(f"scoring {len(files)} images with {model.uri} on {plan.describe()} (batch {batch_size})",
          file=out, flush=True)  # fmt: skip
    package = ray.put(pack_model(model.local_dir))
    # One block per batch, so that batches reach the actors (and the progress line) one by one;
    # capped, as each block is an object in Ray's store (a block of many batches is sliced by
    # map_batches and comes back when all of them are scored).
    blocks = min(batches, _MAX_BLOCKS)
    ds = ray.data.from_items([{PATH: f} for f in files], override_num_blocks=blocks).map_batches(
        _ClusterScorer,
        fn_constructor_kwargs={"package": package},
        batch_size=batch_size,
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        num_cpus=plan.num_cpus,
        num_gpus=plan.num_gpus or None,
        udf_modifying_row_count=False,
    )
    progress = ScoreProgress(len(files), out)
    parts: list[pd.DataFrame] = []
    for block in ds.iter_batches(batch_size=None, batch_format="pandas"):
        scored, _ = split_rows(block)
        progress.update(len(scored), len(block) - len(scored))
        parts.append(block)
    return ordered(pd.concat(parts, ignore_index=True), files)


def score_here(model: FetchedModel, files: list[str], *, batch_size: int) -> pd.DataFrame:
    """The same Scorer in this process: for a few named files, not worth starting a cluster."""
    scorer = Scorer(str(model.local_dir))
    parts = [pd.DataFrame(scorer({PATH: files[i : i + batch_size]})) for i in range(0, len(files), batch_size)]
    return pd.concat(parts, ignore_index=True)


@dataclass
class PredictResult:
    rows: pd.DataFrame  # scored images: path, label, probability, prob_<class>...
    skipped: list[tuple[str, str]]  # (path, reason) of image files that could not be read or decoded
    ignored: int
    model_uri: str
    seconds: float
    out: str | None
    on_cluster: bool

    def summary(self) -> str:
        n = len(self.rows)
        line = f"scored {n} image{'s' if n != 1 else ''} in {self.seconds:.1f} s"
        if self.on_cluster and self.seconds > 0:
            line += f" ({(n + len(self.skipped)) / self.seconds:.1f} img/s)"
        if self.skipped:
            path, reason = self.skipped[0]
            line += f"; {len(self.skipped)} unreadable skipped (e.g. {path}: {reason})"
        if self.ignored:
            line += f"; {self.ignored} file{'s' if self.ignored != 1 else ''} ignored (not an image extension)"
        if self.out:
            line += f"; wrote {self.out}"
        return line


def run_predict(
    model_ref: str,
    sources: Sequence[str],
    *,
    out: str | None = None,
    overwrite: bool = False,
    address: str | None = None,
    batch_size: int | None = None,
    tracking_uri: str | None = None,
) -> PredictResult:
    """Check every argument, score, write --out; ScoringInputError (before any scoring) for bad input.

    Named image files alone, with no --out and no --address, are scored in this process; a folder,
    an s3:// SOURCE, --out or --address run on the cluster with Ray Data."""
    batch_size = DEFAULT_BATCH_SIZE if batch_size is None else batch_size
    if batch_size < 1:
        raise ScoringInputError(f"--batch-size {batch_size}: must be at least 1")
    if out is not None:
        check_out(out, overwrite=overwrite)
    found = collect_sources(sources)
    files_only = all(not storage.is_s3(s) and Path(s).expanduser().is_file() for s in sources)
    on_cluster = out is not None or address is not None or not files_only
    with tempfile.TemporaryDirectory(prefix="tltrain-model-") as tmp:
        model = fetch_model(model_ref, Path(tmp), tracking_uri=tracking_uri)
        started = time.monotonic()
        if on_cluster:
            rows = score_on_cluster(model, found.files, address=address, batch_size=batch_size)
        else:
            rows = score_here(model, found.files, batch_size=batch_size)
    seconds = time.monotonic() - started
    scored, skipped = split_rows(rows)
    if out is not None and len(scored):
        write_results(scored, out)
    return PredictResult(scored, skipped, found.ignored, model.uri, seconds, out if len(scored) else None, on_cluster)


def result_json(result: PredictResult, *, with_rows: bool) -> dict[str, Any]:
    """--json: today's {"predictions": [{image, label, probability}]} plus the counts."""
    obj: dict[str, Any] = {
        "model": result.model_uri,
        "scored": len(result.rows),
        "unreadable": [{"path": p, "reason": r} for p, r in result.skipped],
        "ignored": result.ignored,
        "out": result.out,
    }
    if with_rows:
        obj["predictions"] = [
            {"image": p, "label": lab, "probability": float(prob)}
            for p, lab, prob in zip(result.rows[PATH], result.rows[LABEL], result.rows[PROBABILITY])
        ]
    return obj
