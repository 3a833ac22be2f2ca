"""`tltrain predict MODEL_URI SOURCE... [--out FILE]`: batch scoring with Ray Data (issue 16).

A tiny real checkpoint (test_resnet on Fashion-MNIST, tests/test_registry.py's train_checkpoint) is
registered in a sqlite store. The integration tests share one local Ray (module fixture) and run
the CLI entry as a user would: a folder of real images with a truncated PNG, a text file named
.jpg and a notes file, in the moto S3 server and on local disk, scored into Parquet in the bucket
and CSV on disk. Every row is checked against the pyfunc loaded in this process on the same files.
Bad input is refused with one line naming the argument, before Ray starts and before anything is
written.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from test_registry import train_checkpoint  # noqa: E402
from tltrain import storage  # noqa: E402
from tltrain.cli import main  # noqa: E402
from tltrain.execution import predict  # noqa: E402
from tltrain.tracking import registry  # noqa: E402

MODEL = "fashion-batch"
PER_CLASS = 4  # images of each of the 10 classes scored: 40 readable files, 3 batches of 16


@pytest.fixture(scope="module")
def model(fashion_folders: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A registered model version (sqlite store) and the pyfunc as a downstream process loads it."""
    import mlflow.pyfunc
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    train_dir, val_dir = fashion_folders
    tmp = tmp_path_factory.mktemp("batch-model")
    ckpt, _ = train_checkpoint(train_dir, val_dir, tmp / "checkpoint_000001", steps=30)
    uri = f"sqlite:///{tmp / 'mlflow.db'}"
    info = registry.register_checkpoint(str(ckpt), MODEL, tracking_uri=uri)
    with _use_tracking_uri(uri):
        pyfunc = mlflow.pyfunc.load_model(f"models:/{MODEL}/{info.version}")
    return {"tracking_uri": uri, "ref": f"{MODEL}@challenger", "pyfunc": pyfunc}


@pytest.fixture(scope="module")
def images(fashion_folders: tuple[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """<root>/<class>/<n>.png for PER_CLASS images of each class, plus what a real bucket also
    holds: a PNG cut off mid-upload, a text file named .jpg (both unreadable) and a notes file
    (ignored: not an image extension)."""
    root = tmp_path_factory.mktemp("batch-images") / "images"
    good = []
    for class_dir in sorted(Path(fashion_folders[1]).iterdir()):
        for src in sorted(class_dir.glob("*.png"))[:PER_CLASS]:
            dst = root / class_dir.name / src.name
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, dst)
            good.append(dst)
    whole = good[0].read_bytes()
    (root / "bag" / "truncated.png").write_bytes(whole[: len(whole) // 2])
    (root / "coat" / "not-an-image.jpg").write_text("this is a text file, not a JPEG\n")
    (root / "NOTES.txt").write_text("scanned 2024-05\n")
    return {"root": root, "good": good, "unreadable": ["bag/truncated.png", "coat/not-an-image.jpg"]}


@pytest.fixture(scope="module")
def ray_session() -> Iterator[None]:
    """One local Ray for the module (the CLI's ensure_ray finds it running and uses it)."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the command gets as far as connecting to Ray."""

    def refuse(*_: Any, **__: Any) -> None:
        raise AssertionError("Ray was started for input that should have been refused")

    monkeypatch.setattr(predict, "ensure_ray", refuse)


def _expected(model: dict[str, Any], files: list[Path]) -> pd.DataFrame:
    """What the in-process pyfunc says about the same files (encoded bytes in, as any client sends)."""
    out = model["pyfunc"].predict(pd.Series([f.read_bytes() for f in files], dtype=object))
    return out.reset_index(drop=True)


def _assert_rows_match(rows: pd.DataFrame, expected: pd.DataFrame) -> None:
    probs = [c for c in expected.columns if c.startswith("prob_")]
    assert len(probs) == 10
    assert list(rows.columns) == ["path", "label", "probability", *probs]
    assert list(rows["label"]) == list(expected["label"])
    assert rows[["probability", *probs]].to_numpy() == pytest.approx(
        expected[["probability", *probs]].to_numpy(), abs=1e-5
    )


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(["predict", *argv])
    out, err = capsys.readouterr()
    return code, out, err


def _error(err: str) -> str:
    """The refusal: stderr's one error line, its last (the line before it, if any, is where the
    library log file is)."""
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
    return errors[0]


# --- integration: Ray Data on a local cluster, S3 on 127.0.0.1 -------------------------------


@pytest.mark.integration
def test_a_bucket_prefix_is_scored_into_parquet_in_the_bucket(
    model: dict[str, Any], images: dict[str, Any], s3_bucket: str, ray_session: None,
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    root: Path = images["root"]
    prefix = f"{s3_bucket}/incoming/images"
    storage.upload_tree(str(root), prefix)
    out_uri = f"{s3_bucket}/scored/predictions.parquet"

    code, out, err = _run(capsys, model["ref"], prefix, "--out", out_uri, "--batch-size", "16",
                          "--tracking-uri", model["tracking_uri"])  # fmt: skip
    assert code == 0, err
    assert "Traceback" not in err
    total = len(images["good"]) + len(images["unreadable"])
    assert f"scoring {total} images with models:/{MODEL}/1" in err
    assert any(line.startswith("scored ") and f"/{total} images" in line for line in err.splitlines()), err
    summary = out.strip().splitlines()[-1]
    assert f"scored {len(images['good'])} images" in summary
    assert "2 unreadable skipped (e.g. " in summary and "1 file ignored" in summary
    assert summary.endswith(f"wrote {out_uri}")

    local = root.parent / "downloaded.parquet"
    storage.download_file(out_uri, str(local))
    rows = pd.read_parquet(local)
    uris = [f"{prefix}/{f.relative_to(root).as_posix()}" for f in images["good"]]
    assert sorted(rows["path"]) == sorted(uris)  # one row per readable image, none for the others
    rows = rows.set_index("path").loc[uris].reset_index()
    _assert_rows_match(rows, _expected(model, images["good"]))

    # Scoring into the same --out again is refused before Ray is asked for anything.
    before = storage.read_files([out_uri])[0]
    monkeypatch.setattr(predict, "ensure_ray", lambda *a, **k: pytest.fail("Ray started for a refused --out"))
    code, out, err = _run(capsys, model["ref"], prefix, "--out", out_uri, "--tracking-uri", model["tracking_uri"])
    assert code == 2
    assert _error(err) == f"error: --out {out_uri}: already exists; pick another name or pass --overwrite to replace it"
    assert storage.read_files([out_uri])[0] == before


@pytest.mark.integration
def test_a_local_folder_and_a_file_are_scored_into_csv(
    model: dict[str, Any], images: dict[str, Any], ray_session: None, tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    root: Path = images["root"]
    extra = tmp_path / "one more.png"
    shutil.copyfile(images["good"][0], extra)
    out_csv = tmp_path / "results" / "predictions.csv"

    code, out, err = _run(capsys, model["ref"], str(root), str(extra), "--out", str(out_csv), "--json",
                          "--batch-size", "8", "--tracking-uri", model["tracking_uri"])  # fmt: skip
    assert code == 0, err
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["scored"] == len(images["good"]) + 1 and summary["ignored"] == 1
    assert summary["out"] == str(out_csv) and "predictions" not in summary  # the rows are in the file
    unreadable = {Path(u["path"]).relative_to(root).as_posix(): u["reason"] for u in summary["unreadable"]}
    assert sorted(unreadable) == images["unreadable"]
    assert "truncated" in unreadable["bag/truncated.png"]  # the reason says what is wrong with the file
    assert "not an image" in unreadable["coat/not-an-image.jpg"]

    files = [*images["good"], extra]
    rows = pd.read_csv(out_csv)
    assert list(rows["path"]) == [str(f) for f in files]  # listing order, though 6 batches finish in any order
    _assert_rows_match(rows, _expected(model, files))


# --- named files: scored in this process, as `tltrain predict MODEL IMAGE...` always did -------


def test_named_files_are_scored_here_and_unreadable_ones_are_reported(
    model: dict[str, Any], images: dict[str, Any], no_ray: None, capsys: pytest.CaptureFixture[str]
) -> None:
    good = images["good"][::PER_CLASS][:3]  # three classes, so a row given another file's answer shows
    broken = images["root"] / images["unreadable"][0]
    code, out, err = _run(capsys, model["ref"], *map(str, good), str(broken), "--json",
                          "--tracking-uri", model["tracking_uri"])  # fmt: skip
    assert code == 0, err
    result = json.loads(out.strip().splitlines()[-1])
    expected = _expected(model, good)
    assert [p["image"] for p in result["predictions"]] == [str(f) for f in good]
    assert [p["label"] for p in result["predictions"]] == list(expected["label"])
    assert [p["probability"] for p in result["predictions"]] == pytest.approx(list(expected["probability"]), abs=1e-5)
    assert len(set(expected["probability"].round(4))) == 3  # the three files really get different answers
    assert [u["path"] for u in result["unreadable"]] == [str(broken)]
    assert f"1 unreadable skipped (e.g. {broken}: " in err

    code, out, _ = _run(capsys, model["ref"], str(good[0]), "--tracking-uri", model["tracking_uri"])
    label, prob = out.split()[-2:]
    assert code == 0 and out.startswith(str(good[0])) and label == expected["label"][0]
    assert float(prob) == pytest.approx(expected["probability"][0], abs=1e-4)


# --- refused before Ray starts, nothing written ----------------------------------------------


def _refusals(root: Path, tmp: Path) -> list[tuple[str, list[str], str]]:
    (tmp / "exists.csv").write_text("path,label\n")
    (tmp / "only-notes").mkdir()
    (tmp / "only-notes" / "README.txt").write_text("no images here\n")
    return [
        ("missing source", [str(tmp / "nope")], f"SOURCE {tmp / 'nope'}: no such file or folder"),
        ("folder without images", [str(tmp / "only-notes")], f"SOURCE {tmp / 'only-notes'}: no image files"),
        ("not an image file", [str(root / "NOTES.txt")], f"SOURCE {root / 'NOTES.txt'}: not an image file"),
        ("--out extension", [str(root), "--out", str(tmp / "p.json")], "--out"),
        ("--out exists", [str(root), "--out", str(tmp / "exists.csv")], "already exists"),
        ("--out is a folder", [str(root), "--out", str(tmp)], "--out"),
        ("--batch-size", [str(root), "--batch-size", "0"], "--batch-size 0"),
    ]


REFUSALS = ["missing source", "folder without images", "not an image file", "--out extension", "--out exists",
            "--out is a folder", "--batch-size"]  # fmt: skip


@pytest.mark.parametrize("case", REFUSALS)
def test_bad_input_is_refused_naming_the_argument(
    case: str, images: dict[str, Any], no_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cases = {label: (args, needle) for label, args, needle in _refusals(images["root"], tmp_path)}
    assert sorted(cases) == sorted(REFUSALS)
    args, needle = cases[case]
    store = tmp_path / "unused.db"  # the arguments are checked before the model is looked up
    before = sorted(p.name for p in tmp_path.iterdir())
    code, out, err = _run(capsys, f"{MODEL}@challenger", *args, "--tracking-uri", f"sqlite:///{store}")
    assert code == 2, (out, err)
    assert needle in _error(err)
    assert "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    assert (tmp_path / "exists.csv").read_text() == "path,label\n"


def test_an_unknown_model_is_refused_before_ray_starts(
    images: dict[str, Any], no_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = _run(capsys, "no-such-model@champion", str(images["root"]),
                        "--tracking-uri", f"sqlite:///{tmp_path / 'empty.db'}")  # fmt: skip
    assert code == 2
    assert _error(err).startswith("error: MODEL_URI no-such-model@champion: ")
    code, _, err = _run(capsys, str(tmp_path), str(images["root"]))  # a folder that is not a model
    assert code == 2 and f"MODEL_URI {tmp_path}: not an MLflow model directory" in _error(err)


@pytest.mark.integration
def test_an_empty_or_missing_bucket_prefix_is_refused(
    images: dict[str, Any], s3_bucket: str, no_ray: None, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    store = f"sqlite:///{tmp_path / 'unused.db'}"  # never opened: the sources are checked first
    code, _, err = _run(capsys, "m@a", f"{s3_bucket}/nothing/here/", "--tracking-uri", store)
    assert code == 2 and _error(err) == f"error: SOURCE {s3_bucket}/nothing/here/: no objects under this prefix"
    code, _, err = _run(capsys, "m@a", "s3://tltrain-no-such-bucket-9f3/x", "--tracking-uri", store)
    assert code == 2 and "bucket tltrain-no-such-bucket-9f3 does not exist" in _error(err)
    code, _, err = _run(capsys, "m@a", str(images["root"]), "--out", "s3://tltrain-no-such-bucket-9f3/p.parquet",
                        "--tracking-uri", store)  # fmt: skip
    assert code == 2 and "--out s3://tltrain-no-such-bucket-9f3/p.parquet: bucket" in _error(err)
    assert not (tmp_path / "unused.db").exists()


def test_actors_are_sized_from_the_cluster() -> None:
    assert predict.plan_actors({"CPU": 16.0, "GPU": 4.0}, batches=100) == predict.ActorPlan(4, 1, 1)
    assert predict.plan_actors({"CPU": 16.0, "GPU": 4.0}, batches=2) == predict.ActorPlan(2, 1, 1)
    assert predict.plan_actors({"CPU": 16.0}, batches=100) == predict.ActorPlan(4, 4, 0)
    assert predict.plan_actors({"CPU": 2.0}, batches=100) == predict.ActorPlan(1, 2, 0)
    assert predict.plan_actors({"CPU": 16.0}, batches=1) == predict.ActorPlan(1, 4, 0)


def test_read_files_returns_each_files_bytes_or_its_error(images: dict[str, Any], tmp_path: Path) -> None:
    good = images["good"][0]
    got = storage.read_files([str(good), str(tmp_path / "gone.png"), str(good)])
    assert got[0] == got[2] == good.read_bytes()
    assert isinstance(got[1], FileNotFoundError)
