"""The job spec: typed, validated, with defaults and a description per field.

No torch or Ray import here, so a spec can be checked before anything heavy loads.
Every setting the service has lives in one of these models; other modules read
fields, never `dict.get(key, default)`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tltrain.spec import metrics
from tltrain.spec.packing import GPU_GRANULARITY, GPU_MEMORY_SHARE, MAX_AUTO_TRIALS_PER_GPU, MAX_TRIALS_PER_GPU
from tltrain.spec.space import parse_distribution

DEFAULT_STORE_DIR = "~/.tltrain"
# model.name of a torchvision model: torchvision:<name> (anything else is a timm name).
TORCHVISION_PREFIX = "torchvision:"
# `tltrain rank`'s transferability scores (core/transferability computes them); higher is better.
RankScore = Literal["logme", "leep", "nce", "h_score"]
RANK_SCORES: tuple[RankScore, ...] = ("logme", "leep", "nce", "h_score")


class SpecError(ValueError):
    """A job spec (or a `--set` override) is invalid; the message names the field and the fix."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


FreezeDepth = int | Literal["all"]


class ModelSpec(_Section):
    name: str = Field(description="timm model name, or torchvision:<name>")
    weights: str | None = Field(
        default=None,
        description='source weights: local path | s3:// URI | "hub" (timm/torchvision download) | null (from scratch)',
    )
    weights_remap: bool = Field(
        default=False,
        description="load weights whose tensor names differ but whose shapes match in order (e.g. packaged "
        "EfficientNet-Lite0 .pth into timm's tf_efficientnet_lite0)",
    )
    drop_rate: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout before the new head")
    drop_path_rate: float = Field(
        default=0.0,
        ge=0.0,
        lt=1.0,
        description="stochastic depth: the deepest residual block is skipped with this probability (timm "
        "drop_path_rate; torchvision stochastic_depth_prob); refused for models without it",
    )


class DataSpec(_Section):
    train: str = Field(description="ImageFolder root (<class>/<image>): local path or s3:// URI")
    val: str | None = Field(default=None, description="ImageFolder root for validation; or set val_fraction")
    val_fraction: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="seeded per-class split of train used for validation when val is unset",
    )
    test: str | None = Field(
        default=None,
        description="ImageFolder root of a held-out test split: never used for any choice, evaluated once at the "
        "end on the selected checkpoint; or set test_fraction",
    )
    test_fraction: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="stratified per-class share of data.train held out as the test split, drawn with split_seed "
        "before the val split (so it never moves with loop.seed or a searched knob)",
    )
    split_seed: int = Field(
        default=0,
        description="seed of the val_fraction split and the max_images_per_class cap; apart from loop.seed so "
        "that searching or changing loop.seed never moves the validation set",
    )
    image_size: int | None = Field(
        default=None, ge=16, le=1024, description="train/eval resolution; null = the model's pretrained config"
    )
    augment: Literal["none", "light", "randaugment", "trivialaugment"] = Field(
        default="light",
        description="none = resize+crop; light = random-resized-crop + flip; randaugment = timm rand-m9; "
        "trivialaugment = torchvision TrivialAugmentWide (one random op per image, no magnitude to tune)",
    )
    crop_scale: tuple[float, float] | None = Field(
        default=None,
        description="random-resized-crop area range [low, high] (fractions of the image); null = 0.5-1 for light, "
        "timm's ImageNet 0.08-1 for randaugment and trivialaugment",
    )
    orientation: Literal["natural", "dihedral"] = Field(
        default="natural",
        description="natural = horizontal flips only (photos have an up); dihedral = any of the 8 flips and 90 "
        "degree rotations, for industrial, medical, satellite and microscopy images",
    )
    random_erasing: float = Field(
        default=0.0, ge=0.0, le=1.0, description="probability of erasing a random box of each training image (timm)"
    )
    sampler: Literal["shuffle", "balanced"] = Field(
        default="shuffle",
        description="shuffle = each image once per epoch; balanced = classes drawn equally often (with "
        "replacement), the same number of batches on every rank",
    )
    tta: Literal["none", "flip", "dihedral"] = Field(
        default="none",
        description="test-time augmentation of the test split (and the registered model): flip = average over "
        "the image and its mirror; dihedral = over the 8 orientations (needs orientation dihedral)",
    )
    loader_workers: int = Field(default=2, ge=0, description="DataLoader worker processes per Ray worker")
    on_bad_image: Literal["error", "skip"] = Field(
        default="error",
        description="an unreadable image: error = reject the job up front; skip = drop it with a counted warning",
    )
    max_images_per_class: int | None = Field(
        default=None, ge=1, description="use at most this many training images per class (seeded); null = all"
    )
    cache_dir: str = Field(
        default=f"{DEFAULT_STORE_DIR}/cache", description="local directory where s3:// datasets are downloaded once"
    )
    format: Literal["imagefolder", "shards"] = Field(
        default="imagefolder",
        description="imagefolder = decode + augment each image on CPU every epoch; shards = read the uint8 shards "
        "of `tltrain prepare` (data.prepared), crop/flip/normalize on the worker's device",
    )
    prepared: str | None = Field(
        default=None, description="URI (local dir or s3://) written by `tltrain prepare`; required by format: shards"
    )
    decode: Literal["cpu", "nvjpeg"] = Field(
        default="cpu",
        description="imagefolder only: nvjpeg = loader workers read file bytes, JPEGs decode and augment on the GPU",
    )
    target_unlabelled: str | None = Field(
        default=None,
        description="domain adaptation: a folder or s3:// prefix of unlabelled target-domain images (any images "
        "under it, recursively; no class folders), streamed beside every labelled batch; needs "
        "strategy.domain_adaptation",
    )
    source_val_fraction: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="a seeded per-class share of data.train (split_seed) held out and scored every epoch as "
        "val_source/* (source-domain accuracy, beside data.val's target-domain val/*; needs data.val): domain "
        "adaptation runs and their source-only baselines report the same two numbers; null = none",
    )

    @model_validator(mode="after")
    def _device_data_path(self) -> DataSpec:
        if self.format == "shards" and self.prepared is None:
            raise ValueError("data.format shards needs data.prepared (the URI given to `tltrain prepare --out`)")
        if (self.format == "shards" or self.decode == "nvjpeg") and self.augment == "randaugment":
            raise ValueError(
                "data.augment randaugment runs on CPU only: use data.format imagefolder with data.decode cpu"
            )
        if (self.format == "shards" or self.decode == "nvjpeg") and (
            self.augment == "trivialaugment" or self.random_erasing > 0
        ):
            raise ValueError(
                "data.augment trivialaugment and data.random_erasing run on CPU only: use data.format imagefolder "
                "with data.decode cpu"
            )
        if self.test is not None and self.test_fraction is not None:
            raise ValueError("data: set either data.test or data.test_fraction, not both")
        if self.crop_scale is not None and not 0.0 < self.crop_scale[0] <= self.crop_scale[1] <= 1.0:
            raise ValueError(f"data.crop_scale {list(self.crop_scale)}: need 0 < low <= high <= 1, e.g. [0.5, 1.0]")
        if self.crop_scale is not None and self.augment == "none":
            raise ValueError(
                "data.crop_scale sets the random crops of data.augment light, randaugment or trivialaugment; "
                "augment none takes the centre crop: pick one of those or drop data.crop_scale"
            )
        if self.test is not None and self.test in (self.train, self.val):
            raise ValueError(
                f"data.test {self.test} is also data.{'train' if self.test == self.train else 'val'}: a test split must "
                "hold images no choice was made on; point it at a separate folder or use data.test_fraction"
            )
        if self.tta == "dihedral" and self.orientation != "dihedral":
            raise ValueError(
                "data.tta dihedral averages over rotations the model never saw: set data.orientation dihedral, "
                "or use data.tta flip"
            )
        if self.format == "shards" and self.decode != "cpu":
            raise ValueError("data.decode applies to data.format imagefolder (shards are already decoded)")
        for name in ("target_unlabelled", "source_val_fraction"):
            if getattr(self, name) is not None and (self.format != "imagefolder" or self.decode != "cpu"):
                what = "streams target images" if name == "target_unlabelled" else "scores its share of data.train"
                raise ValueError(
                    f"data.{name} {what} through the CPU loaders: use data.format imagefolder with data.decode cpu"
                )
        if self.source_val_fraction is not None and self.val is None:
            raise ValueError(
                "data.source_val_fraction scores a share of data.train beside data.val, another domain's labelled "
                "images: set data.val (e.g. labelled target-domain images), or drop data.source_val_fraction "
                "(data.val_fraction already scores the training domain)"
            )
        return self


class LoraSpec(_Section):
    rank: int = Field(default=8, ge=1, le=256, description="LoRA rank r: adapter A is r x in, B is out x r")
    alpha: float = Field(default=16.0, gt=0.0, description="LoRA scaling: the update is (alpha / rank) * B @ A")
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0, description="dropout on the adapters' input")
    targets: Literal["auto"] | list[str] = Field(
        default="auto",
        description='modules to adapt: "auto" = every nn.Linear (ViT qkv/proj/fc1/fc2) and 1x1 nn.Conv2d (a CNN\'s '
        'pointwise convolutions) above freeze_depth; or fnmatch patterns over full module names ("*.qkv")',
    )

    @field_validator("targets", mode="before")
    @classmethod
    def _one_pattern(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) and v != "auto" else v  # "*.qkv" means ["*.qkv"]

    @field_validator("targets")
    @classmethod
    def _some_targets(cls, v: Literal["auto"] | list[str]) -> Literal["auto"] | list[str]:
        if isinstance(v, list) and not v:
            raise ValueError('list at least one module-name pattern (e.g. "*.qkv"), or use "auto"')
        return v


class DomainAdaptationSpec(_Section):
    method: Literal["dann", "mmd", "coral"] = Field(
        description="feature alignment of source and target batches: dann = a domain discriminator behind gradient "
        "reversal (Ganin & Lempitsky); mmd = multi-kernel MMD on the global batch (DAN); coral = covariance "
        "distance on the global batch (Deep CORAL)"
    )
    weight: float = Field(default=1.0, ge=0.0, description="loss = CE + weight x ramp x alignment loss")
    warmup_epochs: float = Field(
        default=0.0,
        ge=0.0,
        description="the alignment term ramps in linearly from 0 to its full weight over this many epochs (fractions "
        "allowed; 0 = full from the first step). dann: the ramp scales the reversed gradient, so the "
        "discriminator itself trains from the first step",
    )
    grl_gamma: float = Field(
        default=10.0,
        gt=0.0,
        description="dann: the gradient reversal coefficient follows 2 / (1 + exp(-gamma p)) - 1 over training "
        "progress p = global_step / total steps (the papers' 10)",
    )
    discriminator_hidden: int = Field(
        default=1024,
        ge=1,
        description="dann: hidden width of the 2-hidden-layer domain discriminator (the papers' 1024 for "
        "ResNet-sized features; ~100 for features under 256)",
    )
    discriminator_lr_mult: float = Field(
        default=1.0,
        gt=0.0,
        description="dann: the discriminator's LR as a multiple of optim.lr x strategy.head_lr_mult (it starts from "
        "random like the head), on the run's schedule",
    )


class StrategySpec(_Section):
    freeze_depth: FreezeDepth = Field(
        default=0,
        description='first N layer groups frozen, counted from the stem; 0 = full fine-tune; "all" = feature extraction',
    )
    layer_decay: float | None = Field(
        default=None, gt=0.0, le=1.0, description="LR x decay^k for the group k steps below the top; null = one LR"
    )
    head_lr_mult: float = Field(default=1.0, gt=0.0, description="LR multiplier for the new classification head")
    group_granularity: Literal["coarse", "fine"] = Field(
        default="coarse", description="layer groups from timm's group_matcher: coarse = stages, fine = blocks"
    )
    unfreeze: dict[int, FreezeDepth] = Field(
        default_factory=dict, description="progressive unfreezing: {epoch: freeze_depth from that epoch on}"
    )
    lora: LoraSpec | None = Field(
        default=None,
        description="parameter-efficient fine-tuning: LoRA adapters (peft) on the groups above freeze_depth, "
        "their base weights frozen, the head trained fully; checkpoints hold only what was trained",
    )
    domain_adaptation: DomainAdaptationSpec | None = Field(
        default=None,
        description="unsupervised domain adaptation: align the pooled features of data.train with those of "
        "data.target_unlabelled (timm models only); null = off",
    )

    @model_validator(mode="after")
    def _lora_fixed_depth(self) -> StrategySpec:
        if self.lora is not None and self.unfreeze:
            raise ValueError(
                "strategy.unfreeze with strategy.lora: adapters sit on the groups above freeze_depth, fixed for the "
                "run; drop strategy.unfreeze (or strategy.lora)"
            )
        return self

    @field_validator("freeze_depth")
    @classmethod
    def _non_negative(cls, v: FreezeDepth) -> FreezeDepth:
        if isinstance(v, int) and v < 0:
            raise ValueError('must be >= 0 (0 = full fine-tune) or "all"')
        return v

    @field_validator("unfreeze")
    @classmethod
    def _unfreeze_epochs(cls, v: dict[int, FreezeDepth]) -> dict[int, FreezeDepth]:
        for epoch, depth in v.items():
            if epoch < 0:
                raise ValueError(f"epoch {epoch} must be >= 0")
            if isinstance(depth, int) and depth < 0:
                raise ValueError(f"depth for epoch {epoch} must be >= 0 or 'all'")
        return dict(sorted(v.items()))


_DEFAULT_WEIGHT_DECAY = {"adamw": 0.05, "sgd": 1e-4}


class OptimSpec(_Section):
    name: Literal["adamw", "sgd"] = Field(default="adamw", description="optimizer")
    lr: float = Field(default=3e-4, gt=0.0, description="base LR (the top layer group; head gets x head_lr_mult)")
    weight_decay: float | None = Field(
        default=None,
        ge=0.0,
        description="null = the optimizer's default: adamw 0.05 (decoupled, AdamW's own), sgd 1e-4 (L2 in the "
        "gradient, as torch.optim.SGD applies it); never applied to norms and biases",
    )
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0, description="SGD momentum")
    nesterov: bool = Field(default=False, description="SGD: Nesterov momentum (needs momentum > 0)")
    betas: tuple[float, float] = Field(default=(0.9, 0.999), description="AdamW betas")

    @model_validator(mode="after")
    def _nesterov_needs_momentum(self) -> OptimSpec:
        if self.nesterov and (self.name != "sgd" or self.momentum == 0):
            raise ValueError("optim.nesterov: only for optim.name sgd with optim.momentum > 0")
        return self

    @property
    def effective_weight_decay(self) -> float:
        """weight_decay, or the optimizer's default: the two mean different things (AdamW decays
        the weights directly; SGD adds decay x weight to the gradient), so they do not share one."""
        if self.weight_decay is not None:
            return self.weight_decay
        return _DEFAULT_WEIGHT_DECAY[self.name]


class ScheduleSpec(_Section):
    kind: Literal["cosine", "linear", "constant"] = Field(default="cosine", description="decay after warmup")
    warmup_epochs: float = Field(default=0.0, ge=0.0, description="linear warmup from 0, in epochs (fractions allowed)")
    min_lr_ratio: float = Field(default=0.0, ge=0.0, le=1.0, description="final LR as a fraction of the base LR")


class LoopSpec(_Section):
    epochs: int = Field(default=10, ge=1, description="training epochs")
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="autocast dtype; fp16 adds a GradScaler; bf16 on CPU is slow on old CPUs"
    )
    grad_accum: int = Field(default=1, ge=1, description="micro-batches per optimizer step (DDP sync on the last only)")
    clip_grad_norm: float | None = Field(default=None, gt=0.0, description="clip the global grad norm; null = off")
    early_stop_patience: int | None = Field(
        default=None, ge=1, description="stop after this many evals without improving storage.metric; null = off"
    )
    seed: int = Field(default=0, description="seed for init, split, shuffling and augmentation")
    max_steps_per_epoch: int | None = Field(
        default=None, ge=1, description="cap optimizer steps per epoch (quick runs); null = whole epoch"
    )
    channels_last: bool = Field(default=True, description="NHWC memory format on GPU (faster convs)")
    compile: bool = Field(default=False, description="torch.compile the model (GPU)")
    tf32: bool = Field(
        default=True, description="fp32 matmuls/convolutions on CUDA use TF32 tensor cores (Ampere and later)"
    )
    label_smoothing: float = Field(default=0.0, ge=0.0, lt=1.0, description="cross-entropy label smoothing")
    ema_decay: float | None = Field(
        default=None,
        gt=0.0,
        lt=1.0,
        description="keep an exponential moving average of the weights (timm ModelEmaV3, e.g. 0.999), evaluated "
        "each epoch beside the raw weights; each checkpoint exports whichever of the two scores better by "
        "storage.metric; null = off",
    )
    mixup_alpha: float = Field(
        default=0.0, ge=0.0, description="mixup: Beta(alpha, alpha) blend of image pairs and their labels; 0 = off"
    )
    cutmix_alpha: float = Field(
        default=0.0, ge=0.0, description="cutmix: paste a Beta(alpha, alpha)-sized box from another image; 0 = off"
    )
    mix_prob: float = Field(default=1.0, gt=0.0, le=1.0, description="share of batches mixed (mixup/cutmix on)")
    mix_switch_prob: float = Field(
        default=0.5, ge=0.0, le=1.0, description="with both on: probability a mixed batch uses cutmix over mixup"
    )
    class_weights: Literal["balanced"] | dict[str, float] | None = Field(
        default=None,
        description='loss weight per class: "balanced" = inverse class frequency in the train split (mean 1); '
        "{class name: weight} to set them (unlisted classes 1); null = all 1",
    )

    @field_validator("class_weights")
    @classmethod
    def _positive_weights(cls, v: Any) -> Any:
        if isinstance(v, dict):
            bad = {k: w for k, w in v.items() if not w > 0}
            if bad:
                raise ValueError(f"class weights must be > 0: {bad}")
        return v

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup and/or cutmix): the loss then takes soft targets."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0


class ScalingSpec(_Section):
    num_workers: int = Field(default=1, ge=1, description="Ray Train workers (DDP ranks)")
    use_gpu: bool = Field(
        default=False, description="GPU workers (scaling.gpus_per_worker each), NCCL; false = CPU workers, gloo"
    )
    gpus_per_worker: float | None = Field(
        default=None,
        description="with use_gpu: the GPU share each worker reserves from Ray; null = 1; a fraction in (0, 1) "
        "lets Ray place several 1-worker runs (e.g. Tune trials) on one GPU, which then share its memory "
        "and compute (1-worker runs only; tune.trials_per_gpu sets it for a sweep)",
    )
    batch_size_per_worker: int = Field(default=32, ge=1, description="micro-batch size on each worker")
    cpus_per_worker: float = Field(default=1.0, gt=0.0, description="CPUs reserved per worker (data loading)")
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        default="PACK",
        description="where Ray places the workers: PACK = as few nodes as possible (fast NCCL within a node); "
        "SPREAD = across nodes (one node's loss takes fewer ranks); STRICT_* = must, or wait",
    )
    address: str | None = Field(
        default=None, description="Ray cluster address; null = RAY_ADDRESS or a local Ray started on demand"
    )

    @model_validator(mode="after")
    def _gpu_share(self) -> ScalingSpec:
        share = self.gpus_per_worker
        if share is None:
            return self
        if not self.use_gpu:
            raise ValueError(
                f"scaling.gpus_per_worker {share:g} is a GPU share, and scaling.use_gpu is false (CPU workers "
                "reserve no GPU): set scaling.use_gpu true, or drop scaling.gpus_per_worker"
            )
        if share > 1:
            raise ValueError(
                f"scaling.gpus_per_worker {share:g}: a worker drives one GPU; for more GPUs raise "
                "scaling.num_workers (one GPU each), or use a share in (0, 1] to put several runs on one GPU"
            )
        if share < GPU_GRANULARITY:
            raise ValueError(
                f"scaling.gpus_per_worker {share:g}: Ray's smallest resource unit is {GPU_GRANULARITY:g}; use a "
                f"share in [{GPU_GRANULARITY:g}, 1]"
            )
        if share < 1 and self.num_workers > 1:
            raise ValueError(
                f"scaling.gpus_per_worker {share:g} shares a GPU, which only a 1-worker run may do (Ray could put "
                f"two of the {self.num_workers} DDP ranks on one GPU, which NCCL refuses): use "
                "scaling.gpus_per_worker 1 with several workers, or scaling.num_workers 1"
            )
        return self


class StorageSpec(_Section):
    uri: str = Field(
        default=f"{DEFAULT_STORE_DIR}/runs", description="checkpoint root: local dir or s3://bucket/prefix"
    )
    keep: int = Field(default=2, ge=1, description="checkpoints kept: top-k by metric (the latest is kept too)")
    metric: str = Field(default=metrics.VAL_ACC, description="metric that ranks checkpoints and drives early stopping")
    mode: Literal["max", "min"] = Field(default="max", description="whether larger metric is better")
    max_failures: int = Field(default=2, ge=0, description="worker-group restarts from the latest checkpoint")

    @field_validator("metric")
    @classmethod
    def _reported(cls, v: str) -> str:
        return metrics.check_rankable(v)


class TrackingSpec(_Section):
    enabled: bool = Field(default=True, description="log to MLflow")
    uri: str | None = Field(
        default=None, description="MLflow tracking URI; null = MLFLOW_TRACKING_URI or sqlite under ~/.tltrain"
    )
    experiment: str = Field(default="tltrain", description="MLflow experiment name")
    registry_name: str | None = Field(default=None, description="register the best checkpoint under this model name")


Distribution = dict[str, list[Any]]


class SchedulerSpec(_Section):
    kind: Literal["asha", "fifo"] = Field(default="asha", description="trial scheduler")
    grace_epochs: int = Field(default=1, ge=1, description="ASHA: epochs every trial runs before it may be stopped")
    reduction_factor: float = Field(default=3, gt=1, description="ASHA: keep 1/reduction_factor of trials per rung")


class PrescreenSpec(_Section):
    score: RankScore = Field(default="logme", description="the transferability score candidates are ranked by")
    keep: int = Field(default=2, ge=1, description="how many of the best-scoring candidates the search keeps")


class TuneSpec(_Section):
    num_samples: int = Field(default=8, ge=1, description="trials to run")
    metric: str = Field(default=metrics.VAL_ACC, description="metric the search optimises")
    mode: Literal["max", "min"] = Field(default="max", description="whether larger metric is better")
    scheduler: SchedulerSpec = Field(default_factory=SchedulerSpec, description="early stopping of bad trials")
    searcher: Literal["random", "optuna"] = Field(default="random", description="how trials are sampled")
    seed: int = Field(default=0, description="searcher seed, so a search can be repeated")
    max_concurrent_trials: int | None = Field(
        default=None, ge=1, description="cap on trials at once; null = as resources allow"
    )
    trials_per_gpu: int | Literal["auto"] = Field(
        default=1,
        description="1-worker GPU trials packed onto one GPU: k = each trial reserves 1/k of a GPU, so Ray runs "
        f"up to k per GPU (1..{MAX_TRIALS_PER_GPU}); auto = k from training steps measured on a GPU before "
        f"the sweep (largest searched batch, at most {GPU_MEMORY_SHARE:.0%} of its memory, at most "
        f"{MAX_AUTO_TRIALS_PER_GPU}); 1 = a whole GPU per worker",
    )
    prescreen: PrescreenSpec | None = Field(
        default=None,
        description="rank the space's model.name or model.weights choices first (as `tltrain rank`, with the "
        "rank: section's sample settings) and search only the top `keep`; null = search every choice",
    )
    space: dict[str, Distribution | Literal["auto"]] = Field(
        default_factory=dict,
        description="dotted spec path -> {choice: [a, b, ...]} | {randint: [low, high]} (integers, both ends "
        "inclusive) | {uniform: [low, high]} | {loguniform: [low, high]} (0 < low) | auto (strategy.freeze_depth: "
        "every depth 0..the model's layer groups)",
    )

    @field_validator("metric")
    @classmethod
    def _reported(cls, v: str) -> str:
        return metrics.check_rankable(v)

    @field_validator("trials_per_gpu")
    @classmethod
    def _packing_bounds(cls, v: int | str) -> int | str:
        if isinstance(v, int) and not 1 <= v <= MAX_TRIALS_PER_GPU:
            raise ValueError(
                f"{v} trials per GPU: use 1..{MAX_TRIALS_PER_GPU} (past that, Ray's {GPU_GRANULARITY:g} resource units "
                'cannot give k trials exactly 1/k each), or "auto" to size it by measured memory'
            )
        return v

    @field_validator("space", mode="before")
    @classmethod
    def _distributions(cls, v: Any) -> Any:
        # Shape only (kind, arity, bounds); which keys exist and what values they take is checked
        # against the spec and the model by spec.search.validate_space before a sweep starts.
        if isinstance(v, dict):
            for key, raw in v.items():
                parse_distribution(str(key), raw)
        return v


class RankCandidate(_Section):
    name: str = Field(description="timm model name (as model.name)")
    weights: str | None = Field(
        default=None,
        description='source weights, as model.weights: local path | s3:// URI | "hub" | null (random init)',
    )
    weights_remap: bool = Field(default=False, description="as model.weights_remap: pair the file's tensors in order")
    label: str | None = Field(default=None, description="the candidate's name in the table; default name:weights")

    def title(self) -> str:
        if self.label:
            return self.label
        source = "random" if self.weights is None else Path(self.weights).name if "/" in self.weights else self.weights
        return f"{self.name}:{source}"


class RankSpec(_Section):
    candidates: list[RankCandidate] = Field(
        default_factory=list,
        description="source models to rank, each {name, weights, weights_remap, label}; empty = the spec's model",
    )
    sample_per_class: int = Field(
        default=20,
        ge=2,
        description="training images per class to score (seeded, class-stratified; fewer where a class has fewer)",
    )
    seed: int = Field(default=0, description="seed of the sample, so a ranking can be repeated")
    scores: list[RankScore] = Field(
        default_factory=lambda: list(RANK_SCORES),
        description="scores to compute: logme, leep, nce (these two need the weights' source head; skipped with a "
        "note where there is none unless listed here explicitly), h_score",
    )
    sort_by: RankScore = Field(default="logme", description="the score the table is ordered by, best first")
    batch_size: int = Field(default=64, ge=1, description="images per forward pass while extracting features")

    @model_validator(mode="after")
    def _sort_by_computed(self) -> RankSpec:
        if not self.scores:
            raise ValueError("rank.scores: list at least one of " + ", ".join(RANK_SCORES))
        if self.sort_by not in self.scores:
            raise ValueError(f"rank.sort_by: {self.sort_by} is not in rank.scores {self.scores}; add it or sort by one")
        return self


class JobSpec(_Section):
    name: str = Field(description="run name; re-running the same name resumes it")
    model: ModelSpec
    data: DataSpec
    strategy: StrategySpec = Field(default_factory=StrategySpec)
    optim: OptimSpec = Field(default_factory=OptimSpec)
    schedule: ScheduleSpec = Field(default_factory=ScheduleSpec)
    loop: LoopSpec = Field(default_factory=LoopSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    storage: StorageSpec = Field(default_factory=StorageSpec)
    tracking: TrackingSpec = Field(default_factory=TrackingSpec)
    tune: TuneSpec | None = Field(default=None, description="search settings, used by `tltrain tune`")
    rank: RankSpec | None = Field(default=None, description="transferability ranking, used by `tltrain rank`")

    @field_validator("name")
    @classmethod
    def _safe_name(cls, v: str) -> str:
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}", v):
            raise ValueError("use letters, digits, '.', '_' or '-' (it names directories and MLflow runs)")
        return v

    @model_validator(mode="after")
    def _val_source(self) -> JobSpec:
        if self.data.val is not None and self.data.val_fraction is not None:
            raise ValueError("data: set either data.val or data.val_fraction, not both")
        if self.data.val is None and self.data.val_fraction is None:
            raise ValueError("data: set data.val (a folder) or data.val_fraction (e.g. 0.1)")
        self._check_packing()
        if self.data.target_unlabelled is not None and self.strategy.domain_adaptation is None:
            raise ValueError(
                "data.target_unlabelled: target images are used only by strategy.domain_adaptation; set "
                "strategy.domain_adaptation {method: dann | mmd | coral}, or drop data.target_unlabelled"
            )
        if self.strategy.domain_adaptation is not None and self.data.target_unlabelled is None:
            raise ValueError(
                "strategy.domain_adaptation needs unlabelled target-domain images: set data.target_unlabelled "
                "(a folder or s3:// prefix of images), or drop strategy.domain_adaptation"
            )
        if self.loop.mixes and self.scaling.batch_size_per_worker % 2:
            raise ValueError(
                f"loop.mixup_alpha/cutmix_alpha mix each batch with its reverse (timm Mixup), which needs an even "
                f"scaling.batch_size_per_worker (got {self.scaling.batch_size_per_worker}): use 2 or more, even"
            )
        return self

    def _check_packing(self) -> None:
        """tune.trials_per_gpu shares a GPU between 1-worker GPU trials: it sets each trial's
        scaling.gpus_per_worker, so the two are not both set."""
        packing = self.tune.trials_per_gpu if self.tune is not None else 1
        if packing == 1:
            return
        if not self.scaling.use_gpu:
            raise ValueError(
                f"tune.trials_per_gpu {packing} packs trials onto GPUs, and scaling.use_gpu is false: set "
                "scaling.use_gpu true, or tune.trials_per_gpu 1 (CPU trials run as scaling.cpus_per_worker allows)"
            )
        if self.scaling.num_workers > 1:
            raise ValueError(
                f"tune.trials_per_gpu {packing} packs 1-worker trials onto a GPU, and scaling.num_workers is "
                f"{self.scaling.num_workers} (DDP ranks sharing a GPU: NCCL refuses them): set "
                "scaling.num_workers 1, or tune.trials_per_gpu 1"
            )
        if self.scaling.gpus_per_worker is not None:
            raise ValueError(
                f"tune.trials_per_gpu {packing} and scaling.gpus_per_worker {self.scaling.gpus_per_worker:g} both set "
                "a trial's GPU share: keep one (trials_per_gpu k = gpus_per_worker 1/k)"
            )

    def to_dict(self) -> dict[str, Any]:
        """The resolved spec as plain JSON types (saved with checkpoints and logged as params)."""
        return json.loads(self.model_dump_json())


def expand_path(path: str) -> str:
    """Expand ~ in local paths; URIs pass through unchanged."""
    return path if "://" in path else str(Path(path).expanduser())
