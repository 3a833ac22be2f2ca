"""What reaches the terminal: tltrain's own lines, not Ray's and MLflow's internals.

Users read tltrain's plan, progress, summaries and the warnings it means. Ray (its driver logger,
its actors' output forwarded to the driver) and MLflow (database migrations, registration notes,
artifact progress bars, UserWarnings) write lines a user cannot act on, so by default they go to
a log file under ~/.tltrain/logs whose path is printed once, the first time there is something in
it. `tltrain --library-logs` brings them back to the terminal. `-v` keeps its one meaning: tltrain's
own loggers at INFO.

This module sets up Python logging and the environment only (logger names and env vars); the
libraries' own switches are flipped in their layers: `execution.trainer.ensure_ray` (Ray's
`configure_logging`, its forwarder of worker output) and `tracking/` (MLflow's console prints).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from tltrain import WORKER_LOG_ENV
from tltrain.spec.schema import DEFAULT_STORE_DIR

LOG_DIR = f"{DEFAULT_STORE_DIR}/logs"
FLAG = "--library-logs"
# Library loggers whose own console handlers are replaced by propagation to ours.
_LIBRARY_LOGGERS = ("ray", "mlflow", "alembic", "huey", "sqlalchemy", "py.warnings", "urllib3", "botocore")
_ENV_QUIET = {
    "MLFLOW_CONFIGURE_LOGGING": "false",  # MLflow's loggers propagate to ours instead of printing
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",  # "Downloading artifacts" tqdm bars
}
FORMAT = "%(levelname)s %(name)s: %(message)s"
# In the Ray processes of a job whose driver keeps library output off the terminal, tltrain's log
# lines start with this mark: the driver forwards those lines and no others (execution/trainer).
WORKER_MARK = "[tltrain]"


class _State:
    # A process that never called `setup` (a notebook, a test calling run_train) keeps the
    # libraries' own behaviour.
    library_logs = True
    log_file: Path | None = None
    announced = False
    native_captured = False
    extras: set[str] = set()  # noqa: RUF012 - one process-wide state
    env_set: list[str] = []  # noqa: RUF012 - the variables `setup` added, which `reset` removes


_state = _State()


def library_logs() -> bool:
    """True when the user asked for Ray's and MLflow's output on the terminal (`--library-logs`)."""
    return _state.library_logs


def adopt(name: str) -> None:
    """Send a library logger's records through ours (the terminal filter and the log file)
    instead of the stderr handler it installs for itself (Ray does at `import ray`)."""
    lib = logging.getLogger(name)
    lib.handlers = []
    lib.propagate = True


def announce(extra: str = "") -> None:
    """Print once per process where the library output is; `extra` (e.g. Ray's worker log dir)
    once more if it comes after the first announcement."""
    if _state.library_logs or _state.log_file is None:
        return
    if _state.announced:
        if extra and extra not in _state.extras:
            _state.extras.add(extra)
            print(f"library logs: {extra}", file=sys.stderr, flush=True)
        return
    _state.announced = True
    if extra:
        _state.extras.add(extra)
    where = f"{_state.log_file}{f'; {extra}' if extra else ''}"
    print(f"library logs (Ray, MLflow): {where}  ({FLAG} shows them here)", file=sys.stderr, flush=True)


def capture_native_stderr() -> None:
    """Ray's C++ core worker in this process writes its ERROR lines straight to file descriptor 2,
    past Python (e.g. "core_worker.cc: Actor ... has constructor arguments in the object store"
    whenever Ray Data starts an actor pool), and so do the processes Ray starts from here. Point
    fd 2 at the library log and keep Python's sys.stderr (tltrain's lines, tracebacks) on the
    terminal through a copy of the original descriptor. Only for a CLI process whose sys.stderr
    is still the real fd 2 (never under a test runner's capture)."""
    if _state.library_logs or _state.log_file is None or _state.native_captured:
        return
    original: Any = sys.stderr
    real: Any = sys.__stderr__
    try:
        if original is None or original is not real or original.fileno() != 2:
            return
    except (AttributeError, ValueError, OSError):
        return
    original.flush()
    _state.log_file.parent.mkdir(parents=True, exist_ok=True)
    encoding = getattr(original, "encoding", None) or "utf-8"
    terminal = os.fdopen(os.dup(2), "w", buffering=1, encoding=encoding, errors="backslashreplace")
    target = os.open(_state.log_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(target, 2)
    os.close(target)
    sys.stderr = terminal
    for handler in logging.getLogger().handlers:  # the console handler holds the old object
        if getattr(handler, "_tltrain", False) and isinstance(handler, logging.StreamHandler) \
                and not isinstance(handler, logging.FileHandler):  # fmt: skip
            handler.setStream(terminal)
    _state.native_captured = True
    announce()


class _OwnLines(logging.Filter):
    """The terminal's filter: tltrain's records only, unless the user asked for the libraries'."""

    def filter(self, record: logging.LogRecord) -> bool:
        return _state.library_logs or record.name == "tltrain" or record.name.startswith("tltrain.")


class _LazyFile(logging.FileHandler):
    """The library log file, created (and its path announced) at the first record written to it."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, delay=True, encoding="utf-8")
        self.setFormatter(logging.Formatter("%(asctime)s " + FORMAT))

    def emit(self, record: logging.LogRecord) -> None:
        if self.stream is None:  # first record: the file appears now
            Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
            announce()
        super().emit(record)


def reset() -> None:
    """Back to the libraries' own behaviour for the rest of this process: `tltrain.cli.main`
    called in-process (a test, a notebook) must not leave later Ray sessions quiet."""
    _state.library_logs = True
    _state.log_file = None
    _state.announced = False
    _state.extras = set()
    for key in _state.env_set:  # later subprocesses (and imports) see the user's environment again
        os.environ.pop(key, None)
    _state.env_set = []


def setup(*, verbose: bool, library_logs: bool, command: str = "tltrain") -> None:
    """Configure the root logger for one CLI invocation (idempotent: tests call main() often).

    Terminal: tltrain's loggers at WARNING (INFO with -v); with `library_logs` every logger at that
    level, as before this module. File (unless `library_logs`): every logger at INFO."""
    _state.library_logs = library_logs
    if not library_logs:
        for key, value in _ENV_QUIET.items():
            if key not in os.environ:  # a user's own setting wins
                _state.env_set.append(key)
                os.environ[key] = value
    root = logging.getLogger()
    for handler in [h for h in root.handlers if getattr(h, "_tltrain", False)]:
        root.removeHandler(handler)
        handler.close()
    console = logging.StreamHandler(sys.stderr)
    console.setLevel(logging.INFO if verbose else logging.WARNING)
    console.setFormatter(logging.Formatter(FORMAT))
    console.addFilter(_OwnLines())
    handlers: list[logging.Handler] = [console]
    _state.log_file = None
    if not library_logs:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        _state.log_file = Path(LOG_DIR).expanduser() / f"{command}-{stamp}-{os.getpid()}.log"
        file_handler = _LazyFile(_state.log_file)
        file_handler.setLevel(logging.INFO)
        handlers.append(file_handler)
    for handler in handlers:
        handler._tltrain = True  # type: ignore[attr-defined]
        root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("tltrain").setLevel(logging.INFO if verbose else logging.WARNING)
    if library_logs:
        return  # the libraries print as they configure themselves
    # Libraries that installed their own stderr handlers (MLflow at import, Ray at ray.init) send
    # their records through ours instead; warnings.warn goes through logging too.
    for name in _LIBRARY_LOGGERS:
        adopt(name)
        if name in ("sqlalchemy", "botocore", "urllib3"):  # their INFO is per-query/per-request
            logging.getLogger(name).setLevel(logging.WARNING)
    logging.captureWarnings(True)


def mark_worker_logs() -> None:
    """In a Ray worker or actor of such a job (tltrain/__init__ calls this when WORKER_LOG_ENV is set):
    tltrain's records go to this process's stderr, which Ray forwards, with WORKER_MARK in front."""
    own = logging.getLogger("tltrain")
    if any(getattr(h, "_tltrain_mark", False) for h in own.handlers):
        return
    try:
        level = int(os.environ.get(WORKER_LOG_ENV) or logging.WARNING)
    except ValueError:
        level = logging.WARNING
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"{WORKER_MARK} {FORMAT}"))
    handler.setLevel(level)
    handler._tltrain_mark = True  # type: ignore[attr-defined]
    own.addHandler(handler)
    own.setLevel(level)
    own.propagate = False  # one line per record (not again through Python's last-resort handler)
