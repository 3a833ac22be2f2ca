"""Ray Train on the driver: the TorchTrainer around a worker function, fit, the best checkpoint.

One builder (`build_trainer`) and one report forwarder serve `train`, each Tune trial and `bench`.
Progress goes driver-side through a Train `UserCallback` (it runs in the controller actor) into a
Ray queue that the driver thread drains, so progress lines and MLflow calls happen in the user's
process, not inside an actor.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer
from ray.train.v2.api.callback import UserCallback
from ray.util.queue import Empty, Queue
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from tltrain import WORKER_LOG_ENV, storage
from tltrain.core.checkpoint import MANIFEST_FILE, META_FILE, CheckpointMeta
from tltrain.core.live import STEP
from tltrain.core.plan import TrainPlan
from tltrain.execution.packing import for_fake_gpus
from tltrain.execution.worker import PROGRESS_QUEUE, checkpoint_uri, worker_fn
from tltrain.reports import console
from tltrain.spec.metrics import ranked
from tltrain.spec.packing import worker_gpus
from tltrain.spec.schema import JobSpec

log = logging.getLogger(__name__)

OnReport = Callable[[dict[str, Any], "str | None"], None]
OnStep = Callable[[dict[str, Any]], None]
REPORT = "report"  # queue message kinds: an epoch's report here, rank 0's steps (core.live.STEP)


class ForwardReports(UserCallback):
    """Runs in the Train controller: forwards rank 0's metrics (+ checkpoint path) to the driver."""

    def __init__(self, queue: Queue) -> None:
        self.queue = queue

    def after_report(self, run_context: Any, metrics: list[dict[str, Any]], checkpoint: Any) -> None:
        path = checkpoint.path if checkpoint is not None else None
        self.queue.put({"kind": REPORT, "metrics": metrics[0], "path": path})


@dataclass
class FitResult:
    best_checkpoint_uri: str | None
    best_metrics: dict[str, Any] | None
    latest_metrics: dict[str, Any] | None
    error: BaseException | None


def ensure_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to Ray (address None: RAY_ADDRESS or a cluster started on this machine with `ray
    start`, else a new local Ray; Ray's own resolution), pinned to that one cluster.

    Ray Train's PlacementGroupCleaner (an actor) and other State API callers find "their" cluster
    by scanning the machine when no address is in their environment; with a second Ray instance
    on it (a colleague's job, a notebook's `ray.init()`) they fail with "Found multiple active Ray
    instances", and every placement group of a trial that Tune stopped then stays reserved, so
    later trials never start. So the job's runtime env names the cluster for every actor and
    task: RAY_ADDRESS when we attach to a known address, or, for a local Ray we start, the State
    API server (the dashboard) on a port chosen here."""
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {}
    target = address or os.environ.get("RAY_ADDRESS") or None
    if target is None and Path(tempfile.gettempdir(), "ray", "ray_current_cluster").is_file():
        target = "auto"  # Ray will attach to the `ray start` cluster it recorded there
    inside_ray_job = "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ  # the job's own runtime env applies
    if target in (None, "local"):
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        kwargs.update(include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
                      runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": url}})  # fmt: skip
    elif target != "auto" and not target.startswith("ray://") and not inside_ray_job:
        kwargs["runtime_env"] = {"env_vars": {"RAY_ADDRESS": target}}
    # Ray's own lines (its driver logger; every actor's output, which Ray forwards to the driver)
    # go to the library log unless the user asked for them (`--library-logs`). tltrain's lines in
    # those processes carry console.WORKER_MARK (the job's env asks for it), and only they are
    # forwarded. Inside a Ray Job the job's own runtime env applies: its log shows everything.
    quiet = not console.library_logs()
    if quiet:
        console.adopt("ray")  # `import ray` gave it its own stderr handler
        console.capture_native_stderr()  # its C++ core worker writes to fd 2 directly
        if not inside_ray_job:
            env_vars = kwargs.setdefault("runtime_env", {}).setdefault("env_vars", {})
            env_vars[WORKER_LOG_ENV] = str(logging.getLogger("tltrain").getEffectiveLevel())
    ray.init(address=address, num_cpus=num_cpus, logging_level=logging.WARNING, configure_logging=not quiet,
             log_to_driver=True, **kwargs)  # fmt: skip
    if quiet and not inside_ray_job:
        _forward_only_tltrain_lines()
        console.announce(f"Ray's worker logs: {_ray_logs_dir()}")


def _forward_only_tltrain_lines() -> None:
    """Ray prints every worker's and actor's output on the driver through one named handler of
    its stream dispatcher (no public hook filters it): replaced by one that prints the lines
    tltrain wrote (console.WORKER_MARK) as Ray would, prefix and all, and sends the rest (Ray
    Train's controller chatter, core-worker errors about its internal actors) to the library log.
    Same name as Ray's, so `ray.shutdown` removes it."""
    try:
        from ray._private import worker as ray_worker

        dispatcher = ray_worker.global_worker_stdstream_dispatcher
        print_lines = ray_worker.print_to_stdstream
    except (ImportError, AttributeError):  # a Ray without them: its forwarding stays as it is
        return
    library = logging.getLogger("ray.workers")

    def forward(data: dict[str, Any]) -> None:
        lines = list(data.get("lines") or [])
        kept = [line for line in lines if console.WORKER_MARK in line]
        for line in lines:
            if console.WORKER_MARK not in line:
                library.info(
                    "(%s pid=%s) %s", data.get("actor_name") or data.get("task_name") or "", data.get("pid"), line
                )
        if kept:
            print_lines({**data, "lines": kept}, ignore_prefix=False)

    dispatcher.remove_handler("ray_print_logs")
    dispatcher.add_handler("ray_print_logs", forward)


def _ray_logs_dir() -> str:
    try:  # no public API names the session directory; the head node's default is the fallback
        node: Any = ray._private.worker._global_node
        return str(node.get_logs_dir_path())
    except Exception:  # noqa: BLE001
        return f"{tempfile.gettempdir()}/ray/session_latest/logs (on the head node)"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ray_job_id() -> str:
    """This driver's Ray job id ("" before Ray is up): what a lease names as its owner's job."""
    return ray.get_runtime_context().get_job_id() if ray.is_initialized() else ""


def keep_working_dir() -> None:
    """Ray Train and Tune move workers and trial processes into a per-run directory unless this is
    off; relative data, weights and storage paths in a spec must resolve against the job's working
    directory, as on the driver. Set before a trainer or Tuner starts: Tune hands it on to trials."""
    os.environ["RAY_CHDIR_TO_TRIAL_DIR"] = "0"


def build_trainer(
    spec: JobSpec,
    plan: TrainPlan | None,
    callbacks: list[Any],
    name: str | None = None,
    *,
    worker: Callable[[dict[str, Any]], None] = worker_fn,
    extra_config: dict[str, Any] | None = None,
) -> TorchTrainer:
    """The TorchTrainer of a spec: its workers, resources, storage, checkpoint ranking and failure
    policy. `worker` gets {"spec", "plan", **extra_config} (bench passes its own workers)."""
    # The retrying wrapper: Ray's controller writes its run snapshot right after each checkpoint,
    # and a storage outage at that moment would otherwise fail the run with a ControllerError.
    filesystem, storage_path = storage.pyarrow_filesystem(spec.storage.uri, retry_s=storage.OUTAGE_RETRY_S)
    if not storage.is_s3(spec.storage.uri):
        Path(storage_path).mkdir(parents=True, exist_ok=True)
    keep_working_dir()
    resources = {"CPU": spec.scaling.cpus_per_worker}
    if spec.scaling.use_gpu:  # a share below 1 packs 1-worker runs onto one GPU (spec/packing.py)
        resources["GPU"] = worker_gpus(spec.scaling.use_gpu, spec.scaling.gpus_per_worker)
    worker, torch_config = for_fake_gpus(spec, worker)  # TLTRAIN_FAKE_GPUS=1 only: CPU + gloo
    return TorchTrainer(
        worker,
        torch_config=torch_config,
        train_loop_config={"spec": spec.to_dict(), "plan": plan.to_dict() if plan else None, **(extra_config or {})},
        scaling_config=ScalingConfig(
            num_workers=spec.scaling.num_workers,
            use_gpu=spec.scaling.use_gpu,
            resources_per_worker=resources,
            placement_strategy=spec.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name or spec.name,
            storage_path=storage_path,
            storage_filesystem=filesystem,
            checkpoint_config=CheckpointConfig(
                num_to_keep=spec.storage.keep,
                checkpoint_score_attribute=spec.storage.metric,
                checkpoint_score_order=spec.storage.mode,
            ),
            failure_config=FailureConfig(max_failures=spec.storage.max_failures),
            callbacks=callbacks,
        ),
    )


def fit(
    spec: JobSpec,
    plan: TrainPlan | None,
    on_report: OnReport,
    *,
    name: str | None = None,
    worker: Callable[[dict[str, Any]], None] = worker_fn,
    extra_config: dict[str, Any] | None = None,
    on_step: OnStep | None = None,
) -> FitResult:
    """Run the training job; `on_report(metrics, checkpoint_uri)` is called on the driver for every
    report of rank 0 (once per epoch for worker_fn), `on_step(message)` for rank 0's in-epoch
    progress (core.live)."""
    ensure_ray(spec.scaling.address)
    # On the driver's node, as Ray Train pins its controller: a queue actor left to the scheduler
    # can land on a worker node, and losing that node would then end the run (seen in the
    # node-loss test) although Ray Train itself survives it.
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    queue: Queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    channel = {PROGRESS_QUEUE: queue if on_step is not None else None}
    trainer = build_trainer(spec, plan, [ForwardReports(queue)], name, worker=worker,
                            extra_config={**channel, **(extra_config or {})})  # fmt: skip

    def drain(block_s: float) -> None:
        try:
            message = queue.get(timeout=block_s) if block_s else queue.get_nowait()
        except Empty:
            return
        kind = message.get("kind")
        if kind == REPORT:
            path = message["path"]
            on_report(message["metrics"], checkpoint_uri(spec.storage.uri, path) if path else None)
        elif kind == STEP and on_step is not None:
            on_step(message)

    with concurrent.futures.ThreadPoolExecutor(max_workers=1) as pool:
        future = pool.submit(trainer.fit)
        while not future.done():
            drain(0.5)
        while not queue.empty():
            drain(0)
        try:
            result = future.result()
            error = result.error
        except Exception as err:  # TrainingFailedError: reported with the partial result below
            result, error = None, err
    queue.shutdown()
    if result is None:
        return FitResult(None, None, None, error)
    best_uri, best_metrics = best_checkpoint(result, spec.storage.uri, spec.storage.metric, spec.storage.mode)
    return FitResult(
        best_checkpoint_uri=best_uri,
        best_metrics=best_metrics,
        latest_metrics=result.metrics,
        error=error,
    )


def _invalid_checkpoints(storage_uri: str, latest: Any) -> set[str]:
    """URIs that a restore of this run found corrupt or incomplete (recorded in the latest meta)."""
    if latest is None:
        return set()
    with tempfile.TemporaryDirectory(prefix="tltrain-meta-") as directory:
        local = f"{directory}/{META_FILE}"
        try:
            storage.download_file(f"{checkpoint_uri(storage_uri, latest.path)}/{META_FILE}", local)
            return set(CheckpointMeta.from_json(Path(local).read_text()).invalid_checkpoints)
        except Exception as err:  # a missing meta must not fail a finished run; just skip the filter
            log.warning("could not read %s of the latest checkpoint: %s", META_FILE, err)
            return set()


def best_checkpoint(result: Any, storage_uri: str, metric: str, mode: str) -> tuple[str | None, dict[str, Any] | None]:
    """(URI, metrics) of a Train run's best checkpoint by `metric` that is still complete in storage
    (`keep` may have deleted it) and that no restore rejected as corrupt (Ray still ranks those: it
    cannot know that a file changed after the upload). Used by `train` and by each Tune trial."""
    if not result.best_checkpoints:
        return None, None
    invalid = _invalid_checkpoints(storage_uri, result.checkpoint)
    for ckpt, metrics in ranked(result.best_checkpoints, lambda cm: cm[1].get(metric), mode):
        uri = checkpoint_uri(storage_uri, ckpt.path)
        if uri not in invalid and storage.exists(f"{uri}/{MANIFEST_FILE}"):
            return uri, metrics
    return None, None
