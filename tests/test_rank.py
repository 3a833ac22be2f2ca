"""`tltrain rank`: the packaged ImageNet EfficientNet-Lite0 weights rank above random init of the same
model on real Fashion-MNIST images, every score drops when the labels are shuffled, `--depths`
scores each freeze depth, MLflow holds a parent with a child per candidate; bad input is refused on
the driver before Ray starts."""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
import yaml

from tltrain.commands.demo import packaged_lite0_weights
from tltrain.commands.rank import candidates_override
from tltrain.core.features import source_head
from tltrain.core.model import build_model, layer_groups
from tltrain.core.transferability import kendall_tau
from tltrain.data import stratified_sample
from tltrain.execution import rank as rank_mod
from tltrain.execution.rank_check import correlations
from tltrain.reports.rank import format_check_table
from tltrain.spec.load import parse_spec
from tltrain.spec.schema import ModelSpec, SpecError

LITE0 = "tf_efficientnet_lite0"


def _tltrain(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "tltrain.cli", *args], cwd=cwd, capture_output=True, text=True, timeout=600
    )


def _imagenet() -> dict:
    return {"name": LITE0, "weights": str(packaged_lite0_weights()), "weights_remap": True, "label": "lite0-imagenet"}


def _spec(tmp_path: Path, train: str, val: str, candidates: list[dict], **rank: object) -> dict:
    return {
        "name": "rank-test",
        "model": {"name": LITE0},
        # 64 px: small enough for 2 CPU cores, large enough for ImageNet features to mean something.
        "data": {"train": train, "val": val, "image_size": 64, "loader_workers": 0},
        "scaling": {"address": "local", "cpus_per_worker": 1},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "experiment": "rank"},
        "rank": {"candidates": candidates, "sample_per_class": 10, **rank},
    }


def _write(tmp_path: Path, tree: dict, file: str = "spec.yaml") -> Path:
    path = tmp_path / file
    path.write_text(yaml.safe_dump(tree))
    return path


def _shuffled_copy(train: str, out: Path) -> str:
    """The same images, each moved to a class folder drawn at random (class sizes kept)."""
    files = sorted(p for p in Path(train).rglob("*") if p.is_file())
    classes = [p.parent.name for p in files]
    random.Random(0).shuffle(classes)
    for src, cls in zip(files, classes):
        (out / cls).mkdir(parents=True, exist_ok=True)
        shutil.copy(src, out / cls / f"{src.parent.name}-{src.name}")
    return str(out)


@pytest.mark.integration
def test_rank_puts_imagenet_weights_above_random_init_and_every_score_drops_on_shuffled_labels(
    tmp_path: Path, fashion_folders: tuple[str, str]
) -> None:
    from mlflow import MlflowClient

    train, val = fashion_folders
    random_init = {"name": LITE0, "label": "lite0-random"}
    spec = _write(tmp_path, _spec(tmp_path, train, val, [random_init, _imagenet()]))
    res = _tltrain("rank", str(spec), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    table = res.stdout.splitlines()
    # The table, best first by LogME: ImageNet weights on top, random init's LEEP/NCE shown as "-".
    header = next(i for i, line in enumerate(table) if line.lstrip().startswith("#"))
    assert table[header].split()[:6] == ["#", "candidate", "logme", "leep", "nce", "h_score"]
    assert table[header + 1].split()[1] == "lite0-imagenet" and table[header + 2].split()[1] == "lite0-random"
    assert table[header + 2].split()[3:5] == ["-", "-"]
    assert "lite0-random: no source head in these weights: leep, nce skipped" in res.stdout
    imagenet, rand = out["candidates"]
    assert (imagenet["candidate"], rand["candidate"], out["best"]) == (
        "lite0-imagenet",
        "lite0-random",
        "lite0-imagenet",
    )
    for score in ("logme", "h_score"):
        assert imagenet["scores"][score] > rand["scores"][score], score
    assert rand["scores"]["leep"] is None and rand["scores"]["nce"] is None
    assert imagenet["images"] == rand["images"] == out["images"] == 100  # 10 per class, 10 classes
    assert imagenet["feature_dim"] == 1280 and imagenet["seconds"] > 0
    # One MLflow run with a child per candidate, each carrying its scores.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(out["mlflow_run_id"])
    assert parent.data.tags["rank.best"] == "lite0-imagenet"
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {c.data.tags["mlflow.runName"]: c for c in children}
    assert sorted(by_name) == ["rank-test-rank/lite0-imagenet", "rank-test-rank/lite0-random"]
    assert by_name["rank-test-rank/lite0-imagenet"].data.metrics["rank/logme"] == pytest.approx(
        imagenet["scores"]["logme"]
    )
    assert "rank/leep" not in by_name["rank-test-rank/lite0-random"].data.metrics

    # The same images with shuffled labels, and --depths on the ImageNet model: every score drops.
    shuffled = _shuffled_copy(train, tmp_path / "shuffled")
    res = _tltrain(
        "rank", str(spec), "--depths", "--json", "--set", f"data.train={shuffled}",
        "--set", f"rank.candidates=[{json.dumps(_imagenet())}]", cwd=tmp_path,
    )  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    depths = json.loads(res.stdout.strip().splitlines()[-1])
    for score in ("logme", "leep", "nce", "h_score"):
        assert depths["scores"][score] < imagenet["scores"][score], score
    # A row per freeze depth 1..groups, the input the trainable part starts from at that depth.
    groups = layer_groups(timm.create_model(LITE0, num_classes=10))[:-1]
    rows = sorted(depths["depths"], key=lambda r: r["freeze_depth"])
    assert [(r["freeze_depth"], r["after"]) for r in rows] == [(d, g.name) for d, g in enumerate(groups, start=1)]
    assert rows[-1]["feature_dim"] == 1280 and rows[0]["feature_dim"] == 32
    assert depths["best_freeze_depth"] in {r["freeze_depth"] for r in rows}
    assert "freeze depth's input" in res.stdout


def _tiny_spec(tmp_path: Path, train: str, val: str, candidates: list[dict], **rank: object) -> object:
    tree = _spec(tmp_path, train, val, candidates, **rank)
    tree["data"]["image_size"] = 32
    tree["tracking"] = {"enabled": False}
    return parse_spec(tree)


@pytest.fixture
def no_ray(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_a: object, **_k: object) -> None:
        raise AssertionError("Ray was started for input that should have been refused")

    monkeypatch.setattr(rank_mod, "ensure_ray", refuse)


def test_weights_that_do_not_load_are_refused_before_ray(
    tmp_path: Path, fashion_folders: tuple[str, str], no_ray: None
) -> None:
    train, val = fashion_folders
    wrong = tmp_path / "resnet.pth"
    torch.save(timm.create_model("test_resnet", num_classes=3).state_dict(), wrong)
    bad = {"name": LITE0, "weights": str(wrong), "weights_remap": True}
    spec = _tiny_spec(tmp_path, train, val, [{"name": LITE0}, bad])
    with pytest.raises(SpecError, match=r"rank\.candidates\[1\] \(tf_efficientnet_lite0:resnet\.pth\): model\.weights"):
        rank_mod.run_rank(spec)
    with pytest.raises(SpecError, match=r"rank\.candidates: 'tf_efficientnet_lite0:random' names more than one"):
        rank_mod.run_rank(_tiny_spec(tmp_path, train, val, [{"name": LITE0}, {"name": LITE0}]))
    missing = {"name": LITE0, "weights": str(tmp_path / "nope.pth")}
    with pytest.raises(SpecError, match=r"rank\.candidates\[0\].*no file at"):
        rank_mod.run_rank(_tiny_spec(tmp_path, train, val, [missing]))


def test_leep_asked_for_without_a_source_head_is_refused(
    tmp_path: Path, fashion_folders: tuple[str, str], no_ray: None
) -> None:
    train, val = fashion_folders
    spec = _tiny_spec(tmp_path, train, val, [{"name": "test_resnet"}], scores=["logme", "leep"])
    with pytest.raises(SpecError, match=r"rank\.scores asks for leep, which need the source model's own classifier"):
        rank_mod.run_rank(spec)
    with pytest.raises(SpecError, match=r"rank\.candidates\[0\].*nce"):
        rank_mod.run_rank(_tiny_spec(tmp_path, train, val, [{"name": "test_resnet"}], scores=["nce"], sort_by="nce"))


def test_a_sample_with_fewer_than_two_images_in_a_class_is_refused(tmp_path: Path, no_ray: None) -> None:
    from PIL import Image

    root = tmp_path / "tiny"
    for cls, n in {"a": 6, "b": 2}.items():
        (root / cls).mkdir(parents=True)
        for i in range(n):
            Image.new("RGB", (8, 8), (i * 20, 0, 0)).save(root / cls / f"{i}.png")
    tree = _spec(tmp_path, str(root), str(root), [{"name": "test_resnet"}])
    tree["data"] = {"train": str(root), "val_fraction": 0.5, "image_size": 32}
    tree["tracking"] = {"enabled": False}
    with pytest.raises(SpecError, match=r"rank\.sample_per_class: class 'b' has 1 training image"):
        rank_mod.run_rank(parse_spec(tree))


def test_the_sample_is_seeded_and_class_stratified() -> None:
    train = [(f"/d/{c}/{i}.png", c) for c in range(3) for i in range(10 + c)]
    names = ["a", "b", "c"]
    a = stratified_sample(train, names, 4, seed=0)
    assert a == stratified_sample(list(reversed(train)), names, 4, seed=0)  # order-free, repeatable
    assert a != stratified_sample(train, names, 4, seed=1)
    assert [sum(1 for _, y in a if y == c) for c in range(3)] == [4, 4, 4]
    assert len(stratified_sample(train, names, 50, seed=0)) == len(train)  # capped by the class sizes
    # A new class sorting first shifts every index but leaves the others' draws (seeded by name).
    shifted = [(p, y + 1) for p, y in train] + [("/d/0new/0.png", 0)]
    again = stratified_sample(shifted, ["0new", *names], 4, seed=0)
    assert sorted(p for p, y in again if y > 0) == sorted(p for p, _ in a)


def test_source_head_is_found_in_the_packaged_weights_and_not_in_a_headless_file(tmp_path: Path) -> None:
    weights = packaged_lite0_weights()
    model = build_model(ModelSpec(name=LITE0, weights=str(weights), weights_remap=True), 10, weights, 32)
    head = source_head(model, weights, remap=True)
    assert head is not None and head.num_classes == 1000 and tuple(head.weight.shape) == (1000, 1280)
    assert source_head(model, None, remap=True) is None
    resnet = timm.create_model("test_resnet", num_classes=5)
    headless = {k: v for k, v in resnet.state_dict().items() if not k.startswith("fc.")}
    torch.save(headless, tmp_path / "backbone.pth")
    assert source_head(resnet, tmp_path / "backbone.pth", remap=False) is None
    torch.save(resnet.state_dict(), tmp_path / "full.pth")
    found = source_head(resnet, tmp_path / "full.pth", remap=False)
    assert found is not None and found.num_classes == 5


def test_candidates_file_becomes_the_rank_candidates_field(tmp_path: Path) -> None:
    file = tmp_path / "c.yaml"
    file.write_text(yaml.safe_dump([{"name": LITE0, "weights": "hub"}, {"name": LITE0}]))
    assert (
        candidates_override(str(file))
        == 'rank.candidates=[{"name": "' + LITE0 + '", "weights": "hub"}, {"name": "' + LITE0 + '"}]'
    )
    file.write_text("{}")
    with pytest.raises(SpecError, match="--candidates .*non-empty list"):
        candidates_override(str(file))
    with pytest.raises(SpecError, match="rank.sort_by: leep is not in rank.scores"):
        parse_spec({"name": "x", "model": {"name": LITE0}, "data": {"train": "/d", "val_fraction": 0.1},
                    "rank": {"scores": ["logme"], "sort_by": "leep"}})  # fmt: skip


def _test_resnet_sources(tmp_path: Path) -> list[str]:
    """Two "pretrained" test_resnets (seeds 1, 2) with their own 7-class source heads."""
    sources = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        path = tmp_path / f"source{seed}.pth"
        torch.save(timm.create_model("test_resnet", num_classes=7).state_dict(), path)
        sources.append(str(path))
    return sources


@pytest.mark.integration
def test_a_prescreened_sweep_trains_only_the_kept_candidates(tmp_path: Path, fashion_folders: tuple[str, str]) -> None:
    train, val = fashion_folders
    choices = [*_test_resnet_sources(tmp_path), None]
    tree = {
        "name": "screened",
        "model": {"name": "test_resnet"},
        "data": {"train": train, "val": val, "image_size": 32, "loader_workers": 0},
        "loop": {"epochs": 1, "precision": "fp32", "max_steps_per_epoch": 2, "seed": 0},
        "scaling": {"num_workers": 1, "batch_size_per_worker": 16, "address": "local"},
        "storage": {"uri": str(tmp_path / "runs"), "keep": 1},
        "tracking": {"enabled": False},
        "rank": {"sample_per_class": 5},
        "tune": {
            "num_samples": 2, "metric": "val/acc", "mode": "max", "seed": 0, "scheduler": {"kind": "fifo"},
            "prescreen": {"score": "logme", "keep": 1},
            "space": {"model.weights": {"choice": choices}, "optim.lr": {"choice": [1.0e-3, 3.0e-3]}},
        },
    }  # fmt: skip
    res = _tltrain("tune", str(_write(tmp_path, tree)), "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    screened = summary["prescreen"]
    assert screened["key"] == "model.weights" and screened["score"] == "logme" and len(screened["kept"]) == 1
    ranking = screened["ranking"]
    assert [r["logme"] for r in ranking] == sorted((r["logme"] for r in ranking), reverse=True)
    assert screened["kept"] == [ranking[0]["value"]]
    assert sorted(map(str, screened["pruned"])) == sorted(str(r["value"]) for r in ranking[1:])
    # Every trial trained from the kept source; none from a pruned one.
    assert len(summary["trials"]) == 2
    assert {t["config"]["model.weights"] for t in summary["trials"]} == set(screened["kept"])
    assert "prescreen: searching" in res.stdout and "pruned" in res.stdout


def test_prescreen_needs_one_searched_choice_of_source_models(tmp_path: Path, no_ray: None) -> None:
    import io

    base = {"name": "p", "model": {"name": "test_resnet"}, "data": {"train": "/d", "val_fraction": 0.1}}
    for space, message in [
        ({"optim.lr": {"choice": [1e-3]}}, "tune.space searches neither"),
        ({"model.name": {"choice": ["a"]}, "model.weights": {"choice": [None]}}, "tune.space searches both"),
        ({"model.weights": {"uniform": [0, 1]}}, r"tune.space.model.weights must be a \{choice"),
    ]:
        tree = {**base, "tune": {"prescreen": {"keep": 1}, "space": space}}
        with pytest.raises(SpecError, match=message):
            rank_mod.prescreen(parse_spec(tree), io.StringIO())
    unscreened = parse_spec({**base, "tune": {"space": {"optim.lr": {"choice": [1e-3]}}}})
    assert rank_mod.prescreen(unscreened, io.StringIO()) == (unscreened, None)


def test_kendall_tau_is_scipys_tau_b_with_ties() -> None:
    from scipy.stats import kendalltau

    rng = np.random.default_rng(0)
    for n in (2, 3, 5, 9):
        x, y = rng.integers(0, 4, n).astype(float), rng.normal(size=n)  # ties in x
        expected = kendalltau(x, y).statistic
        got = kendall_tau(list(x), list(y))
        assert (got is None and np.isnan(expected)) or got == pytest.approx(expected, abs=1e-12), (x, y)
    assert kendall_tau([1, 2, 3], [10, 20, 30]) == 1.0 and kendall_tau([1, 2, 3], [3, 2, 1]) == -1.0
    assert kendall_tau([1, 1, 1], [1, 2, 3]) is None and kendall_tau([1], [2]) is None


def test_the_check_correlates_within_the_pretrained_candidates_too() -> None:
    rows = [
        {"candidate": "a", "weights": "a.pth", "scores": {"logme": 3.0, "leep": -1.0}, "fine_tuned": 0.9},
        {"candidate": "b", "weights": "b.pth", "scores": {"logme": 2.0, "leep": -0.5}, "fine_tuned": 0.8},
        {"candidate": "c", "weights": None, "scores": {"logme": 1.0, "leep": None}, "fine_tuned": 0.1},
    ]
    taus = {(t["among"], t["score"]): (t["tau"], t["n"]) for t in correlations(rows, ["logme", "leep"], depths=False)}
    assert taus[("all candidates", "logme")] == (1.0, 3)
    assert taus[("all candidates", "leep")] == (-1.0, 2)  # random init has no LEEP: left out, n says so
    assert taus[("pretrained only", "logme")] == (1.0, 2)
    for row, ft_s in zip(rows, (10.0, 20.0, 30.0)):
        row["fine_tune_s"] = ft_s
    check = {"metric": "test/acc", "correlations": correlations(rows, ["logme", "leep"], depths=False),
             "rank_s": 6.0, "fine_tune_s": 60.0, "fine_tunes": 3, "reused": 0}  # fmt: skip
    table = format_check_table(rows, ["logme", "leep"], check)
    assert "all candidates (n=3): logme +1.00, leep -1.00 (n=2)" in table
    assert "pretrained only (n=2): logme +1.00, leep -1.00" in table
    assert "the 3 fine-tunes 60 s (10x the ranking)" in table


@pytest.mark.integration
def test_fine_tune_check_trains_every_candidate_and_correlates_its_test_accuracy(
    tmp_path: Path, fashion_folders: tuple[str, str]
) -> None:
    from mlflow import MlflowClient

    train, val = fashion_folders
    candidates = [
        {"name": "test_resnet", "weights": path, "label": Path(path).stem} for path in _test_resnet_sources(tmp_path)
    ]
    candidates.append({"name": "test_resnet", "label": "random"})
    tree = _spec(tmp_path, train, val, candidates, sample_per_class=5)
    tree["model"] = {"name": "test_resnet"}
    tree["data"].update(image_size=32, test=val, val_fraction=0.2)
    del tree["data"]["val"]
    tree["loop"] = {"epochs": 1, "precision": "fp32", "max_steps_per_epoch": 3, "seed": 0}
    tree["scaling"].update(num_workers=1, batch_size_per_worker=16)
    tree["storage"] = {"uri": str(tmp_path / "runs"), "keep": 1}
    tree["tracking"]["registry_name"] = "should-not-register"
    res = _tltrain("rank", str(_write(tmp_path, tree)), "--fine-tune", "--json", cwd=tmp_path)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    check, rows = out["fine_tune"], out["candidates"]
    assert check["metric"] == "test/acc" and 0 < check["rank_s"] < check["fine_tune_s"]
    assert all(0.0 <= r["fine_tuned"] <= 1.0 and r["fine_tune_s"] > 0 for r in rows)
    taus = {(t["among"], t["score"]): t for t in check["correlations"]}
    logme = taus[("all candidates", "logme")]
    assert logme["n"] == 3 and taus[("pretrained only", "logme")]["n"] == 2
    assert logme["tau"] == kendall_tau([r["scores"]["logme"] for r in rows], [r["fine_tuned"] for r in rows])
    assert "Kendall tau-b of each score with test/acc" in res.stdout
    # Each fine-tune is an MLflow run under the check's parent, its test/acc the row's; none registered.
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent = client.get_run(check["mlflow_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    by_name = {c.data.tags["mlflow.runName"].rsplit("-", 1)[0]: c.data.metrics for c in children}
    assert {f"rank-test-ft-{r['candidate']}": r["fine_tuned"] for r in rows} == {
        name: metrics["test/acc"] for name, metrics in by_name.items()
    }
    assert not any(r["reused"] for r in rows) and check["fine_tunes"] == 3
    assert client.search_registered_models() == []


def test_fine_tune_check_refusals_before_ray(tmp_path: Path, fashion_folders: tuple[str, str], no_ray: None) -> None:
    train, val = fashion_folders
    tree = _spec(
        tmp_path, train, val, [{"name": "test_resnet", "label": "a b"}, {"name": "test_resnet", "label": "a/b"}]
    )
    tree["data"]["image_size"] = 32
    tree["tracking"] = {"enabled": False}
    with pytest.raises(SpecError, match="two labels give the same fine-tune run name"):
        rank_mod.run_rank(parse_spec(tree), fine_tune=True)
    tree["rank"]["candidates"] = [{"name": "test_resnet", "label": "a"}]
    tree["storage"] = {"metric": "val/loss", "mode": "min"}
    with pytest.raises(SpecError, match="--fine-tune: correlates the scores with an accuracy"):
        rank_mod.run_rank(parse_spec(tree), fine_tune=True)
