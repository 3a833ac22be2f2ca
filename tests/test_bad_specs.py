"""Malformed job specs, table-driven: each is refused with a message naming the field and the
problem, before anything heavy starts. In-process through config.parse_spec / load_spec, and a few
through the real CLI entry point (exit code 2, the message on stderr, no traceback, Ray not started).
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from tltrain.spec.load import load_spec, parse_spec
from tltrain.spec.schema import SpecError

BASE: dict[str, Any] = {
    "name": "ok",
    "model": {"name": "test_resnet"},
    "data": {"train": "/data/train", "val": "/data/val"},
}

Mutation = Callable[[dict[str, Any]], Any]


def _drop_val_set_fraction(s: dict[str, Any]) -> None:
    s["data"].pop("val")
    s["data"]["val_fraction"] = 1.0


# (id, mutation of BASE, every line/fragment the message must contain)
CASES: list[tuple[str, Mutation, list[str]]] = [
    (
        "misspelt section",
        lambda s: s.update(modle={"name": "x"}),
        ["modle: unknown field; check the spelling against `tltrain spec-fields`"],
    ),
    ("misspelt field", lambda s: s.update(loop={"epochz": 3}), ["loop.epochz: unknown field"]),
    ("model missing", lambda s: s.pop("model"), ["model: required field is missing"]),
    ("name missing", lambda s: s.pop("name"), ["name: required field is missing"]),
    ("data.train missing", lambda s: s["data"].pop("train"), ["data.train: required field is missing"]),
    (
        "name with a path",
        lambda s: s.update(name="../etc"),
        ["name:", "use letters, digits, '.', '_' or '-' (it names directories and MLflow runs)"],
    ),
    (
        "model.name is a component mapping",
        lambda s: s["model"].update(name={"_component_": "os.system"}),
        ["model.name: Input should be a valid string"],
    ),
    (
        "_component_ key",
        lambda s: s["model"].update(_component_="torch.nn.Linear"),
        ["model._component_: unknown field"],
    ),
    ("_target_ key", lambda s: s.update(optim={"_target_": "torch.optim.SGD"}), ["optim._target_: unknown field"]),
    (
        "credentials as a field",
        lambda s: s.update(storage={"aws_secret_access_key": "x"}),
        ["storage.aws_secret_access_key: unknown field"],
    ),
    ("unknown optimizer", lambda s: s.update(optim={"name": "lion"}), ["optim.name: Input should be 'adamw' or 'sgd'"]),
    ("lr zero", lambda s: s.update(optim={"lr": 0}), ["optim.lr: Input should be greater than 0"]),
    ("lr not a number", lambda s: s.update(optim={"lr": "fast"}), ["optim.lr: Input should be a valid number"]),
    ("betas one value", lambda s: s.update(optim={"betas": [0.9]}), ["optim.betas.1: required field is missing"]),
    (
        "freeze_depth negative",
        lambda s: s.update(strategy={"freeze_depth": -1}),
        ["strategy.freeze_depth:", 'must be >= 0 (0 = full fine-tune) or "all"'],
    ),
    (
        "freeze_depth a word",
        lambda s: s.update(strategy={"freeze_depth": "most"}),
        ["strategy.freeze_depth", "Input should be 'all'"],
    ),
    (
        "layer_decay above 1",
        lambda s: s.update(strategy={"layer_decay": 1.5}),
        ["strategy.layer_decay: Input should be less than or equal to 1"],
    ),
    (
        "unfreeze negative epoch",
        lambda s: s.update(strategy={"unfreeze": {-1: 0}}),
        ["strategy.unfreeze:", "epoch -1 must be >= 0"],
    ),
    (
        "unfreeze epoch not a number",
        lambda s: s.update(strategy={"unfreeze": {"two": 0}}),
        ["strategy.unfreeze.two", "valid integer"],
    ),
    (
        "epochs zero",
        lambda s: s.update(loop={"epochs": 0}),
        ["loop.epochs: Input should be greater than or equal to 1"],
    ),
    (
        "epochs fractional",
        lambda s: s.update(loop={"epochs": 2.5}),
        ["loop.epochs: Input should be a valid integer, got a number with a fractional part"],
    ),
    (
        "precision fp8",
        lambda s: s.update(loop={"precision": "fp8"}),
        ["loop.precision: Input should be 'bf16', 'fp16' or 'fp32'"],
    ),
    (
        "grad_accum zero",
        lambda s: s.update(loop={"grad_accum": 0}),
        ["loop.grad_accum: Input should be greater than or equal to 1"],
    ),
    (
        "label_smoothing 1",
        lambda s: s.update(loop={"label_smoothing": 1.0}),
        ["loop.label_smoothing: Input should be less than 1"],
    ),
    ("section is a list", lambda s: s.update(loop=[1, 2]), ["loop: Input should be a valid dictionary"]),
    (
        "zero workers",
        lambda s: s.update(scaling={"num_workers": 0}),
        ["scaling.num_workers: Input should be greater than or equal to 1"],
    ),
    (
        "negative batch",
        lambda s: s.update(scaling={"batch_size_per_worker": -8}),
        ["scaling.batch_size_per_worker: Input should be greater than or equal to 1"],
    ),
    (
        "use_gpu maybe",
        lambda s: s.update(scaling={"use_gpu": "maybe"}),
        ["scaling.use_gpu: Input should be a valid boolean"],
    ),
    (
        "val and val_fraction",
        lambda s: s["data"].update(val_fraction=0.1),
        ["data: set either data.val or data.val_fraction, not both"],
    ),
    (
        "no validation source",
        lambda s: s["data"].pop("val"),
        ["data: set data.val (a folder) or data.val_fraction (e.g. 0.1)"],
    ),
    ("val_fraction 1", _drop_val_set_fraction, ["data.val_fraction: Input should be less than 1"]),
    (
        "image_size 8",
        lambda s: s["data"].update(image_size=8),
        ["data.image_size: Input should be greater than or equal to 16"],
    ),
    (
        "unknown augment",
        lambda s: s["data"].update(augment="heavy"),
        ["data.augment: Input should be 'none', 'light', 'randaugment' or 'trivialaugment'"],
    ),
    (
        "on_bad_image ignore",
        lambda s: s["data"].update(on_bad_image="ignore"),
        ["data.on_bad_image: Input should be 'error' or 'skip'"],
    ),
    (
        "storage.mode best",
        lambda s: s.update(storage={"mode": "best"}),
        ["storage.mode: Input should be 'max' or 'min'"],
    ),
    (
        "keep zero",
        lambda s: s.update(storage={"keep": 0}),
        ["storage.keep: Input should be greater than or equal to 1"],
    ),
    ("drop_rate 1", lambda s: s["model"].update(drop_rate=1.0), ["model.drop_rate: Input should be less than 1"]),
    (
        "schedule kind exp",
        lambda s: s.update(schedule={"kind": "exp"}),
        ["schedule.kind: Input should be 'cosine', 'linear' or 'constant'"],
    ),
    (
        "tracking.enabled text",
        lambda s: s.update(tracking={"enabled": "yes please"}),
        ["tracking.enabled: Input should be a valid boolean"],
    ),
    (
        "tune.num_samples zero",
        lambda s: s.update(tune={"num_samples": 0}),
        ["tune.num_samples: Input should be greater than or equal to 1"],
    ),
    (
        "tune unknown distribution",
        lambda s: s.update(tune={"space": {"optim.lr": {"normal": [0, 1]}}}),
        ["tune.space:", "optim.lr: unknown distribution 'normal' (use one of choice, randint, uniform, loguniform)"],
    ),
]


def test_the_table_is_big_enough() -> None:
    assert len(CASES) >= 20
    assert len({c[0] for c in CASES}) == len(CASES)


@pytest.mark.parametrize("label,mutate,fragments", CASES, ids=[c[0] for c in CASES])
def test_parse_spec_refuses_with_the_message(label: str, mutate: Mutation, fragments: list[str]) -> None:
    spec = copy.deepcopy(BASE)
    mutate(spec)
    with pytest.raises(SpecError) as err:
        parse_spec(spec, "jobs/x.yaml")
    msg = str(err.value)
    assert msg.startswith("invalid job spec jobs/x.yaml:"), msg
    for fragment in fragments:
        assert fragment in msg, f"{label}: {fragment!r} not in:\n{msg}"


def test_the_base_spec_itself_is_valid() -> None:
    assert parse_spec(copy.deepcopy(BASE)).name == "ok"


# Problems with the file itself, or with --set, that load_spec reports before pydantic sees a tree.
FILE_CASES: list[tuple[str, str, list[str], str]] = [
    ("empty file", "", [], r"name: required field is missing"),
    ("top level is a list", "- name: x\n", [], r"the top level must be a mapping of sections"),
    ("not YAML", "name: [unclosed\n", [], r"not valid YAML"),
    # yaml.safe_load refuses Python tags, so a spec can never construct an object or call code.
    ("python object tag", "name: !!python/object/apply:os.system ['touch {marker}']\n", [], r"not valid YAML"),
    ("--set without =", yaml.safe_dump(BASE), ["loop.epochs"], r"--set 'loop.epochs': expected key.path=value"),
    ("--set into a value", yaml.safe_dump(BASE), ["name.first=x"], r"--set name.first: 'name' is not a section"),
    ("--set bad value", yaml.safe_dump(BASE), ["loop.precision=fp8"], r"loop.precision: Input should be"),
]


@pytest.mark.parametrize("label,text,overrides,pattern", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_load_spec_refuses_bad_files(tmp_path: Path, label: str, text: str, overrides: list[str], pattern: str) -> None:
    marker = tmp_path / "executed"
    path = tmp_path / "spec.yaml"
    path.write_text(text.replace("{marker}", str(marker)))
    with pytest.raises(SpecError, match=re.escape(pattern) if pattern.startswith("--set") else pattern):
        load_spec(path, overrides)
    assert not marker.exists()


def test_missing_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match=r"nope\.yaml: file not found"):
        load_spec(tmp_path / "nope.yaml")


# ---- through the CLI: exit 2, message on stderr, no traceback, Ray never started ----------------


@pytest.fixture(scope="module")
def tiny_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    root = tmp_path_factory.mktemp("tiny")
    for split, n in (("train", 10), ("val", 2)):
        for c, colour in (("red", (200, 0, 0)), ("blue", (0, 0, 200))):
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (8, 8), colour).save(root / split / c / f"{i}.png")
    return str(root / "train"), str(root / "val")


CLI_CASES: list[tuple[str, Mutation, list[str]]] = [
    ("unknown field", lambda s: s["loop"].update(epochz=3), ["loop.epochz: unknown field"]),
    ("component key", lambda s: s["model"].update(_component_="os.system"), ["model._component_: unknown field"]),
    # Typed as a string, so it is only ever a name looked up in timm/torchvision, never imported.
    (
        "model.name os.system",
        lambda s: s["model"].update(name="os.system"),
        ["model.name: timm has no model 'os.system'"],
    ),
    (
        "torchvision:os.system",
        lambda s: s["model"].update(name="torchvision:os.system"),
        ["model.name: torchvision has no model 'os.system'"],
    ),
    (
        "both val sources",
        lambda s: s["data"].update(val_fraction=0.2),
        ["data: set either data.val or data.val_fraction"],
    ),
    (
        "weights not a file",
        lambda s: s["model"].update(weights="/nonexistent/w.pth"),
        ["model.weights: no file at /nonexistent/w.pth"],
    ),
]


@pytest.mark.parametrize("label,mutate,fragments", CLI_CASES, ids=[c[0] for c in CLI_CASES])
def test_cli_exits_2_with_the_message(
    tmp_path: Path,
    capsys: pytest.CaptureFixture,
    tiny_folders: tuple[str, str],
    label: str,
    mutate: Mutation,
    fragments: list[str],
) -> None:
    import ray

    from tltrain.cli import main

    spec: dict[str, Any] = {
        "name": "bad",
        "model": {"name": "test_resnet"},
        "data": {"train": tiny_folders[0], "val": tiny_folders[1], "image_size": 32, "loader_workers": 0},
        "loop": {"epochs": 1, "precision": "fp32"},
        "scaling": {"num_workers": 1, "batch_size_per_worker": 8},
        "storage": {"uri": str(tmp_path / "runs")},
        "tracking": {"enabled": False},
    }
    mutate(spec)
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(spec))
    code = main(["train", str(path)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.startswith("error: "), err
    for fragment in fragments:
        assert fragment in err, err
    assert "Traceback" not in err
    assert not ray.is_initialized()
    assert not (tmp_path / "runs").exists()


def test_cli_refuses_a_python_tag(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from tltrain.cli import main

    marker = tmp_path / "executed"
    path = tmp_path / "spec.yaml"
    path.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\nmodel: {{name: test_resnet}}\n")
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert "not valid YAML" in err and "python/object/apply" in err
    assert not marker.exists()


@pytest.mark.parametrize("path", sorted((Path(__file__).parents[1] / "jobs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_example_spec_in_jobs_parses(path: Path) -> None:
    spec = load_spec(str(path))
    if "fashion-mnist" in spec.data.train:  # the demo's data: examples hold out its t10k picks
        assert spec.data.test is not None and spec.data.test.endswith("fashion-mnist-100x50/val")
