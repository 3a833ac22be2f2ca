"""Bad specs and bad data are refused by the CLI before Ray starts, naming the field or file,
and nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml


def _base(train: str, val: str) -> dict:
    return {
        "name": "bad",
        "model": {"name": "test_resnet"},
        "data": {"train": train, "val": val, "image_size": 32, "loader_workers": 0},
        "loop": {"epochs": 1, "precision": "fp32"},
        "scaling": {"num_workers": 1, "batch_size_per_worker": 8},
        "tracking": {"enabled": False},
    }


def _copy_tree(src: str, dst: Path, per_class: int = 12) -> Path:
    for class_dir in sorted(Path(src).iterdir()):
        out = dst / class_dir.name
        out.mkdir(parents=True)
        for img in sorted(class_dir.iterdir())[:per_class]:
            (out / img.name).write_bytes(img.read_bytes())
    return dst


class Outcome:
    def __init__(self, returncode: int, stdout: str, stderr: str) -> None:
        self.returncode, self.stdout, self.stderr = returncode, stdout, stderr


def _run(tmp_path: Path, spec: dict, *extra: str, capsys=None) -> Outcome:
    """Runs the real CLI entry point in-process (the import of torch/timm/ray is paid once)."""
    import ray

    from tltrain.cli import main

    spec.setdefault("storage", {"uri": str(tmp_path / "runs")})
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = main(["train", str(path), *extra])
    out, err = capsys.readouterr()
    assert not ray.is_initialized(), "Ray was started for an invalid job"
    return Outcome(code, out, err)


CASES = [
    ("unknown key", lambda s: s["loop"].update(epochz=3), "loop.epochz"),
    ("negative lr", lambda s: s.update(optim={"lr": -1.0}), "optim.lr"),
    ("freeze depth beyond groups", lambda s: s.update(strategy={"freeze_depth": 9}), "strategy.freeze_depth"),
    ("missing data path", lambda s: s["data"].update(train="/nonexistent/train"), "data.train"),
    ("unknown model", lambda s: s["model"].update(name="resnet_does_not_exist"), "model.name"),
    ("weights file missing", lambda s: s["model"].update(weights="/nonexistent/w.pth"), "model.weights"),
]


@pytest.mark.parametrize("label,mutate,needle", CASES, ids=[c[0] for c in CASES])
def test_bad_spec_exits_nonzero_naming_the_field_and_writes_nothing(
    tmp_path, capsys, fashion_folders, label, mutate, needle
):
    spec = _base(*fashion_folders)
    mutate(spec)
    result = _run(tmp_path, spec, capsys=capsys)
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert needle in result.stderr, result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "runs").exists()  # no checkpoint dir, no Ray run started


def test_train_val_class_mismatch_names_the_classes(tmp_path, capsys, fashion_folders):
    train = _copy_tree(fashion_folders[0], tmp_path / "train")
    val = _copy_tree(fashion_folders[1], tmp_path / "val")
    (val / "bag").rename(val / "bags")
    result = _run(tmp_path, _base(str(train), str(val)), capsys=capsys)
    assert result.returncode == 2
    assert "data.val" in result.stderr and "bag" in result.stderr and "bags" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_unreadable_image_is_named(tmp_path, capsys, fashion_folders):
    train = _copy_tree(fashion_folders[0], tmp_path / "train")
    (train / "coat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    result = _run(tmp_path, _base(str(train), fashion_folders[1]), capsys=capsys)
    assert result.returncode == 2
    assert "broken.png" in result.stderr
    assert not (tmp_path / "runs").exists()


def test_set_override_is_validated_too(tmp_path, capsys, fashion_folders):
    result = _run(tmp_path, _base(*fashion_folders), "--set", "loop.precision=fp8", capsys=capsys)
    assert result.returncode == 2 and "loop.precision" in result.stderr
