"""registry.py + pyfunc_model.py + cli_registry.py.

Unit tests use a sqlite store and a local checkpoint. The integration test runs the real thing:
a moto S3 server, an `mlflow server` with its artifacts in that bucket, a sweep-shaped set of
runs, registration of a checkpoint trained here on real Fashion-MNIST images, alias promotion,
and a downstream process without tltrain that loads the model and classifies held-out images.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")  # no usage pings from tests

from mlflow import MlflowClient  # noqa: E402

from tltrain import storage
from tltrain.core.checkpoint import CheckpointError, checkpoint_sha256
from tltrain.spec.load import parse_spec
from tltrain.tracking import registry
from tltrain.tracking import tracker as tracking

REPO = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 28  # Fashion-MNIST's own size keeps CPU training quick


# --- a real checkpoint: a tiny timm model trained briefly on real images -----------------------


def _samples(root: str, classes: list[str]) -> list[tuple[str, int]]:
    return [(str(f), i) for i, c in enumerate(classes) for f in sorted((Path(root) / c).glob("*.png"))]


def train_checkpoint(
    train_dir: str, val_dir: str, out_dir: Path, steps: int = 100, seed: int = 0
) -> tuple[Path, float]:
    """Train test_resnet for `steps` AdamW steps and save it in the checkpoint directory format."""
    import timm
    import torch

    from tltrain.core.checkpoint import CheckpointMeta, save_checkpoint
    from tltrain.data.decode import load_rgb
    from tltrain.data.loaders import build_transform, resolve_data_config

    classes = sorted(p.name for p in Path(train_dir).iterdir() if p.is_dir())
    torch.manual_seed(seed)
    model = timm.create_model("test_resnet", num_classes=len(classes), pretrained=False)
    data_config = resolve_data_config(model, IMAGE_SIZE)
    tf = build_transform(data_config, train=False)
    train, val = _samples(train_dir, classes), _samples(val_dir, classes)
    x = torch.stack([tf(load_rgb(p)) for p, _ in train])
    y = torch.tensor([c for _, c in train])
    xv = torch.stack([tf(load_rgb(p)) for p, _ in val])
    yv = torch.tensor([c for _, c in val])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(x), (32,), generator=gen)
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    with torch.no_grad():
        pred = model(xv).argmax(1)
    confusion = [[int(((yv == t) & (pred == p)).sum()) for p in range(len(classes))] for t in range(len(classes))]
    acc = float((pred == yv).float().mean())
    spec = parse_spec(
        {
            "name": "fashion-tiny",
            "model": {"name": "test_resnet"},
            "data": {"train": train_dir, "val": val_dir, "image_size": IMAGE_SIZE},
            "tracking": {"experiment": "fashion-e2e", "registry_name": "fashion-tiny"},
        }
    ).to_dict()
    meta = {
        "epoch": 5,
        "global_step": steps,
        "metrics": {"val/acc": acc},
        "spec": spec,
        "class_names": classes,
        "model_name": "test_resnet",
        "data_config": data_config,
        "source_weights_uri": None,
        "source_weights_sha256": None,
        "confusion_matrix": confusion,
        "tltrain_version": "0.1.0",
    }
    save_checkpoint(out_dir, model.state_dict(), {"optimizer": opt.state_dict()}, CheckpointMeta.from_dict(meta))
    return out_dir, acc


@pytest.fixture(scope="module")
def trained(fashion_folders: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, float]:
    train_dir, val_dir = fashion_folders
    return train_checkpoint(train_dir, val_dir, tmp_path_factory.mktemp("ckpt") / "checkpoint_000005")


# --- unit tests (sqlite store, local checkpoint) ---------------------------------------------


def test_parse_ref_and_model_uri() -> None:
    assert registry.parse_ref("fashion") == ("fashion", None, None)
    assert registry.parse_ref("fashion@champion") == ("fashion", "champion", None)
    assert registry.parse_ref("models:/fashion/3") == ("fashion", None, "3")
    assert registry.model_uri("fashion@champion") == "models:/fashion@champion"
    assert registry.model_uri("runs:/abc/model") == "runs:/abc/model"


@pytest.mark.parametrize("name", ["torchvision:resnet18", "torchvision:mobilenet_v3_small", "test_efficientnet"])
def test_pyfunc_builds_the_same_architecture_as_model_py(name: str) -> None:
    from tltrain.core.model import build_model
    from tltrain.spec.schema import ModelSpec
    from tltrain.tracking import pyfunc_model

    ours = build_model(ModelSpec(name=name, drop_rate=0.2), num_classes=7)
    theirs = pyfunc_model.build_network(name, 7)
    assert {k: tuple(v.shape) for k, v in ours.state_dict().items()} == {
        k: tuple(v.shape) for k, v in theirs.state_dict().items()
    }


def test_pyfunc_decodes_images_like_training() -> None:
    import numpy as np
    from PIL import Image

    from tltrain import data
    from tltrain.tracking import pyfunc_model

    rng = np.random.default_rng(0)
    rgba = Image.fromarray(rng.integers(0, 256, (9, 7, 4), dtype=np.uint8), "RGBA")
    images = [
        rgba,
        rgba.convert("LA"),
        rgba.convert("L"),
        rgba.convert("CMYK"),
        rgba.convert("RGB").convert("P"),
        Image.fromarray(rng.integers(0, 65536, (9, 7), dtype=np.uint16)),  # I;16
        Image.fromarray(rng.integers(0, 256, (9, 7)).astype(np.int32)),  # I, 8-bit range
        Image.fromarray(rng.random((9, 7)).astype(np.float32)),  # F
    ]
    for im in images:
        ours = np.asarray(pyfunc_model.to_rgb(im.copy()))
        assert np.array_equal(ours, np.asarray(data.to_rgb(im.copy()))), im.mode
        assert ours.shape == (9, 7, 3)


def test_register_is_idempotent_and_rejects_corrupt_checkpoints(trained: tuple[Path, float], tmp_path: Path) -> None:
    import shutil

    ckpt, _ = trained
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    first = registry.register_checkpoint(str(ckpt), "fashion-local", tracking_uri=uri)
    again = registry.register_checkpoint(str(ckpt), "fashion-local", tracking_uri=uri)
    assert (first.version, first.created) == ("1", True)
    assert (again.version, again.created) == ("1", False)
    client = MlflowClient(uri)
    assert len(client.search_model_versions("name = 'fashion-local'")) == 1
    assert str(client.get_model_version_by_alias("fashion-local", "challenger").version) == "1"
    # The logged model lives in the checkpoint spec's experiment, not MLflow's Default one.
    mv = client.get_model_version("fashion-local", "1")
    assert client.get_experiment(client.get_run(mv.run_id).info.experiment_id).name == "fashion-e2e"

    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    with open(broken / "model.safetensors", "r+b") as f:
        f.seek(-1, 2)
        f.write(b"\x00" if f.read(1) != b"\x00" else b"\x01")
    # (Under "fashion-local" the same manifest would just find version 1, whose files are intact.)
    with pytest.raises(CheckpointError, match="corrupt"):
        registry.register_checkpoint(str(broken), "fashion-broken", tracking_uri=uri)
    (broken / "MANIFEST.json").unlink()
    with pytest.raises(CheckpointError, match="incomplete"):
        registry.register_checkpoint(str(broken), "fashion-broken", tracking_uri=uri)
    assert client.search_model_versions("name = 'fashion-broken'") == []


# --- integration: S3 (moto) + mlflow server + downstream process -------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SECRETS = {
    "AWS_ACCESS_KEY_ID": f"AKIDTLTRAIN{uuid.uuid4().hex[:12].upper()}",
    "AWS_SECRET_ACCESS_KEY": f"sEcReT-aws-{uuid.uuid4().hex}",
    "MLFLOW_TRACKING_USERNAME": "tltrain-user",
    "MLFLOW_TRACKING_PASSWORD": f"pAsS-mlflow-{uuid.uuid4().hex}",
}


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def secret_env(s3_server: str) -> Iterator[dict[str, str]]:
    """Distinctive fake credentials (moto accepts any) so a leak is findable by grep."""
    with pytest.MonkeyPatch.context() as mp:
        for k, v in SECRETS.items():
            mp.setenv(k, v)
        yield SECRETS


@pytest.fixture(scope="module")
def mlflow_server(
    secret_env: dict[str, str], s3_server: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Any]]:
    bucket = f"s3://tltrain-mlflow-{uuid.uuid4().hex[:8]}"
    storage.ensure_bucket(bucket)
    root = tmp_path_factory.mktemp("mlflow-server")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    log_path = root / "server.log"
    env = {**os.environ, "MLFLOW_S3_ENDPOINT_URL": s3_server}
    cmd = [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", f"{bucket}/mlflow",
           "--serve-artifacts", "--workers", "1"]  # fmt: skip
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, env=env, cwd=root)
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited ({proc.returncode}):\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not answer /health:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        yield {"url": url, "bucket": bucket, "db": root / "mlflow.db", "log": log_path}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _run(cmd: list[str], env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess[str]:
    res = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, f"{cmd[:3]} failed:\n{res.stdout[-3000:]}\n{res.stderr[-3000:]}"
    return res


DOWNSTREAM = """
import json, sys
import mlflow
# The images are this process's own files: it opts in to reading paths (a served model never does).
model = mlflow.pyfunc.load_model(sys.argv[1], model_config={"allow_local_paths": True})
paths = json.loads(sys.argv[2])
out = model.predict(paths)
probs = [c for c in out.columns if c.startswith("prob_")]
assert abs(out[probs].sum(axis=1) - 1).max() < 1e-4
assert "tltrain" not in sys.modules and not any(m.startswith("tltrain.") for m in sys.modules)
print(json.dumps({"labels": list(out["label"])}))
"""


@pytest.fixture(scope="module")
def flow(mlflow_server: dict[str, Any], trained: tuple[Path, float], fashion_folders: tuple[str, str],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:  # fmt: skip
    """The whole driver-side story once: sweep runs, registration (twice), promotion, downstream
    load. Tests below assert on what it produced."""
    url, bucket = mlflow_server["url"], mlflow_server["bucket"]
    work = tmp_path_factory.mktemp("flow")
    # Everything at INFO (what `tltrain -v` shows), and our and MLflow's loggers at DEBUG. Not
    # botocore's DEBUG: its opt-in wire dump prints signed request headers, access key id included.
    collect = _Collect()
    root_logger = logging.getLogger()
    old_levels = {name: logging.getLogger(name).level for name in ("", "tltrain", "mlflow")}
    root_logger.addHandler(collect)
    root_logger.setLevel(logging.INFO)
    logging.getLogger("tltrain").setLevel(logging.DEBUG)
    logging.getLogger("mlflow").setLevel(logging.DEBUG)
    out: dict[str, Any] = {"url": url, "bucket": bucket, "logs": collect.lines, "outputs": []}
    try:
        ckpt, acc = trained
        ckpt_uri = f"{bucket}/ckpts/fashion-tiny/checkpoint_000005"
        storage.upload_tree(str(ckpt), ckpt_uri)
        out["checkpoint_uri"], out["train_acc"] = ckpt_uri, acc

        train_dir, val_dir = fashion_folders
        spec = parse_spec(
            {
                "name": "fashion-sweep",
                "model": {"name": "test_resnet"},
                "data": {"train": train_dir, "val": val_dir, "image_size": IMAGE_SIZE},
                "storage": {"uri": f"{bucket}/ckpts"},
                "tracking": {"uri": url, "experiment": "fashion-e2e", "registry_name": "fashion-tiny"},
            }
        )
        fingerprint = {"class_names": sorted(os.listdir(train_dir)), "num_files": 400, "sha256": "f0" * 32}
        parent = tracking.open_tracker(spec, run_name="fashion-sweep")
        parent.log_spec(spec.to_dict())
        parent.set_tags(tracking.lineage_tags(spec.to_dict(), fingerprint, ray_run="fashion-sweep"))
        children = []
        for i, lr in enumerate((1e-4, 3e-3, 1e-2)):
            trial_spec = spec.model_copy(update={"optim": spec.optim.model_copy(update={"lr": lr})})
            with tracking.open_tracker(trial_spec, parent_run_id=parent.run_id, run_name=f"trial_{i:05d}") as child:
                child.log_spec(trial_spec.to_dict())
                child.set_tags(
                    tracking.lineage_tags(
                        trial_spec.to_dict(), fingerprint, trial=f"trial_{i:05d}", ray_run="fashion-sweep"
                    )
                )
                history = []
                for epoch in range(1, 4):
                    m = {
                        "train/loss": 2.0 / (epoch + i),
                        "val/acc": 0.2 * epoch + 0.05 * i,
                        "lr/group_0": lr,
                        "img_per_s": 500.0,
                    }
                    child.log_epoch(m, step=epoch)
                    history.append({"epoch": epoch, **m})
                # trial 1 "won": its checkpoint is the trained one (meta.json read from S3)
                child.log_final(ckpt_uri if i == 1 else None, history)
                children.append(child.run_id)
        parent.end()
        out["parent"], out["children"] = parent.run_id, children

        # Register the best trial's checkpoint, twice; then a second checkpoint to move aliases.
        out["first"] = registry.register_checkpoint(ckpt_uri, "fashion-tiny", tracking_uri=url, run_id=children[1])
        out["again"] = registry.register_checkpoint(ckpt_uri, "fashion-tiny", tracking_uri=url, run_id=children[1])
        from tltrain.core.checkpoint import load_meta, load_model_state, save_checkpoint

        local2 = save_checkpoint(
            work / "checkpoint_000006", load_model_state(ckpt), None, dataclasses.replace(load_meta(ckpt), epoch=6)
        )
        ckpt2_uri = f"{bucket}/ckpts/fashion-tiny/checkpoint_000006"
        storage.upload_tree(str(local2), ckpt2_uri)
        out["second"] = registry.register_checkpoint(
            ckpt2_uri, "fashion-tiny", tracking_uri=url, tags={"trial": "trial_00002"}
        )
        out["promote1"] = registry.promote("fashion-tiny", out["first"].version, "champion", tracking_uri=url)
        out["champion_before"] = str(MlflowClient(url).get_model_version_by_alias("fashion-tiny", "champion").version)
        out["promote2"] = registry.promote("fashion-tiny", out["second"].version, "champion", tracking_uri=url)
        out["promote3"] = registry.promote("fashion-tiny", out["first"].version, "champion", tracking_uri=url)

        # Downstream: a clean process with only mlflow/torch/timm, no tltrain, no S3 credentials.
        classes = sorted(os.listdir(val_dir))
        val = _samples(val_dir, classes)
        out["val_paths"], out["val_truth"] = [p for p, _ in val], [classes[c] for _, c in val]
        clean_env = {
            k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "MLFLOW_TRACKING_", "PYTHONPATH"))
        }
        clean_env |= {"MLFLOW_TRACKING_URI": url, "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"}
        res = _run(
            [sys.executable, "-c", DOWNSTREAM, "models:/fashion-tiny@champion", json.dumps(out["val_paths"])],
            clean_env,
            work,
        )
        out["downstream"] = json.loads(res.stdout.strip().splitlines()[-1])
        out["outputs"].append(res.stdout + res.stderr)

        # The CLI, as a user runs it (standalone module; the lead wires it into `tltrain`).
        cli_env = {**os.environ, "PYTHONPATH": str(REPO)}
        res = _run([sys.executable, "-m", "tltrain.commands.registry", "predict", "fashion-tiny@champion", *out["val_paths"],
                    "--tracking-uri", url, "--json"], cli_env, work)  # fmt: skip
        out["cli_predict"] = json.loads(res.stdout.strip().splitlines()[-1])
        out["outputs"].append(res.stdout + res.stderr)
        res = _run([sys.executable, "-m", "tltrain.commands.registry", "registry", "show", "fashion-tiny@champion", "--tracking-uri", url],
                   cli_env, work)  # fmt: skip
        out["cli_show"] = res.stdout
        out["outputs"].append(res.stdout + res.stderr)
        out["pulled"] = registry.pull("fashion-tiny@champion", str(work / "pulled"), tracking_uri=url)
        import mlflow.artifacts
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        with _use_tracking_uri(url):  # models:/ resolves through the registry URI, i.e. this one
            out["model_dir"] = Path(
                mlflow.artifacts.download_artifacts(artifact_uri="models:/fashion-tiny/1", dst_path=str(work / "model"))
            )
        yield out
    finally:
        root_logger.removeHandler(collect)
        for name, level in old_levels.items():
            logging.getLogger(name).setLevel(level)


@pytest.mark.integration
def test_sweep_runs_are_nested_with_per_epoch_metrics(flow: dict[str, Any]) -> None:
    client = MlflowClient(flow["url"])
    parent = client.get_run(flow["parent"])
    assert parent.info.run_name == "fashion-sweep" and parent.info.status == "FINISHED"
    assert parent.data.tags["dataset_sha256"] == "f0" * 32
    children = client.search_runs([parent.info.experiment_id], f"tags.`mlflow.parentRunId` = '{flow['parent']}'")
    assert sorted(r.info.run_name for r in children) == ["trial_00000", "trial_00001", "trial_00002"]
    for run in children:
        assert [m.step for m in client.get_metric_history(run.info.run_id, "val/acc")] == [1, 2, 3]
        assert run.info.status == "FINISHED"
    best = client.get_run(flow["children"][1])
    assert best.data.params["optim.lr"] == "0.003"
    assert best.data.tags["best_checkpoint"] == flow["checkpoint_uri"]
    report = {a.path for a in client.list_artifacts(best.info.run_id, "report")}
    assert {"report/confusion_matrix.png", "report/learning_curves.png", "report/classification_report.json"} <= report
    # Artifacts went through the server's proxy into the bucket.
    bucket, _ = storage.split_s3(flow["bucket"])
    keys = storage.list_files(f"{flow['bucket']}/mlflow")
    assert any(k.endswith("report/confusion_matrix.png") for k in keys), (bucket, keys[:20])


@pytest.mark.integration
def test_registered_version_carries_lineage_and_dedupes(flow: dict[str, Any], trained: tuple[Path, float]) -> None:
    first, again, second = flow["first"], flow["again"], flow["second"]
    assert first.created and not again.created and first.version == again.version == "1"
    assert second.created and second.version == "2"
    client = MlflowClient(flow["url"])
    assert len(client.search_model_versions("name = 'fashion-tiny'")) == 2
    mv = client.get_model_version("fashion-tiny", "1")
    tags = mv.tags
    assert tags["checkpoint_uri"] == flow["checkpoint_uri"]
    assert storage.exists(f"{tags['checkpoint_uri']}/MANIFEST.json")
    assert tags["checkpoint_sha256"] == checkpoint_sha256(trained[0])
    assert tags["trial"] == "trial_00001" and tags["ray_run"] == "fashion-sweep"
    assert tags["dataset_sha256"] == "f0" * 32
    assert json.loads(tags["metrics"])["val/acc"] == pytest.approx(trained[1])
    assert mv.run_id == flow["children"][1]
    assert client.get_model_version("fashion-tiny", "2").tags["trial"] == "trial_00002"
    shown = registry.show("fashion-tiny/1", tracking_uri=flow["url"])
    assert shown["dataset"]["sha256"] == "f0" * 32 and shown["spec"]["name"] == "fashion-tiny"
    assert shown["aliases"] == ["champion"] and shown["checkpoint_uri"] == flow["checkpoint_uri"]
    assert flow["checkpoint_uri"] in flow["cli_show"] and "trial_00001" in flow["cli_show"]
    assert (flow["pulled"] / "model.safetensors").is_file()
    models = {m["name"]: m for m in registry.list_models(tracking_uri=flow["url"])}
    assert models["fashion-tiny"]["num_versions"] == 2


@pytest.mark.integration
def test_promote_moves_the_alias(flow: dict[str, Any]) -> None:
    assert flow["promote1"] is None
    assert flow["champion_before"] == "1"
    assert flow["promote2"] == "1" and flow["promote3"] == "2"
    client = MlflowClient(flow["url"])
    assert str(client.get_model_version_by_alias("fashion-tiny", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("fashion-tiny", "challenger").version) == "2"


@pytest.mark.integration
def test_downstream_load_predicts_held_out_images(flow: dict[str, Any]) -> None:
    labels = flow["downstream"]["labels"]
    truth = flow["val_truth"]
    acc = sum(a == b for a, b in zip(labels, truth)) / len(truth)
    assert acc > 0.5, acc  # 10 classes: chance is 0.1
    assert acc == pytest.approx(flow["train_acc"], abs=0.02)  # same preprocessing as training
    assert [p["label"] for p in flow["cli_predict"]["predictions"]] == labels


@pytest.mark.integration
def test_model_package_needs_no_pickle(flow: dict[str, Any]) -> None:
    import yaml

    model_dir = flow["model_dir"]
    files = {p.relative_to(model_dir).as_posix() for p in model_dir.rglob("*") if p.is_file()}
    assert not any(f.endswith((".pkl", ".pickle", ".pt", ".pth", ".bin")) for f in files), files
    assert "artifacts/model.safetensors" in files and "artifacts/meta.json" in files
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert "python_model" not in pyfunc  # no cloudpickled PythonModel instance
    assert (model_dir / Path(pyfunc["model_code_path"]).name).read_text().count("import tltrain") == 0
    assert mlmodel["metadata"]["class_names"][0] == "ankle-boot"


def _bucket_bytes(bucket_uri: str) -> list[tuple[str, bytes]]:
    bucket, _ = storage.split_s3(bucket_uri)
    client = storage.s3_client()
    out = []
    for key in storage.list_files(bucket_uri):
        out.append((key, client.get_object(Bucket=bucket, Key=key)["Body"].read()))
    return out


@pytest.mark.integration
def test_no_credential_value_reaches_mlflow(flow: dict[str, Any], mlflow_server: dict[str, Any]) -> None:
    secrets = [v for k, v in SECRETS.items() if k != "MLFLOW_TRACKING_USERNAME"]
    haystacks: list[tuple[str, bytes]] = [("sqlite db", Path(mlflow_server["db"]).read_bytes())]
    haystacks += [(f"s3 {k}", b) for k, b in _bucket_bytes(flow["bucket"])]
    haystacks.append(("server log", Path(mlflow_server["log"]).read_bytes()))
    haystacks.append(("client logs", "\n".join(flow["logs"]).encode()))
    haystacks += [(f"subprocess output {i}", o.encode()) for i, o in enumerate(flow["outputs"])]
    haystacks += [(f"model file {p.name}", p.read_bytes()) for p in flow["model_dir"].rglob("*") if p.is_file()]
    assert len(haystacks) > 10
    assert any("registered fashion-tiny version" in line for line in flow["logs"])  # the logs were captured
    for where, data in haystacks:
        for secret in secrets:
            assert secret.encode() not in data, f"a credential value leaked into {where}"
