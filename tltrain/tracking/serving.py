"""`tltrain serve`: one registered model version behind MLflow's own scoring server.

The server is `mlflow models serve --env-manager local`, unchanged; what this module adds is the
environment it needs, which a user otherwise gets wrong:
- the version resolved first, the way every registry command resolves NAME@ALIAS (tracking URI
  from `resolve_tracking_uri`), so a bad reference fails in one line before anything starts and
  the server runs exactly the version printed, even if the alias moves while it loads;
- MLFLOW_TRACKING_URI / MLFLOW_REGISTRY_URI for the child set to that URI, and this interpreter's
  bin directory first on PATH (MLflow starts `uvicorn` by name through bash);
- no start when the environment would let the served pyfunc open files its callers name
  (SERVING_MODEL_CONFIG / MLFLOW_PYFUNC_INFERENCE_CONFIG with allow_local_paths), or when the
  port is taken.
What the endpoint accepts and refuses is the pyfunc's business (tracking/pyfunc_model.py).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tltrain.tracking.registry import _client, model_uri, resolve_version
from tltrain.tracking.tracker import redact, resolve_tracking_uri

# Environment variables through which MLflow hands a model_config to a served model.
_CONFIG_VARS = ("SERVING_MODEL_CONFIG", "MLFLOW_PYFUNC_INFERENCE_CONFIG")
STOP_WAIT_S = 15  # how long a stopped server gets to finish before it is killed


class ServeError(ValueError):
    """A reason not to start, in one line naming the argument or variable to change."""


@dataclass(frozen=True)
class ServePlan:
    ref: str  # as the user wrote it
    name: str
    version: str
    url: str  # http://host:port
    argv: list[str]
    env: dict[str, str]


def _check_config_vars(environ: dict[str, str]) -> None:
    for var in _CONFIG_VARS:
        if not environ.get(var):
            continue
        try:
            config = json.loads(environ[var])
        except json.JSONDecodeError as err:
            raise ServeError(f"{var} is not JSON ({err.msg}): fix or unset it") from None
        if isinstance(config, dict) and config.get("allow_local_paths"):
            raise ServeError(
                f"{var} turns allow_local_paths on: a served model must not open files its callers "
                f"name; unset it (local paths are for in-process load_model only)"
            )


def _check_port_free(host: str, port: int) -> None:
    # A clear line now instead of uvicorn's traceback after the model has loaded.
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        try:
            s.bind((host, port))
        except OSError as err:
            raise ServeError(f"--port {port}: cannot listen on {host} ({err.strerror}); pick another --port") from None


def plan_serve(
    ref: str,
    *,
    host: str = "127.0.0.1",
    port: int = 5000,
    workers: int = 1,
    tracking_uri: str | None = None,
    environ: dict[str, str] | None = None,
) -> ServePlan:
    """Resolve `ref` (NAME@ALIAS | NAME/VERSION | NAME) and build the `mlflow models serve`
    command and environment; ServeError for anything that would stop it from serving."""
    from mlflow.exceptions import MlflowException

    env = dict(os.environ if environ is None else environ)
    _check_config_vars(env)
    if workers < 1:
        raise ServeError(f"--workers {workers}: use 1 or more")
    uri = resolve_tracking_uri(tracking_uri)
    if not model_uri(ref).startswith("models:/"):
        raise ServeError(f"{ref}: tltrain serve takes a registered model, NAME@ALIAS | NAME/VERSION | NAME")
    try:
        mv = resolve_version(_client(uri)[0], ref)
    except (MlflowException, LookupError) as err:
        first = str(getattr(err, "message", err)).splitlines()[0]
        raise ServeError(f"{ref}: not found at {redact(uri)} ({first}); see `tltrain registry list`") from None
    _check_port_free(host, port)

    bin_dir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bin_dir, env.get("PATH", "")]) if env.get("PATH") else bin_dir
    if shutil.which("uvicorn", path=env["PATH"]) is None:
        raise ServeError(f"uvicorn is not installed next to {sys.executable}: pip install uvicorn")
    env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = uri
    argv = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{mv.name}/{mv.version}",
            "--env-manager", "local", "--host", host, "--port", str(port), "--workers", str(workers)]  # fmt: skip
    url_host = f"[{host}]" if ":" in host else host
    return ServePlan(ref, mv.name, str(mv.version), f"http://{url_host}:{port}", argv, env)


def curl_example(url: str) -> str:
    """The request a user can paste: one image file, base64-encoded into a data URI."""
    return (
        f"curl -s {url}/invocations -H 'Content-Type: application/json' \\\n"
        '  -d "{\\"inputs\\": [\\"data:image/png;base64,$(base64 -w0 IMAGE.png)\\"]}"'
    )


def pings(url: str, timeout_s: float = 2.0) -> bool:
    """True when the scoring server answers /ping (it does once the model has loaded)."""
    try:
        with urllib.request.urlopen(f"{url}/ping", timeout=timeout_s) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False


def _exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode  # killed by signal N -> 128 + N


def run(plan: ServePlan, on_ready: Callable[[], None], poll_s: float = 0.5) -> int:
    """Run the server in the foreground until it exits; `on_ready` once /ping answers. A SIGTERM
    to this process stops the server too (MLflow's own process ties uvicorn's life to its own)."""
    proc = subprocess.Popen(plan.argv, env=plan.env)

    def stop(signum: int, frame: object) -> None:
        proc.terminate()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        while proc.poll() is None:
            if pings(plan.url):
                on_ready()
                break
            time.sleep(poll_s)
        return _exit_code(proc.wait())
    except KeyboardInterrupt:  # Ctrl-C reached the server too (same process group): let it finish
        try:
            proc.wait(timeout=STOP_WAIT_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()
