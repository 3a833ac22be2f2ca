"""Domain adaptation end to end: on Fashion-MNIST with an inverted target domain, aligning the pooled
features with unlabelled target images beats the source-only run of the same budget on labelled
target images; the refusals before Ray; a resumed DANN run continues its discriminator exactly; and
a `tltrain tune` over the method whose trials run on a local 2-worker Ray (gloo, the MMD all-gather
across ranks, DANN's discriminator under DDP)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from tltrain.core.checkpoint import load_meta, load_train_state, load_twins
from tltrain.core.loop import Resume, train
from tltrain.core.model import build_model, layer_groups
from tltrain.core.steps import DISCRIMINATOR_STATE
from tltrain.data import build_eval_loader, build_target_loader, build_train_loader, build_transform
from tltrain.data.packaged import materialize_fashion_shift
from tltrain.execution.preflight import build_plan
from tltrain.spec.load import parse_spec
from tltrain.spec.metrics import ALIGN_LOSS, VAL_ACC, Split, split_metric
from tltrain.spec.schema import SpecError
from tltrain.tracking.tracker import flatten_spec, lineage_tags

# One intra-op thread: on 2 shared cores a second one mostly spins (and these runs are small).
torch.set_num_threads(1)
BATCH = 32


@pytest.fixture(scope="module")
def shift_folders(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str, str]:
    """(source train, unlabelled target, target val): 100 + 100 per class, 50 val per class, inverted."""
    return materialize_fashion_shift(str(tmp_path_factory.mktemp("shift")), 100, 100, 50, seed=0, shift="invert")[:3]


def _tree(folders: tuple[str, str, str], tmp: Path, *, method: str | None, seed: int = 0, epochs: int = 4,
          **strategy: Any) -> dict[str, Any]:  # fmt: skip
    source, target, val = folders
    tree: dict[str, Any] = {
        "name": "da",
        "model": {"name": "test_resnet"},
        "data": {"train": source, "val": val, "image_size": 32, "loader_workers": 0},
        "optim": {"lr": 3.0e-3},
        "loop": {"epochs": epochs, "precision": "fp32", "seed": seed},
        "scaling": {"batch_size_per_worker": BATCH},
        "storage": {"uri": str(tmp / "runs")},
        "tracking": {"enabled": False},
    }
    if method is not None:
        tree["data"]["target_unlabelled"] = target
        tree["strategy"] = {"domain_adaptation": {"method": method, **strategy}}
    return tree


def _train_in_process(tree: dict[str, Any], resume_from: Path | None = None, keep: Path | None = None
                      ) -> list[dict[str, Any]]:  # fmt: skip
    """preflight's plan, then the worker's loaders and loop.train on one CPU process (no Ray);
    `resume_from`: a checkpoint to resume from, as the worker restores one; `keep`: copy each
    epoch's checkpoint there (as epoch<N>). Returns every epoch's report."""
    spec = parse_spec(tree)
    plan = build_plan(spec)
    torch.manual_seed(spec.loop.seed)
    model = build_model(spec.model, len(plan.class_names), image_size=spec.data.image_size)
    resume = None
    if resume_from is not None:
        meta = load_meta(resume_from)
        model.load_state_dict(load_twins(resume_from, meta)[0])
        resume = Resume(train_state=load_train_state(resume_from), meta=meta)
    train_tf = build_transform(plan.data_config, True, spec.data)
    eval_tf = build_transform(plan.data_config, False)
    seed = spec.loop.seed
    train_loader = build_train_loader(plan.train, train_tf, BATCH, 0, 1, seed, 0)
    val_loader = build_eval_loader(plan.val, eval_tf, 128, 0, 1, 0)
    target = build_target_loader(plan.target, train_tf, BATCH, 0, 1, seed, 0) if plan.target else None
    source_val = build_eval_loader(plan.source_val, eval_tf, 128, 0, 1, 0) if plan.source_val else None
    reports: list[dict[str, Any]] = []

    def report(metrics: dict[str, Any], checkpoint_dir: str | None) -> None:
        reports.append(metrics)
        if keep is not None and checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, keep / f"epoch{metrics['epoch']}")

    train(spec, model, layer_groups(model), train_loader, val_loader, device=torch.device("cpu"),
          num_classes=len(plan.class_names), report=report, resume=resume, target_loader=target,
          source_val_loader=source_val)  # fmt: skip
    return reports


def test_mmd_beats_source_only_on_the_shifted_target(shift_folders: tuple[str, str, str], tmp_path: Path) -> None:
    """Same model, data, steps and seed; the adapted run also sees the unlabelled target images.
    Target val accuracy after the last epoch, mean of 2 seeds: >= 2 points better."""
    margins = []
    for seed in (0, 1):
        plain = _train_in_process(_tree(shift_folders, tmp_path, method=None, seed=seed))[-1]
        adapted = _train_in_process(_tree(shift_folders, tmp_path, method="mmd", seed=seed, weight=1.0))[-1]
        assert adapted[ALIGN_LOSS] > 0 and ALIGN_LOSS not in plain
        margins.append(adapted[VAL_ACC] - plain[VAL_ACC])
        print(f"seed {seed}: source-only {plain[VAL_ACC]:.3f}, mmd {adapted[VAL_ACC]:.3f}")
    mean = sum(margins) / len(margins)
    print(f"mmd (weight 1, 4 epochs, test_resnet 32px) beats source-only by {100 * mean:.1f} points (mean of 2 seeds)")
    assert mean >= 0.02, margins


def test_resume_continues_the_discriminator_exactly(shift_folders: tuple[str, str, str], tmp_path: Path) -> None:
    """2 epochs straight vs resuming the same run from its epoch-1 checkpoint: the same
    discriminator after epoch 2 (its weights come back from train_state.pt, its optimizer state
    with the optimizer's), the same model, the same alignment loss (the target stream too)."""

    def tree(epochs: int) -> dict[str, Any]:
        t = _tree(shift_folders, tmp_path, method="dann", epochs=epochs, discriminator_hidden=16)
        t["loop"]["max_steps_per_epoch"] = 3
        t["data"]["source_val_fraction"] = 0.1
        t["schedule"] = {"kind": "constant"}
        return t

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    reports = _train_in_process(tree(2), keep=straight)
    assert split_metric(Split.SOURCE_VAL, VAL_ACC) in reports[-1], sorted(reports[-1])
    assert any(k.endswith("_discriminator") for k in reports[-1]), sorted(reports[-1])
    again = _train_in_process(tree(2), resume_from=straight / "epoch1", keep=resumed)
    assert [r["epoch"] for r in again] == [2]
    expected, got = load_train_state(straight / "epoch2"), load_train_state(resumed / "epoch2")
    assert expected is not None and got is not None
    assert set(got[DISCRIMINATOR_STATE]) == set(expected[DISCRIMINATOR_STATE])
    for key, value in expected[DISCRIMINATOR_STATE].items():
        torch.testing.assert_close(got[DISCRIMINATOR_STATE][key], value)
    weights = [load_twins(d / "epoch2", load_meta(d / "epoch2"))[0] for d in (straight, resumed)]
    torch.testing.assert_close(weights[1], weights[0])
    assert again[-1][ALIGN_LOSS] == pytest.approx(reports[-1][ALIGN_LOSS])

    # Re-running the name with DANN turned off, or another discriminator width: a DANN checkpoint
    # fits only the same DANN (its optimizer has the discriminator's param group); refused before
    # Ray, naming the field.
    stored = "checkpoint_2026-01-01_00-00-00.000000"
    shutil.copytree(straight / "epoch2", tmp_path / "runs" / "da" / stored)
    for method in ("mmd", None):
        with pytest.raises(
            SpecError,
            match=r"strategy\.domain_adaptation: da exists in storage .* holds a 16-wide DANN discriminator, .* needs none",
        ):
            build_plan(parse_spec(_tree(shift_folders, tmp_path, method=method, epochs=2)))
    wider = tree(2)
    wider["strategy"]["domain_adaptation"]["discriminator_hidden"] = 32
    with pytest.raises(
        SpecError,
        match=r"strategy\.domain_adaptation: da exists .* holds a 16-wide DANN .* needs a 32-wide DANN discriminator",
    ):
        build_plan(parse_spec(wider))
    build_plan(parse_spec(tree(2)))


def test_a_source_only_run_reports_source_accuracy_and_resumes_only_without_dann(
    shift_folders: tuple[str, str, str], tmp_path: Path
) -> None:
    """The baseline of a domain-adaptation table scores the same held-out source images; its
    checkpoint has no discriminator, so resuming it under dann is refused before Ray (mmd may)."""
    plain = _tree(shift_folders, tmp_path, method=None, epochs=1)
    plain["loop"]["max_steps_per_epoch"] = 2
    plain["data"]["source_val_fraction"] = 0.1
    kept = tmp_path / "kept"
    report = _train_in_process(plain, keep=kept)[-1]
    assert 0.0 <= report[split_metric(Split.SOURCE_VAL, VAL_ACC)] <= 1.0 and ALIGN_LOSS not in report
    shutil.copytree(kept / "epoch1", tmp_path / "runs" / "da" / "checkpoint_2026-01-01_00-00-00.000000")
    with pytest.raises(
        SpecError,
        match=r"strategy\.domain_adaptation: da exists .* no domain adaptation; .* holds none, .* needs a 1024-wide",
    ):
        build_plan(parse_spec(_tree(shift_folders, tmp_path, method="dann", epochs=1)))
    build_plan(parse_spec(_tree(shift_folders, tmp_path, method="mmd", epochs=1)))


def test_a_source_only_baseline_scores_the_source_domain_too(shift_folders: tuple[str, str, str],
                                                            tmp_path: Path) -> None:  # fmt: skip
    """The baseline of a domain-adaptation table reports the same two numbers as the adapted run:
    the same seeded share of data.train held out as val_source/*, no target images anywhere."""
    tree = _tree(shift_folders, tmp_path, method=None)
    tree["data"]["source_val_fraction"] = 0.1
    plan = build_plan(parse_spec(tree))
    adapted = _tree(shift_folders, tmp_path, method="mmd")
    adapted["data"]["source_val_fraction"] = 0.1
    assert plan.source_val == build_plan(parse_spec(adapted)).source_val
    assert len(plan.source_val) == 100 and len(plan.train) == 900 and not plan.target
    assert not {p for p, _ in plan.source_val} & {p for p, _ in plan.train}


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda t: t["data"].update(target_unlabelled="/x"), "data.target_unlabelled"),
        (lambda t: t.update(strategy={"domain_adaptation": {"method": "mmd"}}), "data.target_unlabelled"),
        # data.val_fraction already scores the training domain: a second share of it says nothing new.
        (lambda t: t["data"].update(val=None, val_fraction=0.2, source_val_fraction=0.1), "data.source_val_fraction"),
        (lambda t: t["data"].update(source_val_fraction=0.1, decode="nvjpeg"), "data.source_val_fraction"),
    ],
)
def test_one_without_the_other_is_refused(shift_folders: tuple[str, str, str], tmp_path: Path, change: Any,
                                          field: str) -> None:  # fmt: skip
    tree = _tree(shift_folders, tmp_path, method=None)
    change(tree)
    with pytest.raises(SpecError, match=field.replace(".", r"\.")):
        parse_spec(tree)


def test_bad_target_folders_and_models_are_refused_before_ray(
    shift_folders: tuple[str, str, str], tmp_path: Path
) -> None:
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    broken = tmp_path / "broken"
    shutil.copytree(shift_folders[1], broken)
    (broken / "zz-broken.png").write_bytes(b"\x89PNG not really")
    few = tmp_path / "few"
    few.mkdir()
    for p in sorted(Path(shift_folders[1]).iterdir())[:3]:
        shutil.copy(p, few / p.name)
    cases = [
        ({"data": {"target_unlabelled": str(empty)}}, r"data\.target_unlabelled: .* holds no image files"),
        ({"data": {"target_unlabelled": str(tmp_path / "missing")}}, r"data\.target_unlabelled: folder .* not exist"),
        ({"data": {"target_unlabelled": str(broken)}}, r"data\.target_unlabelled: .*zz-broken\.png"),
        ({"data": {"target_unlabelled": str(few)}}, r"data\.target_unlabelled: 3 readable images"),
        ({"model": {"name": "torchvision:resnet18"}}, r"strategy\.domain_adaptation: the pooled features"),
    ]
    for change, message in cases:
        tree = _tree(shift_folders, tmp_path, method="dann")
        for section, values in change.items():
            tree[section].update(values)
        with pytest.raises(SpecError, match=message):
            build_plan(parse_spec(tree))
    with pytest.raises(SpecError, match=r"data\.target_unlabelled streams target images through the CPU"):
        tree = _tree(shift_folders, tmp_path, method="mmd")
        tree["data"].update(format="shards", prepared=str(tmp_path))
        parse_spec(tree)


def test_the_spec_s_domain_fields_reach_mlflow_params(shift_folders: tuple[str, str, str], tmp_path: Path) -> None:
    params = flatten_spec(parse_spec(_tree(shift_folders, tmp_path, method="coral", weight=0.5)).to_dict())
    assert params["strategy.domain_adaptation.method"] == "coral"
    assert params["strategy.domain_adaptation.weight"] == "0.5"
    assert params["data.target_unlabelled"] == shift_folders[1]


@pytest.mark.integration
def test_tltrain_tune_searches_the_method_on_two_ray_workers(
    shift_folders: tuple[str, str, str], tmp_path: Path
) -> None:
    """`tltrain tune` over strategy.domain_adaptation.{method, weight}: each trial a 2-worker DDP
    run on a local Ray (gloo; MMD's all-gather across ranks, DANN's discriminator in DDP)."""
    tree = _tree(shift_folders, tmp_path, method="mmd", epochs=1, discriminator_hidden=16)
    tree["name"] = "da-sweep"
    tree["data"]["source_val_fraction"] = 0.1
    tree["loop"]["max_steps_per_epoch"] = 4
    tree["scaling"] = {"num_workers": 2, "batch_size_per_worker": 16, "address": "local"}
    tree["tune"] = {
        "num_samples": 2,
        "seed": 1,  # draws both methods
        "scheduler": {"kind": "fifo"},
        "space": {
            "strategy.domain_adaptation.method": {"choice": ["mmd", "dann"]},
            "strategy.domain_adaptation.weight": {"loguniform": [0.1, 3.0]},
        },
    }
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(yaml.safe_dump(tree))
    res = subprocess.run([sys.executable, "-m", "tltrain.cli", "tune", str(spec_path), "--json"], cwd=tmp_path,
                         capture_output=True, text=True, timeout=600)  # fmt: skip
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    summary = json.loads(res.stdout.strip().splitlines()[-1])
    trials = summary["trials"]
    assert sorted(t["config"]["strategy.domain_adaptation.method"] for t in trials) == ["dann", "mmd"], trials
    for trial in trials:
        meta = load_meta(trial["best_checkpoint"])
        method = meta.spec["strategy"]["domain_adaptation"]["method"]
        assert method == trial["config"]["strategy.domain_adaptation.method"] and meta.epoch == 1
        assert meta.metrics[ALIGN_LOSS] > 0 and split_metric(Split.SOURCE_VAL, VAL_ACC) in meta.metrics
        state = load_train_state(trial["best_checkpoint"])
        assert state is not None and (DISCRIMINATOR_STATE in state) == (method == "dann"), method
        assert meta.dataset_fingerprint is not None
        assert meta.dataset_fingerprint["target_unlabelled"]["num_files"] == 1000
        # The registry's version tags come from this meta: the target images and the method are lineage.
        tags = lineage_tags(meta)
        assert tags["target_num_files"] == "1000"
        assert tags["target_sha256"] == meta.dataset_fingerprint["target_unlabelled"]["sha256"]
        assert json.loads(tags["domain_adaptation"])["method"] == method and "lora" not in tags


def test_the_held_out_target_test_split_leaves_val_as_it_was(tmp_path: Path) -> None:
    """`test_per_class` adds target_test/ from t10k images val did not take; val stays the same files."""
    without = materialize_fashion_shift(str(tmp_path / "a"), 2, 2, 3, seed=0)
    source, target, val, test = materialize_fashion_shift(str(tmp_path / "b"), 2, 2, 3, seed=0, test_per_class=4)
    assert without[3] is None and test is not None

    def files(root: str) -> set[str]:
        return {str(p.relative_to(root)) for p in Path(root).rglob("*.png")}

    assert files(val) == files(without[2]) and len(files(val)) == 30
    assert files(source) == files(without[0]) and files(target) == files(without[1])
    assert len(files(test)) == 40 and all(len(list(d.iterdir())) == 4 for d in Path(test).iterdir())
    assert not {Path(f).name for f in files(test)} & {Path(f).name for f in files(val)}  # t10k indices


def test_compare_s_baselines_are_source_only(shift_folders: tuple[str, str, str], tmp_path: Path) -> None:
    """`tltrain compare` on a domain-adaptation spec: the recipe rung adapts, the baselines are
    source-only, and every rung scores the same source-domain share."""
    from tltrain.spec.rungs import RECIPE, rung_specs

    tree = _tree(shift_folders, tmp_path, method="mmd")
    tree["model"]["weights"] = "hub"  # compare needs source weights; the rungs are only parsed here
    tree["data"]["source_val_fraction"] = 0.1
    rungs = rung_specs(parse_spec(tree))
    assert rungs[RECIPE].strategy.domain_adaptation is not None
    for rung, spec in rungs.items():
        assert spec.data.source_val_fraction == 0.1
        if rung != RECIPE:
            assert spec.strategy.domain_adaptation is None and spec.data.target_unlabelled is None, rung
