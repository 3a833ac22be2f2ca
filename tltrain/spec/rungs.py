"""The rungs of `tltrain compare`: the same job as a from-scratch run, a linear probe, a plain full
fine-tune, and the spec's own recipe.

Every rung keeps the spec's data (and so its val and test splits), model, budget (loop.epochs,
optimizer, schedule, batch, workers) and seed; only what transfer learning adds changes. The
baselines are "plain": none of the recipe's extras, so the table says what transfer bought and,
separately, what the recipe bought on top.
"""

from __future__ import annotations

from tltrain.spec.load import set_dotted
from tltrain.spec.schema import JobSpec

SCRATCH = "scratch"
PROBE = "linear-probe"
FINETUNE = "fine-tune"
RECIPE = "recipe"
RUNGS = (SCRATCH, PROBE, FINETUNE, RECIPE)

# The head learns from zero while the body only adapts: the usual 10x (timm's and torchvision's
# fine-tuning references use 10x for a new classifier).
PLAIN_HEAD_LR_MULT = 10.0

# What "no extras" means: every recipe knob at its off value.
_PLAIN = {
    "model.drop_path_rate": 0.0,
    "data.augment": "light",
    "data.crop_scale": None,
    "data.orientation": "natural",
    "data.random_erasing": 0.0,
    "data.sampler": "shuffle",
    "data.tta": "none",
    "loop.ema_decay": None,
    "loop.mixup_alpha": 0.0,
    "loop.cutmix_alpha": 0.0,
    "loop.label_smoothing": 0.0,
    "loop.class_weights": None,
    "strategy.layer_decay": None,
    "strategy.unfreeze": {},
    "strategy.group_granularity": "coarse",
    "strategy.lora": None,  # no adapters: scratch and fine-tune train every weight, the probe its head
    # Source-only baselines: no target images (data.source_val_fraction, if set, still scores the
    # source domain, so every rung reports both domains).
    "strategy.domain_adaptation": None,
    "data.target_unlabelled": None,
    "tracking.registry_name": None,
}


def rung_specs(spec: JobSpec, rungs: tuple[str, ...] = RUNGS) -> dict[str, JobSpec]:
    """{rung: its spec}, named <spec.name>-<rung>; only the recipe rung registers a model."""
    out = {}
    for rung in rungs:
        tree = spec.to_dict()
        tree["name"] = f"{spec.name}-{rung}"
        if rung != RECIPE:
            for key, value in _PLAIN.items():
                set_dotted(tree, key, value)
            set_dotted(tree, "strategy.freeze_depth", "all" if rung == PROBE else 0)
            set_dotted(tree, "strategy.head_lr_mult", 1.0 if rung == SCRATCH else PLAIN_HEAD_LR_MULT)
        if rung == SCRATCH:
            set_dotted(tree, "model.weights", None)
            set_dotted(tree, "model.weights_remap", False)
        out[rung] = JobSpec.model_validate(tree)
    return out


def describe(rung: str) -> str:
    """One line on what a rung is."""
    what: dict[str, str] = {
        SCRATCH: "random init, every layer at one LR, no extras",
        PROBE: f"source weights frozen, only the new head trains (x{PLAIN_HEAD_LR_MULT:g} LR), no extras",
        FINETUNE: f"every layer trains at one LR, the new head x{PLAIN_HEAD_LR_MULT:g}, no extras",
        RECIPE: "the spec as written",
    }
    return f"{rung}: {what[rung]}"
