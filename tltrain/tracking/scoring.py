"""Batch scoring with a registered model: fetch the model package once, score batches of image files.

`tltrain predict` composes these: `fetch_model` resolves MODEL_URI on the driver (an unknown ref is
refused before anything starts) and downloads the pyfunc package; `Scorer` is the callable that
scores one batch of file paths, in this process for a few files or inside each Ray Data actor
(execution/predict.py only schedules it). The Scorer reads every file's bytes itself (local or
s3:// through tltrain.storage) and hands the pyfunc raw bytes: the pyfunc never opens a path, and
a file that cannot be read or decoded becomes a row marked skipped instead of failing its batch.

The package travels to cluster workers as bytes (`pack_model`), not as a models:/ URI: a remote
actor then needs no access to the tracking store (the default one is a sqlite file on the
driver's machine), and every actor scores with the very version resolved on the driver even if
an alias moves mid-run.
"""

from __future__ import annotations

import io
import math
import shutil
import tarfile
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import mlflow.artifacts
import mlflow.pyfunc
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.tracking._tracking_service.utils import _use_tracking_uri

from tltrain import storage
from tltrain.tracking.registry import _client, model_uri, resolve_version
from tltrain.tracking.tracker import redact, resolve_tracking_uri

# The output table, in column order: then one prob_<class> column per class (the pyfunc's names).
PATH, LABEL, PROBABILITY = "path", "label", "probability"
# Set on a Scorer's rows only: "" when scored, else why the file was skipped (dropped from the output).
ERROR = "error"
OUT_FORMATS = (".csv", ".parquet")


class ScoringInputError(ValueError):
    """An argument of `tltrain predict` that cannot be scored as given; the message names it and the fix."""


@dataclass(frozen=True)
class FetchedModel:
    uri: str  # what was scored: models:/NAME/VERSION (pinned), runs:/..., or the local directory
    local_dir: Path  # the pyfunc package on this machine


def fetch_model(ref: str, dest: Path, *, tracking_uri: str | None = None) -> FetchedModel:
    """MODEL_URI (NAME@ALIAS | NAME/VERSION | models:/... | runs:/... | a local model dir) ->
    its pyfunc package under `dest`. A registry ref is pinned to a version first."""
    local = Path(ref).expanduser()
    if local.exists():
        if not (local / "MLmodel").is_file():
            raise ScoringInputError(f"MODEL_URI {ref}: not an MLflow model directory (it has no MLmodel file)")
        return FetchedModel(str(local.absolute()), local.absolute())
    uri = resolve_tracking_uri(tracking_uri)
    target = model_uri(ref)
    try:
        if target.startswith("models:/"):
            mv = resolve_version(_client(uri)[0], ref)
            target = f"models:/{mv.name}/{mv.version}"
        # download_artifacts' own tracking_uri/registry_uri arguments do not reach the models:/
        # resolution in MLflow 3.17 (it finds no model): the process-wide URI is set around it.
        with _use_tracking_uri(uri):
            path = Path(mlflow.artifacts.download_artifacts(artifact_uri=target, dst_path=str(dest)))
    except (MlflowException, LookupError, OSError) as err:
        reason = redact((getattr(err, "message", None) or str(err)).strip().splitlines()[0])
        hint = "" if "tltrain registry list" in reason else "; `tltrain registry list` shows the models"
        raise ScoringInputError(f"MODEL_URI {ref}: {reason} (tracking store {redact(uri)}{hint})") from None
    if not (path / "MLmodel").is_file():
        raise ScoringInputError(f"MODEL_URI {ref}: {target} is not an MLflow model (it has no MLmodel file)")
    return FetchedModel(target, path)


def pack_model(model_dir: Path) -> bytes:
    """The package as one uncompressed tar (weights do not compress), to ship to cluster workers."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(str(model_dir), arcname=".")
    return buf.getvalue()


# What a file the model cannot decode raises: the pyfunc's ImageInputError (a ValueError); PIL's
# OSErrors from models logged before it. Anything else (CUDA out of memory, a broken package) is
# not the file's fault and fails the run instead of marking every file unreadable.
_UNDECODABLE = (ValueError, OSError)


def _reason(err: BaseException) -> str:
    """One short line for the summary: the pyfunc's ImageInputError carries the problem with this
    file on its own (its message adds the index and what is accepted); anything else, its first line."""
    problem = getattr(err, "problem", None)
    if problem:
        return str(problem)
    text = (getattr(err, "message", None) or str(err)).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


class Scorer:
    """Scores batches `{"path": [...]}` -> path, label, probability, prob_<class>..., error.

    A callable class so each Ray Data actor loads the model once. `model` is a local package
    directory or `pack_model`'s bytes (unpacked into a temporary directory that is removed once the
    pyfunc has loaded: it reads its weights and metadata into memory at load time)."""

    def __init__(self, model: str | bytes) -> None:
        if isinstance(model, str):
            self.model = mlflow.pyfunc.load_model(model)
        else:
            tmp = tempfile.mkdtemp(prefix="tltrain-model-")
            try:
                with tarfile.open(fileobj=io.BytesIO(model), mode="r") as tar:
                    tar.extractall(tmp, filter="data")
                self.model = mlflow.pyfunc.load_model(tmp)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
        # The output columns from the logged signature, so that a batch of unreadable files still
        # yields every column; else learnt from the first answer.
        schema = self.model.metadata.get_output_schema()
        self.columns: list[str] | None = [str(n) for n in schema.input_names()] if schema is not None else None

    def __call__(self, batch: dict[str, Any]) -> dict[str, np.ndarray]:
        paths = [str(p) for p in batch[PATH]]
        contents = storage.read_files(paths)
        errors = [_reason(c) if isinstance(c, Exception) else "" for c in contents]
        readable = [i for i, e in enumerate(errors) if not e]
        frames: dict[int, pd.DataFrame] = {}
        if readable:
            try:  # the common case: the whole batch in one forward pass
                out = self._predict([contents[i] for i in readable])
                frames.update({i: out.iloc[[k]] for k, i in enumerate(readable)})
            except _UNDECODABLE:  # some file would not decode: find which, one at a time
                for i in readable:
                    try:
                        frames[i] = self._predict([contents[i]])
                    except _UNDECODABLE as err:
                        errors[i] = _reason(err)
        return self._rows(paths, frames, errors)

    def _predict(self, items: list[Any]) -> pd.DataFrame:
        # A Series, so MLflow's input schema sees one column of objects and hands the bytes on as they are.
        out = self.model.predict(pd.Series(items, dtype=object))
        if self.columns is None:
            self.columns = [str(c) for c in out.columns]
        return out.reset_index(drop=True)

    def _rows(self, paths: list[str], frames: dict[int, pd.DataFrame], errors: list[str]) -> dict[str, np.ndarray]:
        columns = self.columns or [LABEL, PROBABILITY]
        out: dict[str, np.ndarray] = {PATH: np.array(paths, dtype=object)}
        for col in columns:
            if col == LABEL:
                values: list[Any] = [str(frames[i][col].iloc[0]) if i in frames else "" for i in range(len(paths))]
                out[col] = np.array(values, dtype=object)
            else:
                out[col] = np.array(
                    [float(frames[i][col].iloc[0]) if i in frames else math.nan for i in range(len(paths))]
                )
        out[ERROR] = np.array(errors, dtype=object)
        return out


def split_rows(rows: pd.DataFrame) -> tuple[pd.DataFrame, list[tuple[str, str]]]:
    """Scored rows (without the error column) and the skipped files as (path, reason)."""
    bad = rows[ERROR].astype(str) != ""
    skipped = list(zip(rows.loc[bad, PATH].astype(str), rows.loc[bad, ERROR].astype(str)))
    return rows.loc[~bad].drop(columns=[ERROR]).reset_index(drop=True), skipped


def ordered(rows: pd.DataFrame, paths: Sequence[str]) -> pd.DataFrame:
    """Rows in the order of `paths` (Ray Data hands batches back as they finish)."""
    rank = {p: i for i, p in enumerate(paths)}
    key = rows[PATH].map(rank)
    return rows.iloc[np.argsort(key.to_numpy(), kind="stable")].reset_index(drop=True)


def check_out(out: str, *, overwrite: bool) -> None:
    """--out: a .csv or .parquet path or s3:// URI that holds nothing yet (unless overwrite), in a
    bucket that exists. Checked before any scoring starts."""
    suffix = Path(out).suffix.lower()
    if suffix not in OUT_FORMATS:
        raise ScoringInputError(f"--out {out}: the file name must end in {' or '.join(OUT_FORMATS)}")
    if storage.is_s3(out):
        bucket, key = storage.split_s3(out)
        if not key:
            raise ScoringInputError(f"--out {out}: name a file in the bucket, e.g. s3://{bucket}/predictions.parquet")
        if not storage.exists(f"s3://{bucket}"):
            raise ScoringInputError(f"--out {out}: bucket {bucket} does not exist; create it or pick another")
    elif Path(out).expanduser().is_dir():
        raise ScoringInputError(f"--out {out}: is a folder; name a file in it, e.g. {out.rstrip('/')}/predictions.csv")
    if not overwrite and storage.exists(out):
        raise ScoringInputError(f"--out {out}: already exists; pick another name or pass --overwrite to replace it")


def write_results(rows: pd.DataFrame, out: str) -> None:
    """CSV or Parquet by --out's extension, to a local path or s3://: written to a local temporary
    file first, then published in one step (a reader never sees half a file)."""
    suffix = Path(out).suffix.lower()
    with tempfile.TemporaryDirectory(prefix="tltrain-predict-") as tmp:
        local = Path(tmp) / f"predictions{suffix}"
        if suffix == ".parquet":
            rows.to_parquet(local, index=False)
        else:
            rows.to_csv(local, index=False)
        storage.upload_file(str(local), out if storage.is_s3(out) else str(Path(out).expanduser()))
