"""What a user sees on the terminal: live progress inside an epoch, and tltrain's lines without
Ray's and MLflow's internal noise (issue 16).

Unit tests feed core.live's messages to reports.progress; the two integration tests run
`tltrain train` as a user would, with RAY_AUTH_MODE unset (as users have it) and a fresh MLflow
store: once on a pseudo-terminal with default flags, once into a file with `--library-logs`.
"""

from __future__ import annotations

import io
import os
import pty
import re
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tltrain.core.live import LiveSteps
from tltrain.reports.progress import Progress
from tltrain.reports.sweep import standing
from tltrain.spec.load import parse_spec
from tltrain.spec.metrics import ALIGN_LOSS, IMG_PER_S, TRAIN_LOSS, VAL_ACC, VAL_LOSS

# The lines a plain run printed before this issue (its text lists them), and where each came from.
NOISE = {
    "Token authentication is enabled": "Ray's token-auth warning",
    "PreemptionWatcher": "Ray internals' actor error",
    "(TrainController": "Ray Train controller's forwarded output",
    "UserWarning": "MLflow's warnings at registration",
    "Downloading artifacts": "MLflow's progress bars",
    "Creating initial MLflow database tables": "MLflow's database-creation INFO",
    "Successfully registered model": "MLflow's registration print",
}


def _spec(tmp: Path, epochs: int = 2) -> Any:
    return parse_spec(
        {
            "name": "p",
            "model": {"name": "test_resnet"},
            "data": {"train": str(tmp), "val": str(tmp)},
            "loop": {"epochs": epochs},
            "tracking": {"enabled": False},
        }  # fmt: skip
    )


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def _messages(steps: int, epoch: int = 1, epochs: int = 2, interval_s: float = 1e9) -> list[dict[str, Any]]:
    """What rank 0 sends over one epoch of `steps` steps (never by time with the default interval)."""
    sent: list[dict[str, Any]] = []
    live = LiveSteps(sent.append, world_size=2, interval_s=interval_s)
    live.start_epoch(epoch, epochs, steps)
    for step in range(1, steps + 1):
        live.step(step, images=8 * step, loss_sum=torch.tensor(2.0 * 8 * step), data_wait_s=0.0)
    return sent


def _epoch_metrics(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, TRAIN_LOSS: 1.0, VAL_LOSS: 1.0, VAL_ACC: 0.5, "best_metric": 0.5, IMG_PER_S: 10.0}


def test_rank0_sends_a_message_at_every_tenth_and_reads_the_loss_only_then(tmp_path: Path) -> None:
    sent = _messages(steps=95)
    # Tenths 1..9 (the last step is left to the epoch line); none in between with no time passing.
    assert [m["step"] for m in sent] == [10, 19, 29, 38, 48, 57, 67, 76, 86]
    assert all(m["loss"] == pytest.approx(2.0) for m in sent)
    assert sent[0][IMG_PER_S] > 0 and sent[0]["steps"] == 95
    # With a short interval a terminal also gets the steps in between.
    assert len(_messages(steps=20, interval_s=0.0)) == 19


def test_a_log_file_gets_a_plain_line_every_tenth_of_an_epoch(tmp_path: Path) -> None:
    out = io.StringIO()
    progress = Progress(_spec(tmp_path), out)
    for message in _messages(steps=50, interval_s=0.0):  # every step arrives; a file shows tenths
        progress.step(message)
    lines = out.getvalue().splitlines()
    assert len(lines) == 9, lines
    assert "\r" not in out.getvalue()
    assert lines[0].strip().startswith("epoch 1/2  step 5/50 (10%)")
    assert re.search(r"img/s  loss 2\.0000  data-wait 0%  ETA epoch \d+m\d\ds, run \d+m\d\ds$", lines[0])


def test_a_domain_adaptation_epoch_line_shows_the_alignment_loss_and_source_accuracy(tmp_path: Path) -> None:
    out = io.StringIO()
    Progress(_spec(tmp_path), out).line(_epoch_metrics(1) | {ALIGN_LOSS: 0.25, "val_source/acc": 0.75})
    line = out.getvalue()
    assert "train/loss 1.0000  train/align_loss 0.2500  val/loss" in line
    assert "val/acc 0.5000 (best 0.5000)  val_source/acc 0.7500  10 img/s" in line
    plain = io.StringIO()
    Progress(_spec(tmp_path), plain).line(_epoch_metrics(1))
    assert "align" not in plain.getvalue() and "val_source" not in plain.getvalue()


def test_a_terminal_gets_one_line_refreshed_in_place(tmp_path: Path) -> None:
    out = _Tty()
    progress = Progress(_spec(tmp_path), out)
    for message in _messages(steps=20, interval_s=0.0):
        progress.step(message)
    text = out.getvalue()
    assert "\n" not in text and text.count("\r") == 19  # 19 refreshes of one line
    progress.line(_epoch_metrics(1))
    # The epoch line clears the step line and ends with a newline.
    assert out.getvalue()[len(text) :].startswith("\r\x1b[K") and out.getvalue().endswith("\n")


def test_steps_of_the_next_epoch_wait_for_the_previous_epochs_line(tmp_path: Path) -> None:
    out = io.StringIO()
    progress = Progress(_spec(tmp_path), out)
    for message in _messages(steps=10, epoch=1) + _messages(steps=10, epoch=2):
        progress.step(message)  # epoch 1's report is late, as Ray Train's controller can deliver it
    progress.line(_epoch_metrics(1))
    order = [line.split()[0] + line.split()[1] for line in out.getvalue().splitlines()]
    assert order == ["epoch1/2"] * 9 + ["epoch1/2"] + ["epoch2/2"] * 9
    assert TRAIN_LOSS in out.getvalue().splitlines()[9]


# --- integration: `tltrain train` as a user runs it ---------------------------------------------


def _write_job(tmp_path: Path, fashion_folders: tuple[str, str], name: str) -> Path:
    train_dir, val_dir = fashion_folders
    spec = {
        "name": name,
        "model": {"name": "test_resnet"},
        # 30 steps an epoch (240 train images, batch 8): tenths are whole steps.
        "data": {"train": train_dir, "val": val_dir, "image_size": 28, "loader_workers": 0, "augment": "none",
                 "test_fraction": 0.2},
        "loop": {"epochs": 1, "precision": "fp32", "seed": 0},
        "scaling": {"num_workers": 1, "batch_size_per_worker": 8, "address": "local"},
        "storage": {"uri": str(tmp_path / "runs")},
        # A fresh store: MLflow creates its tables (one of the noisy lines) and registers version 1.
        "tracking": {"enabled": True, "uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "registry_name": name},
    }  # fmt: skip
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


def _user_env(tmp_path: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_AUTH_MODE", "RAY_ADDRESS")}
    # Library logs land under HOME/.tltrain/logs: one per test, so the test can read its own.
    return {**env, "HOME": str(tmp_path / "home"), "HF_HUB_OFFLINE": "1"}


def _tltrain_on_pty(args: list[str], env: dict[str, str], cwd: Path) -> tuple[int, str]:
    """Run the CLI with stdout and stderr on a pseudo-terminal, as in a user's shell."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "tltrain.cli", *args], stdin=subprocess.DEVNULL,
                            stdout=follower, stderr=follower, env=env, cwd=cwd)  # fmt: skip
    os.close(follower)
    chunks: list[bytes] = []

    def read() -> None:
        while True:
            try:
                data = os.read(leader, 65536)
            except OSError:  # EIO: the child closed the terminal
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        code = proc.wait(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        reader.join(timeout=10)
        os.close(leader)
    return code, b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.integration
def test_a_plain_run_shows_tltrains_lines_and_live_progress_only(
    tmp_path: Path, fashion_folders: tuple[str, str]
) -> None:
    job = _write_job(tmp_path, fashion_folders, "quiet-run")
    code, text = _tltrain_on_pty(["train", str(job)], _user_env(tmp_path), tmp_path)
    assert code == 0, text[-3000:]
    found = {what: line for line in text.splitlines() for marker, what in NOISE.items() if marker in line}
    assert not found, f"library noise on the terminal: {found}"
    assert "done: quiet-run" in text and "held-out test (60 images)" in text  # tltrain's own lines stay
    # The step line is refreshed in place: one terminal line holds several updates.
    rows = text.split("\r\n")  # the pty turns each newline into \r\n
    refreshed = [row for row in rows if row.count("step ") >= 2 and "\r  epoch 1/1  step" in row]
    assert refreshed, text[-3000:]
    # Where the libraries' output went is said once, and the file holds it.
    said = [line for line in rows if line.startswith("library logs (Ray, MLflow): ")]
    assert len(said) == 1, rows
    log_file = Path(said[0].split(": ", 1)[1].split()[0].rstrip(";"))
    assert log_file.is_file() and "Creating initial MLflow database tables" in log_file.read_text()


@pytest.mark.integration
def test_library_logs_flag_brings_the_output_back_and_a_file_gets_plain_tenths(
    tmp_path: Path, fashion_folders: tuple[str, str]
) -> None:
    job = _write_job(tmp_path, fashion_folders, "loud-run")
    res = subprocess.run([sys.executable, "-m", "tltrain.cli", "--library-logs", "train", str(job)],
                         env=_user_env(tmp_path), cwd=tmp_path, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    both = res.stdout + res.stderr
    back = [what for marker, what in NOISE.items() if marker in both]
    for expected in ("Ray's token-auth warning", "Ray Train controller's forwarded output",
                     "MLflow's database-creation INFO", "MLflow's registration print"):  # fmt: skip
        assert expected in back, f"{expected} did not come back with --library-logs:\n{both[-3000:]}"
    assert "library logs (Ray, MLflow)" not in both
    # Output to a file: a plain line at each tenth of the (30-step) epoch, no in-place refresh.
    steps = [line for line in res.stdout.splitlines() if line.startswith("  epoch 1/1  step ")]
    assert [int(line.split()[3].split("/")[0]) for line in steps] == [3, 6, 9, 12, 15, 18, 21, 24, 27], steps
    assert "\r" not in res.stdout


def test_a_sweep_says_where_it_stands_after_each_trial(tmp_path: Path) -> None:
    spec = parse_spec(
        {
            "name": "s",
            "model": {"name": "test_resnet"},
            "data": {"train": str(tmp_path), "val": str(tmp_path)},
            "tracking": {"enabled": False},
            "tune": {"num_samples": 6, "space": {"optim.lr": {"loguniform": [1e-4, 1e-2]}}},
        }  # fmt: skip
    )
    records = [
        {"trial_id": "a", "status": "TERMINATED", "best_metric": 0.61, "stopped_by": None},
        {"trial_id": "b", "status": "TERMINATED", "best_metric": 0.72, "stopped_by": "asha"},
        {"trial_id": "c", "status": "ERROR", "best_metric": None, "stopped_by": None},
    ]
    line = standing(records, running=2, spec=spec)
    assert line == "sweep: 2 running, 2 done (1 stopped early), 1 failed of 6; best val/acc 0.7200 (b)"
    assert standing([], running=1, spec=spec).endswith("no best yet")


def test_an_in_process_cli_call_leaves_the_environment_and_logging_as_it_found_them(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from tltrain.cli import main
    from tltrain.reports import console

    for key in ("MLFLOW_CONFIGURE_LOGGING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(key, raising=False)
    assert main(["spec-fields"]) == 0
    capsys.readouterr()
    # A later subprocess run with --library-logs must see MLflow configure its own logging again.
    assert "MLFLOW_CONFIGURE_LOGGING" not in os.environ and "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ
    assert console.library_logs()  # later in-process Ray sessions keep Ray's own forwarding
