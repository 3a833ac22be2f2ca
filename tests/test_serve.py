"""Safe serving of a registered model: the pyfunc's inputs, its signature and input example, and
`tltrain serve` over real HTTP.

One tiny real checkpoint (tests/test_registry.py's `train_checkpoint`, real Fashion-MNIST images)
is registered once into a sqlite store in tmp. Unit tests load it in-process; the integration test
starts `tltrain serve` on 127.0.0.1 and compares what the endpoint answers with what the
in-process pyfunc says about the same files.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import time
import urllib.error
import urllib.request
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
from PIL import Image

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import mlflow  # noqa: E402
import mlflow.artifacts  # noqa: E402
import yaml  # noqa: E402
from mlflow.tracking._tracking_service.utils import _use_tracking_uri  # noqa: E402

from test_registry import train_checkpoint  # noqa: E402
from tltrain.core.checkpoint import load_meta  # noqa: E402
from tltrain.tracking import registry, serving  # noqa: E402

NAME = "fashion-serve"
SERVER_START_S = 180  # model download + load on a busy 2-core machine


@pytest.fixture(scope="module")
def registered(fashion_folders: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A tiny trained checkpoint registered as NAME@challenger, with every warning and every
    MLflow log record at WARNING or above that the registration produced."""
    train_dir, val_dir = fashion_folders
    root = tmp_path_factory.mktemp("serve")
    ckpt, _ = train_checkpoint(train_dir, val_dir, root / "checkpoint_000005", steps=60)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    records: list[logging.LogRecord] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Collect(logging.WARNING)
    mlflow_logger = logging.getLogger("mlflow")
    mlflow_logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")  # also what an earlier test in this process already saw
            info = registry.register_checkpoint(str(ckpt), NAME, tracking_uri=uri)
    finally:
        mlflow_logger.removeHandler(handler)
    # Held-out images: 2 per class as PNG files (as trained on) and the same pixels as JPEG files.
    classes = sorted(os.listdir(val_dir))
    pngs = [str(p) for c in classes for p in sorted((Path(val_dir) / c).glob("*.png"))[:2]]
    jpegs = []
    for i, png in enumerate(pngs):
        jpeg = root / "jpeg" / f"{i:02d}.jpg"
        jpeg.parent.mkdir(exist_ok=True)
        Image.open(png).convert("RGB").save(jpeg, format="JPEG", quality=90)
        jpegs.append(str(jpeg))
    return {"uri": uri, "info": info, "ckpt": ckpt, "warnings": caught, "records": records, "pngs": pngs,
            "jpegs": jpegs, "root": root}  # fmt: skip


def _load(registered: dict[str, Any], **config: Any) -> Any:
    with _use_tracking_uri(registered["uri"]):
        return mlflow.pyfunc.load_model(f"models:/{NAME}@challenger", model_config=config or None)


@pytest.fixture(scope="module")
def model(registered: dict[str, Any]) -> Any:
    return _load(registered)


@pytest.fixture(scope="module")
def truth(registered: dict[str, Any]) -> pd.DataFrame:
    """The in-process answer on the PNG and JPEG files, read as paths (the opt-in)."""
    return _load(registered, allow_local_paths=True).predict(registered["pngs"] + registered["jpegs"])


def _b64(path: str) -> str:
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def _data_uri(path: str) -> str:
    kind = "png" if path.endswith(".png") else "jpeg"
    return f"data:image/{kind};base64,{_b64(path)}"


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares width x height and holds no pixel data: what a decompression bomb's
    header looks like (its payload is irrelevant: the size must be refused before decoding)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


def _refusal(model: Any, items: Any) -> str:
    with pytest.raises(ValueError) as info:  # ImageInputError is a ValueError and an MlflowException
        model.predict(items)
    message = str(info.value)
    assert "\n" not in message, message
    return message


# --- the pyfunc's inputs (in-process) -----------------------------------------------------------


def test_paths_are_refused_by_default_and_read_with_allow_local_paths(
    registered: dict[str, Any], model: Any, truth: pd.DataFrame
) -> None:
    png = registered["pngs"][0]
    message = _refusal(model, [png])
    assert message.startswith("input 0: looks like a file path") and '"allow_local_paths": true' in message
    # The same answer for a file that does not exist and for relative or suffix-less names: a
    # caller learns nothing about what the server holds.
    assert _refusal(model, [png + ".missing.png"]) == message
    assert _refusal(model, [str(Path(*Path(png).parts[-2:]))]) == message  # e.g. "bag/0001.png"
    assert _refusal(model, ["/etc/hostname"]) == message
    # The opt-in reads the same files; a refused item among good ones is named by its index.
    allowed = _load(registered, allow_local_paths=True)
    assert list(allowed.predict([png])["label"]) == [truth["label"][0]]
    assert _refusal(model, [_b64(png), _b64(png), png]).startswith("input 2: looks like a file path")
    with pytest.raises(ValueError, match="model_config allow_local_paths: use true or false, got 'yes'"):
        _load(registered, allow_local_paths="yes")


def test_bytes_base64_data_uris_arrays_and_pil_images_give_the_paths_answer(
    registered: dict[str, Any], model: Any, truth: pd.DataFrame
) -> None:
    files = registered["pngs"] + registered["jpegs"]
    expected = list(truth["label"])
    assert len(set(expected)) >= 5  # a trained model, not one label for everything
    raw = [Path(f).read_bytes() for f in files]
    assert list(model.predict(raw)["label"]) == expected  # what the batch scorer feeds
    assert list(model.predict([_b64(f) for f in files])["label"]) == expected  # no data: prefix
    by_uri = model.predict([_data_uri(f) for f in files])
    assert list(by_uri["label"]) == expected
    np.testing.assert_allclose(by_uri["probability"], truth["probability"], rtol=1e-5)
    # Arrays (HxW grey from the PNGs, HxWx3 from the JPEGs) and PIL images: a Series, since MLflow's
    # column signature cannot turn a plain list of arrays into its DataFrame.
    arrays = [np.asarray(Image.open(f)) for f in files]
    assert arrays[0].ndim == 2 and arrays[-1].shape[2] == 3 and arrays[0].dtype == np.uint8
    assert list(model.predict(pd.Series(arrays))["label"]) == expected
    assert list(model.predict([Image.open(f) for f in files])["label"]) == expected
    assert list(model.predict(pd.DataFrame({"image": raw}))["label"]) == expected


def test_undecodable_items_get_one_line_errors_naming_the_item(registered: dict[str, Any], model: Any) -> None:
    good = Path(registered["pngs"][0]).read_bytes()
    cases = {
        "hello, not an image": "input 1: not base64 image data (19 characters)",
        base64.b64encode(b"\x00" * 64).decode(): "input 1: 64 bytes that are not an image PIL can decode",
        "data:text/plain;base64,aGVsbG8=": "input 1: a data URI must be data:image/<type>;base64,<data>",
        good[: len(good) // 2]: "input 1: corrupt or truncated PNG data",
    }
    for bad, expected in cases.items():
        message = _refusal(model, [good, bad])
        assert message.startswith(expected) and "send encoded image bytes" in message, message
    message = _refusal(model, pd.Series([good, np.zeros((4, 4), dtype=np.float32)]))
    assert message.startswith("input 1: an array must be uint8 HxW or HxWxC"), message


def test_decompression_bombs_are_refused_before_decoding(registered: dict[str, Any], model: Any) -> None:
    # Over tltrain's cap (64 Mpx), under PIL's own limit: tltrain's check, on the header alone.
    message = _refusal(model, [_png_header(9000, 9000)])
    assert message.startswith("input 0: image is 9000x9000, more than 64,000,000 pixels (model_config max_pixels)")
    # Past PIL's own decompression-bomb limit, PIL refuses in Image.open: also one line.
    assert _refusal(model, [_png_header(20000, 20000)]).startswith("input 0: image has more pixels than PIL decodes")
    # The cap is the loading process's to set: 28 x 28 = 784 pixels is over a cap of 700.
    capped = _load(registered, max_pixels=700)
    assert _refusal(capped, [Path(registered["pngs"][0]).read_bytes()]).startswith(
        "input 0: image is 28x28, more than 700 pixels"
    )


# --- what registration logs ---------------------------------------------------------------------


def test_registration_emits_no_mlflow_warnings(registered: dict[str, Any]) -> None:
    user_warnings = [f"{w.category.__name__}: {w.message}" for w in registered["warnings"]
                     if issubclass(w.category, (UserWarning, FutureWarning))]  # fmt: skip
    assert user_warnings == []  # "Add type hints to the `predict` method", "An input example was not provided"
    # MLflow also checks at logging that the model answers its serving example, and logs a
    # warning when it does not: none here.
    assert [f"{r.name}: {r.getMessage()[:200]}" for r in registered["records"]] == []
    assert registered["info"].created


def test_logged_model_has_signature_input_example_and_metadata(registered: dict[str, Any], tmp_path: Path) -> None:
    with _use_tracking_uri(registered["uri"]):
        model_dir = Path(
            mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{NAME}@challenger", dst_path=str(tmp_path))
        )
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    meta = load_meta(registered["ckpt"])
    assert json.loads(mlmodel["signature"]["inputs"]) == [{"type": "string", "required": True}]
    outputs = [c["name"] for c in json.loads(mlmodel["signature"]["outputs"])]
    assert outputs == ["label", "probability"] + [f"prob_{c}" for c in meta.class_names]
    serving_example = json.loads((model_dir / "serving_input_example.json").read_text())
    (uri,) = serving_example["inputs"]
    assert uri.startswith("data:image/png;base64,")
    assert Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1]))).format == "PNG"
    assert mlmodel["metadata"]["class_names"] == meta.class_names
    assert mlmodel["metadata"]["data_config"] == meta.data_config
    assert {"input_size", "mean", "std", "crop_pct", "interpolation"} <= set(mlmodel["metadata"]["data_config"])
    config = mlmodel["flavors"]["python_function"]["config"]
    assert config["allow_local_paths"] is False  # logged, so a loading process may turn it on


# --- tltrain serve: what it refuses before starting ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_serve_plan_pins_the_version_and_refuses_unsafe_or_impossible_starts(registered: dict[str, Any]) -> None:
    uri = registered["uri"]
    environ = {"PATH": "/usr/bin", "HOME": str(registered["root"])}
    plan = serving.plan_serve(f"{NAME}@challenger", port=_free_port(), tracking_uri=uri, environ=environ)
    assert plan.version == registered["info"].version
    assert plan.argv[plan.argv.index("-m", 3) + 1] == f"models:/{NAME}/{plan.version}"  # not the moving alias
    assert plan.argv[plan.argv.index("--env-manager") + 1] == "local"
    assert plan.env["MLFLOW_TRACKING_URI"] == uri
    assert plan.env["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)  # uvicorn is found
    with pytest.raises(serving.ServeError, match=rf"^{NAME}@nope: not found at .*tltrain registry list"):
        serving.plan_serve(f"{NAME}@nope", tracking_uri=uri, environ=environ)
    unsafe = {**environ, "SERVING_MODEL_CONFIG": '{"allow_local_paths": true}'}
    with pytest.raises(serving.ServeError, match="SERVING_MODEL_CONFIG turns allow_local_paths on"):
        serving.plan_serve(f"{NAME}@challenger", tracking_uri=uri, environ=unsafe)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        with pytest.raises(serving.ServeError, match=rf"^--port {port}: cannot listen on 127.0.0.1"):
            serving.plan_serve(f"{NAME}@challenger", port=port, tracking_uri=uri, environ=environ)


# --- tltrain serve over HTTP --------------------------------------------------------------------


def _post(url: str, body: bytes) -> tuple[int, str]:
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def _stop(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server's whole process group (tltrain, mlflow, uvicorn) by the group's pid."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=serving.STOP_WAIT_S + 5)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    try:
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still left
    except ProcessLookupError:
        pass


@pytest.fixture(scope="module")
def server(registered: dict[str, Any]) -> Iterator[dict[str, Any]]:
    port = _free_port()
    log_path = registered["root"] / "serve.log"
    cmd = [str(Path(sys.executable).parent / "tltrain"), "serve", f"{NAME}@challenger", "--port", str(port),
           "--host", "127.0.0.1", "--tracking-uri", registered["uri"]]  # fmt: skip
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True,
                                cwd=registered["root"])  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_S
        while f"serving {NAME} version" not in log_path.read_text():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"tltrain serve did not come up ({proc.poll()}):\n{log_path.read_text()[-3000:]}")
            time.sleep(0.5)
        assert serving.pings(url)
        yield {"url": url, "log": log_path, "proc": proc}
    finally:
        _stop(proc)


def _one_line_error(status: int, body: str) -> str:
    assert 400 <= status < 500, (status, body[:500])
    assert "Traceback" not in body and 'File "' not in body and "stack_trace" not in body, body[:2000]
    payload = json.loads(body)
    assert "predictions" not in payload
    message = str(payload["message"])
    assert "\n" not in message, message
    return message


@pytest.mark.integration
def test_tltrain_serve_answers_like_the_in_process_pyfunc(
    server: dict[str, Any], registered: dict[str, Any], truth: pd.DataFrame
) -> None:
    out = server["log"].read_text()
    assert out.count(f"{server['url']}/invocations -H 'Content-Type: application/json'") == 1  # the curl, once
    invocations = f"{server['url']}/invocations"
    pngs, jpegs = registered["pngs"], registered["jpegs"]
    inputs = [_data_uri(p) for p in pngs] + [_b64(j) for j in jpegs]  # data URIs, and bare base64
    status, body = _post(invocations, json.dumps({"inputs": inputs}).encode())
    assert status == 200, body[:2000]
    rows = json.loads(body)["predictions"]
    assert [r["label"] for r in rows] == list(truth["label"])
    np.testing.assert_allclose([r["probability"] for r in rows], truth["probability"], rtol=1e-5)
    # The curl example the server printed, run as printed on one of the PNG files.
    if shutil.which("curl") and shutil.which("base64"):
        example = serving.curl_example(server["url"]).replace("IMAGE.png", pngs[0])
        res = subprocess.run(["bash", "-c", example], capture_output=True, text=True, timeout=60)
        assert json.loads(res.stdout)["predictions"][0]["label"] == truth["label"][0], res.stdout[:500]


@pytest.mark.integration
def test_tltrain_serve_refuses_server_paths_and_garbage_in_one_line(
    server: dict[str, Any], registered: dict[str, Any]
) -> None:
    invocations = f"{server['url']}/invocations"
    existing = registered["pngs"][0]  # a real image on the server's disk
    message = _one_line_error(*_post(invocations, json.dumps({"inputs": [existing]}).encode()))
    assert message.startswith("input 0: looks like a file path; this model reads no files"), message
    missing = _one_line_error(*_post(invocations, json.dumps({"inputs": [existing + ".nope.png"]}).encode()))
    assert missing == message  # no telling which server files exist
    good = _data_uri(existing)
    message = _one_line_error(*_post(invocations, json.dumps({"inputs": [good, "garbage!"]}).encode()))
    assert message.startswith("input 1: not base64 image data"), message
    junk = base64.b64encode(bytes(range(256))).decode()
    message = _one_line_error(*_post(invocations, json.dumps({"inputs": [junk]}).encode()))
    assert message.startswith("input 0: 256 bytes that are not an image"), message
    # A body that is not JSON never reaches the model: MLflow's parser refuses it, with a 400 and
    # no stack trace (its message goes on to echo the body on further lines).
    status, body = _post(invocations, os.urandom(64) + b"not json")
    assert status == 400 and "Traceback" not in body and "stack_trace" not in body, body[:500]
    assert json.loads(body)["message"].startswith("Invalid input. Ensure that input is a valid JSON")
    assert server["proc"].poll() is None  # still serving
