"""MLflow runs: one run per training job, or a parent run per sweep with a child run per trial.

The driver (rank 0 / the Ray driver) opens a tracker with `open_tracker(spec)`; when
spec.tracking.enabled is false it gets a `NullTracker` with the same methods, so callers never
branch. We talk to MLflow through an explicit `MlflowClient` rather than the fluent API's global
"active run" stack: trials of a sweep log concurrently and must not touch each other's run.

Nothing secret may reach MLflow: the spec is flattened without any env/secret sections, URL
user-info is masked, and the values of well-known credential variables are masked wherever they
would appear (see `redact`).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import Any

import yaml
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag
from mlflow.environment_variables import MLFLOW_TRACKING_URI
from mlflow.exceptions import MlflowException
from mlflow.tracking.context.registry import resolve_tags
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME
from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_TAG_VAL_LENGTH

from tltrain import __version__, storage
from tltrain.core.checkpoint import META_FILE, CheckpointMeta, load_meta
from tltrain.reports import console
from tltrain.reports.classification import (
    classification_report,
    confusion_matrix_png,
    format_report,
    learning_curves_png,
)
from tltrain.spec.metrics import BEST_ACC, BEST_F1_MACRO, is_metric_value
from tltrain.spec.schema import DEFAULT_STORE_DIR, JobSpec
from tltrain.tracking.null import NullTracker, RunStatus

log = logging.getLogger(__name__)

DEFAULT_TRACKING_DB = f"{DEFAULT_STORE_DIR}/mlflow.db"

# Tags that describe where a model came from; registry copies them from a run onto model versions.
LINEAGE_TAG_KEYS = (
    "source_weights_uri", "source_weights_sha256", "dataset_sha256", "dataset_num_files",
    "dataset_num_classes", "dataset_class_names", "target_sha256", "target_num_files", "lora",
    "domain_adaptation", "tltrain_version", "git_commit", "trial", "ray_run",
)  # fmt: skip

# Spec sections that may carry secrets (e.g. a future runtime env for workers): never logged.
_SECRET_KEY = re.compile(r"^(env|env_vars|environment|runtime_env)$|password|secret|token|credential", re.I)
# scheme://user:password@host -> scheme://***@host
_URL_USERINFO = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*://)[^/@\s]+@")
# Credentials that boto3 / MLflow read from the environment. Reading them here is for masking only:
# if a user pasted one into a spec value, it still must not reach the tracking store.
_SECRET_ENV_VARS = (
    "AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN", "MLFLOW_TRACKING_PASSWORD",
    "MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_CLIENT_CERT_PATH", "DATABRICKS_TOKEN",
)  # fmt: skip
_MIN_SECRET_LEN = 6  # shorter values (e.g. "x") would mask ordinary text and protect nothing


@contextlib.contextmanager
def quiet_prints() -> Iterator[None]:
    """MLflow's fluent registry calls print notes straight to stderr ("Successfully registered
    model ...", "Created version ..."), past any logger. Unless the user asked for the libraries'
    output (`--library-logs`), they go to MLflow's logger (the library log file) instead:
    tltrain prints its own line for what happened."""
    if console.library_logs():
        yield
        return
    buffer = io.StringIO()
    try:
        with contextlib.redirect_stderr(buffer):
            yield
    finally:
        for line in buffer.getvalue().splitlines():
            if line.strip():
                logging.getLogger("mlflow").info("%s", redact(line))


def redact(text: str) -> str:
    """Mask URL user-info and the values of credential environment variables."""
    text = _URL_USERINFO.sub(r"\1***@", text)
    for var in _SECRET_ENV_VARS:
        value = os.environ.get(var)
        if value and len(value) >= _MIN_SECRET_LEN and value in text:
            text = text.replace(value, "***")
    return text


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def sanitize_spec(tree: Any) -> Any:
    """The spec tree without secret-bearing sections and with string values redacted."""
    if isinstance(tree, dict):
        return {k: sanitize_spec(v) for k, v in tree.items() if not _SECRET_KEY.search(str(k))}
    if isinstance(tree, list):
        return [sanitize_spec(v) for v in tree]
    if isinstance(tree, str):
        return redact(tree)
    return tree


def flatten_spec(tree: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """{"optim": {"lr": 3e-4}} -> {"optim.lr": "0.0003"}; values JSON-encoded (YAML-compatible, so
    they paste into `--set`), lists kept whole, clipped to MLflow's param value limit."""
    out: dict[str, str] = {}
    for key, value in sanitize_spec(tree).items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten_spec(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
            out[name] = _clip(text, MAX_PARAM_VAL_LENGTH)
    return out


def resolve_tracking_uri(uri: str | None = None) -> str:
    """spec.tracking.uri, else MLflow's own MLFLOW_TRACKING_URI, else sqlite under ~/.tltrain
    (MLflow 3.17's ./mlruns file store refuses writes, so never fall through to it)."""
    if uri:
        return _expand_sqlite(uri)
    if MLFLOW_TRACKING_URI.is_set():
        return _expand_sqlite(MLFLOW_TRACKING_URI.get())
    path = Path(DEFAULT_TRACKING_DB).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{path}"


def _expand_sqlite(uri: str) -> str:
    # SQLAlchemy does not expand "~"; users write sqlite:///~/x.db.
    if uri.startswith("sqlite:///~"):
        return "sqlite:///" + str(Path(uri[len("sqlite:///") :]).expanduser())
    return uri


def _sqlite_artifact_root(uri: str) -> str | None:
    """Artifact root next to a sqlite db: MLflow's default (./mlruns) would depend on the cwd."""
    if not uri.startswith("sqlite:///"):
        return None
    db = Path(uri[len("sqlite:///") :])
    return (db.parent / "mlartifacts").absolute().as_uri()


def get_or_create_experiment(client: MlflowClient, name: str, tracking_uri: str) -> str:
    exp = client.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    try:
        return client.create_experiment(name, artifact_location=_sqlite_artifact_root(tracking_uri))
    except MlflowException:
        # Another trial created it between our lookup and create.
        exp = client.get_experiment_by_name(name)
        if exp is None:
            raise
        return exp.experiment_id


def lineage_tags(
    source: CheckpointMeta | dict[str, Any],
    fingerprint: dict[str, Any] | None = None,
    *,
    trial: str | None = None,
    ray_run: str | None = None,
    git_commit: str | None = None,
    source_weights_uri: str | None = None,
    source_weights_sha256: str | None = None,
) -> dict[str, str]:
    """Lineage tags (keys in LINEAGE_TAG_KEYS) from a checkpoint's meta or a resolved spec dict,
    plus the dataset fingerprint ({class_names, num_files, sha256}, and the unlabelled target
    images' {num_files, sha256} under domain adaptation) from execution.preflight. The transfer
    strategies that change what the weights are (LoRA's settings, the domain-adaptation method)
    are tags too, so a registry reader sees them without parsing the spec."""
    tags: dict[str, Any] = {"tltrain_version": __version__}
    if isinstance(source, CheckpointMeta):
        tags["tltrain_version"] = source.tltrain_version or __version__
        tags["source_weights_uri"] = source.source_weights_uri
        tags["source_weights_sha256"] = source.source_weights_sha256
        fingerprint = fingerprint or source.dataset_fingerprint
        strategy = source.spec.get("strategy") or {}
    else:
        tags["source_weights_uri"] = source["model"]["weights"]
        strategy = source.get("strategy") or {}
    for key in ("lora", "domain_adaptation"):
        if strategy.get(key):
            tags[key] = json.dumps(strategy[key], sort_keys=True)
    if source_weights_uri:  # e.g. the resolved URI when the spec said "hub"
        tags["source_weights_uri"] = source_weights_uri
    if source_weights_sha256:
        tags["source_weights_sha256"] = source_weights_sha256
    if fingerprint:
        tags["dataset_sha256"] = fingerprint.get("sha256")
        tags["dataset_num_files"] = fingerprint.get("num_files")
        names = fingerprint.get("class_names") or []
        tags["dataset_num_classes"] = len(names)
        tags["dataset_class_names"] = json.dumps(names)
        target = fingerprint.get("target_unlabelled") or {}
        tags["target_sha256"] = target.get("sha256")
        tags["target_num_files"] = target.get("num_files")
    tags.update(trial=trial, ray_run=ray_run, git_commit=git_commit)
    return {k: _clip(redact(str(v)), MAX_TAG_VAL_LENGTH) for k, v in tags.items() if v is not None}


class Tracker(NullTracker):
    """One MLflow run. Per-epoch logging never raises (a flaky tracking server must not kill a
    long training); opening the run and logging the spec do, so misconfiguration shows up front."""

    def __init__(self, client: MlflowClient, run_id: str) -> None:
        self.client = client
        self._run_id = run_id
        self._ended = False

    @property
    def run_id(self) -> str:  # type: ignore[override]
        return self._run_id

    def log_spec(self, spec_dict: dict[str, Any]) -> None:
        params = flatten_spec(spec_dict)
        existing = self.client.get_run(self._run_id).data.params
        # A resumed run already holds its params, and MLflow refuses to change a param's value:
        # log only new keys, and record changed ones as a tag instead of failing the job.
        changed = sorted(k for k, v in params.items() if k in existing and existing[k] != v)
        todo = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(todo), 100):  # MLflow accepts at most 100 params per batch
            self.client.log_batch(self._run_id, params=todo[start : start + 100])
        if changed:
            log.warning(
                "resumed run %s: spec values changed for %s (kept the first values as params)", self._run_id, changed
            )
            self.set_tags({"spec_changed_on_resume": ",".join(changed)})
        self.client.log_text(self._run_id, yaml.safe_dump(sanitize_spec(spec_dict), sort_keys=False), "spec.yaml")

    def set_tags(self, tags: dict[str, Any]) -> None:
        items = [RunTag(k, _clip(redact(str(v)), MAX_TAG_VAL_LENGTH)) for k, v in tags.items() if v is not None]
        for start in range(0, len(items), 100):
            self.client.log_batch(self._run_id, tags=items[start : start + 100])

    def log_epoch(self, metrics: dict[str, Any], step: int) -> None:
        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step) for k, v in metrics.items() if is_metric_value(v)]
        try:
            for start in range(0, len(batch), 1000):
                self.client.log_batch(self._run_id, metrics=batch[start : start + 1000])
        except Exception as err:  # noqa: BLE001 - see the class docstring
            log.warning("MLflow: could not log metrics for step %d: %s", step, redact(str(err)))

    def log_final(self, checkpoint_dir: str | None, history: list[dict[str, Any]]) -> None:
        """Learning curves from the history, and from the best checkpoint's meta.json a per-class
        precision/recall/F1 report and the confusion matrix (text, JSON and PNG)."""
        try:
            with tempfile.TemporaryDirectory() as tmp:
                out = Path(tmp)
                if history:
                    learning_curves_png(history, out / "learning_curves.png")
                meta = _read_meta(checkpoint_dir, out) if checkpoint_dir else None
                if meta and meta.confusion_matrix and meta.class_names:
                    rep = classification_report(meta.confusion_matrix, meta.class_names)
                    (out / "classification_report.json").write_text(json.dumps(rep, indent=2))
                    (out / "classification_report.txt").write_text(format_report(rep))
                    confusion_matrix_png(meta.confusion_matrix, meta.class_names, out / "confusion_matrix.png")
                    best = {BEST_ACC: rep["accuracy"], BEST_F1_MACRO: rep["macro avg"]["f1"]}
                    self.log_epoch(best, step=meta.epoch)
                if checkpoint_dir:
                    self.set_tags({"best_checkpoint": checkpoint_dir})
                for f in sorted(out.iterdir()):
                    if f.name != META_FILE:
                        self.client.log_artifact(self._run_id, str(f), "report")
        except Exception as err:  # noqa: BLE001 - a failed plot must not fail a finished training
            log.warning("MLflow: could not log the final report: %s", redact(str(err)))

    def end(self, status: RunStatus = "FINISHED") -> None:
        if not self._ended:
            self.client.set_terminated(self._run_id, status)
            self._ended = True

    def __enter__(self) -> Tracker:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.end("FINISHED")
        else:
            self.end("KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED")


def _read_meta(checkpoint: str, tmp: Path) -> CheckpointMeta | None:
    """meta.json of a local checkpoint dir or one in object storage (only that file is fetched)."""
    if "://" in checkpoint:
        storage.download_file(f"{checkpoint.rstrip('/')}/{META_FILE}", str(tmp / META_FILE))
        return load_meta(tmp)
    path = Path(checkpoint).expanduser()
    return load_meta(path) if (path / META_FILE).is_file() else None


def _find_resumable(client: MlflowClient, experiment_id: str, run_name: str, parent_run_id: str | None) -> str | None:
    """A previous, unfinished run with the same name (and parent): re-running a job name resumes
    its Ray checkpoint, so it continues its MLflow run too."""
    quoted = run_name.replace("'", "\\'")
    runs = client.search_runs(
        [experiment_id],
        filter_string=f"tags.`{MLFLOW_RUN_NAME}` = '{quoted}'",
        order_by=["attributes.start_time DESC"],
        max_results=20,
    )
    for run in runs:
        if run.data.tags.get(MLFLOW_PARENT_RUN_ID) == parent_run_id and run.info.status != "FINISHED":
            return run.info.run_id
    return None


def open_tracker(
    spec: JobSpec,
    *,
    parent_run_id: str | None = None,
    run_name: str | None = None,
    tags: dict[str, Any] | None = None,
    resume: bool = True,
) -> NullTracker:
    """Start (or resume, see _find_resumable) the MLflow run for a job, a sweep or a trial.

    Sweep: `parent = open_tracker(spec, run_name=sweep_name)`, then per trial
    `open_tracker(trial_spec, parent_run_id=parent.run_id, run_name=trial_id)`.
    """
    if not spec.tracking.enabled:
        return NullTracker()
    uri = resolve_tracking_uri(spec.tracking.uri)
    client = MlflowClient(tracking_uri=uri)
    experiment_id = get_or_create_experiment(client, spec.tracking.experiment, uri)
    name = run_name or spec.name
    run_id = _find_resumable(client, experiment_id, name, parent_run_id) if resume else None
    all_tags = {**(tags or {})}
    if run_id is not None:
        client.update_run(run_id, status="RUNNING")
        log.info("MLflow: resuming run %s (%s)", name, run_id)
    else:
        base = resolve_tags({MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {})
        base = {k: _clip(redact(str(v)), MAX_TAG_VAL_LENGTH) for k, v in base.items()}
        run_id = client.create_run(experiment_id, run_name=name, tags=base).info.run_id
        log.info("MLflow: run %s (%s) in experiment %r at %s", name, run_id, spec.tracking.experiment, redact(uri))
    tracker = Tracker(client, run_id)
    all_tags.setdefault("tltrain_version", __version__)
    tracker.set_tags(all_tags)
    return tracker
