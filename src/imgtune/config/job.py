"""Validated configuration of a training job: a YAML file plus `--set a.b=value` overrides.

Every field has a default, so `JobConfig(data=DataConfig(path=...))` is a complete job. Unknown keys are
errors, so a typo in a config file is caught before a long run starts.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from imgtune.core.errors import ConfigError

MAX_IMAGE_PIXELS = 64_000_000  # larger images are refused as possible decompression bombs


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Section):
    """Where the photos are and how they become tensors."""

    path: str = Field(description="Dataset root: a local folder or s3://bucket/prefix.")
    image_size: int = Field(224, ge=16, le=1024, description="Side of the square crop fed to the model.")
    split_ratios: tuple[float, float, float] = Field(
        (0.8, 0.1, 0.1), description="train/valid/test fractions for a single ROOT/CLASS/* folder."
    )
    carve_missing: bool = Field(
        False,
        description="Carve a missing valid or test split out of train (seeded) instead of going without.",
    )
    carve_fraction: float = Field(0.1, gt=0, lt=0.5, description="Fraction of train moved to a carved split.")
    split_seed: int = Field(0, description="Seed of the split and carve shuffles.")
    num_workers: int = Field(-1, ge=-1, le=64, description="Data loader worker processes; -1 = one per core.")
    max_image_pixels: int = Field(
        MAX_IMAGE_PIXELS, ge=1, description="Images with more pixels than this are refused as decompression bombs."
    )

    @field_validator("split_ratios")
    @classmethod
    def _ratios_sum_to_one(cls, ratios: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6 or ratios[0] <= 0:
            raise ValueError("split_ratios must be three non-negative fractions summing to 1, train > 0")
        return ratios


class ModelConfig(_Section):
    """The backbone, its weights and the new classification head."""

    backbone: str = Field("resnet50", description="torchvision model name, or timm model name.")
    pretrained: Literal["default", "none"] = Field(
        "default", description="'default': the library's ImageNet weights; 'none': random init."
    )
    weights: str | None = Field(None, description="Local state dict (.pth/.pt/.safetensors) for the backbone.")
    head: Literal["mlp", "linear"] = Field(
        "mlp",
        description="'mlp': Linear(features,hidden)-ReLU-Linear(hidden,N) as in the original; 'linear'.",
    )
    head_hidden: int = Field(128, ge=1, description="Width of the mlp head's hidden layer.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout before each head Linear.")
    freeze: Literal["backbone", "all_but_last", "none"] = Field(
        "backbone", description="What is frozen: the whole backbone, all but its last stage, or nothing."
    )
    # The names of imgtune.models.backends' registry (config may not import models; a test keeps them equal).
    backend: Literal[
        "auto", "eager", "channels_last", "bf16", "onnx", "int8", "openvino", "openvino-int8", "compile"
    ] = Field(
        "auto",
        description="Inference backend the frozen backbone computes features with and evaluation runs the model "
        "on: 'auto' takes the fastest on this device whose outputs agree with fp32 eager (measured once, "
        "remembered).",
    )

    @model_validator(mode="before")
    @classmethod
    def _inference_is_now_backend(cls, data: Any) -> Any:
        """Job configs written by older imgtune name the backend `inference`; an explicit `backend` wins (an
        old job resumed with --set model.backend=...)."""
        if isinstance(data, dict) and "inference" in data:
            data = dict(data)
            data.setdefault("backend", data.pop("inference"))
        return data


class EarlyStoppingConfig(_Section):
    enabled: bool = True
    metric: Literal["valid_accuracy", "valid_loss"] = "valid_loss"
    patience: int = Field(5, ge=1)
    min_delta: float = Field(0.0, ge=0.0)
    restore_best: bool = True


class TrainConfig(_Section):
    """The optimisation: epochs, optimizer, schedule, precision, feature cache."""

    epochs: int = Field(10, ge=1, le=100_000)
    batch_size: int = Field(64, ge=1, le=65_536)
    lr: float = Field(1e-3, gt=0, le=10)
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    momentum: float = Field(0.9, ge=0, lt=1, description="SGD momentum.")
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["none", "cosine", "step"] = "none"
    step_size: int = Field(5, ge=1, description="Epochs between decays of the step schedule.")
    gamma: float = Field(0.1, gt=0, le=1, description="Decay factor of the step schedule.")
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    mixed_precision: Literal["auto", "off", "bf16", "fp16"] = Field(
        "auto",
        description="'auto': bf16 autocast on CUDA where the GPU has it natively, else fp16; on a CPU with native "
        "bf16 (AVX512-BF16, AMX), bf16 for an unfrozen backbone trained on images; else off.",
    )
    channels_last: bool = Field(True, description="Train a network on images in NHWC memory format (faster convs).")
    compile: Literal["auto", "on", "off"] = Field(
        "auto",
        description="torch.compile for a network trained on images: 'auto' measures one epoch eager against one "
        "compiled in the first job of its kind with 20 minutes of training or more, remembers the faster and uses "
        "it in jobs long enough to pay a compile back; one process only.",
    )
    seed: int = 0
    deterministic: bool = Field(False, description="Deterministic algorithms (slower, bit-reproducible).")
    device: str = Field("auto", description="'auto', 'cpu', 'cuda', 'cuda:1', ...")
    feature_cache: bool = Field(True, description="Train the head on cached features when the backbone is frozen.")
    evaluate_test: bool = Field(
        True, description="Evaluate the test split at the end (tuning trials never do: they must not see it)."
    )
    augment_views: int = Field(
        0, ge=0, le=32, description="Augmented views cached per training image (frozen backbone mode)."
    )
    early_stopping: EarlyStoppingConfig = Field(default_factory=EarlyStoppingConfig)
    workers: int = Field(
        1,
        ge=1,
        le=4096,
        description="Data-parallel workers (Ray Train, DDP); 1 trains in this process. batch_size is the global "
        "batch, split across them.",
    )
    cpus_per_worker: float = Field(1.0, gt=0, le=1024, description="CPUs Ray reserves for each worker.")
    gpus_per_worker: float = Field(0.0, ge=0, le=64, description="GPUs for each worker (0: train on CPUs, gloo).")
    max_failures: int = Field(
        3,
        ge=-1,
        description="Times Ray Train restarts the workers from the last checkpoint after one fails (-1: always).",
    )
    # -- fine-tuning (an unfrozen backbone; see RECIPES) --------------------------------------------------------
    backbone_lr_ratio: float = Field(
        1.0, gt=0, le=1, description="The backbone's learning rate as a fraction of lr (the head's)."
    )
    layer_decay: float = Field(
        1.0, gt=0, le=1, description="Layer-wise lr decay: each backbone stage below the last gets this factor more."
    )
    warmup_epochs: float = Field(
        0.0, ge=0, le=1000, description="Epochs of linear lr warmup, then the schedule, per optimizer step."
    )
    head_only_epochs: int = Field(
        0, ge=0, le=1000, description="Gradual unfreezing: the first epochs train the head alone, then everything."
    )
    batchnorm: Literal["train", "frozen"] = Field(
        "train", description="'frozen': the backbone's batch-norm statistics stay as pretrained (small batches)."
    )
    augment: Literal["basic", "trivialaugment", "randaugment"] = Field(
        "basic", description="Training augmentation on images: random crop and flip, plus a policy (torchvision v2)."
    )
    random_erasing: float = Field(0.0, ge=0, le=1, description="Probability of erasing a random box (images).")
    mixup_alpha: float = Field(0.0, ge=0, le=10, description="MixUp's Beta(alpha, alpha) on training batches; 0: off.")
    cutmix_alpha: float = Field(0.0, ge=0, le=10, description="CutMix's alpha on training batches; 0: off.")
    ema_decay: float = Field(
        0.0, ge=0, lt=1, description="Weight EMA: evaluate and keep an exponential average of the weights; 0: off."
    )
    tta: Literal["none", "flip"] = Field(
        "none", description="Test-time augmentation on images: 'flip' averages each image's and its mirror's logits."
    )

    @model_validator(mode="after")
    def _global_batch_splits_evenly(self) -> TrainConfig:
        if self.batch_size % self.workers:
            raise ValueError(
                f"batch_size {self.batch_size} is the global batch and must split evenly over {self.workers} workers"
            )
        return self

    @field_validator("mixed_precision", "compile", mode="before")
    @classmethod
    def _off_is_off(cls, value: Any, info: ValidationInfo) -> Any:
        """`--set train.mixed_precision=off` (and `off` in a YAML file) reads as false in YAML 1.1: it means off;
        `compile=on` reads as true."""
        if value is False:
            return "off"
        return "on" if value is True and info.field_name == "compile" else value

    @model_validator(mode="after")
    def _compile_on_in_one_process(self) -> TrainConfig:
        if self.workers > 1 and self.compile == "on":
            raise ValueError(
                "train.compile=on compiles training in one process; with data-parallel workers set train.compile "
                "to auto or off (they train eager)"
            )
        return self

    @model_validator(mode="after")
    def _head_only_epochs_train_alone(self) -> TrainConfig:
        if self.workers > 1 and self.head_only_epochs:
            raise ValueError(
                "head_only_epochs (gradual unfreezing) trains in one process: data-parallel workers need every "
                "parameter in every step; set train.workers=1 or train.head_only_epochs=0"
            )
        return self

    @model_validator(mode="after")
    def _one_whole_gpu_per_rank(self) -> TrainConfig:
        # NCCL refuses two ranks of one group on the same GPU, which a fractional share would allow.
        if self.workers > 1 and 0 < self.gpus_per_worker < 1:
            raise ValueError(
                f"gpus_per_worker {self.gpus_per_worker:g} with {self.workers} workers: each data-parallel worker "
                "needs a whole GPU (NCCL cannot put two ranks on one); use 1 or more, or 0 to train on CPUs"
            )
        return self


class SaveConfig(_Section):
    """When a mode's tensors are saved: every `save_interval` steps from `start_step` to `end_step`, and at
    `save_steps`. Steps count that mode's batches (a mode step)."""

    save_interval: int = Field(10, ge=1)
    start_step: int = Field(0, ge=0)
    end_step: int | None = Field(None, ge=0)
    save_steps: list[int] = Field(default_factory=list)

    def should_save(self, mode_step: int) -> bool:
        if mode_step in self.save_steps:
            return True
        if mode_step < self.start_step or (self.end_step is not None and mode_step >= self.end_step):
            return False
        return (mode_step - self.start_step) % self.save_interval == 0


DEFAULT_RULES = ["VanishingGradient", "Overfit", "Overtraining", "PoorWeightInitialization", "LossNotDecreasing"]
COLLECTIONS = ("losses", "metrics", "weights", "biases", "gradients", "optimizer_variables")
COLLECTIONS += ("activations", "inputs", "predictions")  # opt-in


class DebuggerConfig(_Section):
    """Tensor capture and rules (imgtune.debugger). On by default with cheap settings."""

    enabled: bool = True
    collections: list[str] = Field(
        default_factory=lambda: ["losses", "metrics", "weights", "biases", "gradients", "optimizer_variables"],
        description="What to save; add 'activations' (with activations_regex) and 'inputs' to opt in.",
    )
    activations_regex: str = Field(
        r".*relu.*", description="Modules whose inputs/outputs the activations collection saves (name:Class)."
    )
    # Tensors every 100 training steps (SageMaker: 500); losses are saved at every step whatever this says.
    train: SaveConfig = Field(default_factory=lambda: SaveConfig(save_interval=100))
    eval: SaveConfig = Field(default_factory=lambda: SaveConfig(save_interval=10))
    predict: SaveConfig = Field(default_factory=lambda: SaveConfig(save_interval=10))
    histogram_bins: int = Field(16, ge=0, le=256)
    save_raw: bool = Field(False, description="Also save raw tensors (large) next to their reductions.")
    rules: list[str] = Field(default_factory=lambda: list(DEFAULT_RULES))
    rule_parameters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    stop_on: list[str] = Field(default_factory=list, description="Rules whose finding stops training.")
    rule_files: list[str] = Field(default_factory=list, description="Python files with custom Rule classes.")

    @model_validator(mode="after")
    def _rules_named_are_run(self) -> DebuggerConfig:
        for field, names in (("stop_on", self.stop_on), ("rule_parameters", list(self.rule_parameters))):
            stray = sorted(set(names) - set(self.rules))
            if stray:
                raise ValueError(f"{field} names rule(s) {stray} that are not in rules {self.rules}; add them there")
        return self

    @field_validator("collections")
    @classmethod
    def _known_collections(cls, names: list[str]) -> list[str]:
        unknown = sorted(set(names) - set(COLLECTIONS))
        if unknown:
            raise ValueError(f"unknown collection(s) {unknown}; known: {', '.join(COLLECTIONS)}")
        return names


PROFILER_RULES = [
    "LowGPUUtilization",
    "CPUBottleneck",
    "IOBottleneck",
    "BatchSize",
    "StepOutlier",
    "Dataloader",
    "GPUMemoryIncrease",
    "MaxInitializationTime",
    "LoadBalancing",
    "StragglerRank",
    "OverallSystemUsage",
    "OverallFrameworkMetrics",
]


class ProfilerConfig(_Section):
    """System monitor, step timeline, torch.profiler trace window and profiler rules (imgtune.profiler)."""

    enabled: bool = True
    interval_ms: int = Field(500, ge=100, le=60_000, description="System monitor sampling interval.")
    trace: bool = Field(True, description="Record a torch.profiler trace over a window of training steps.")
    trace_start_step: int = Field(5, ge=0, description="Training steps (warm-up) before the trace window.")
    trace_steps: int = Field(5, ge=1, le=1000, description="Training steps the trace window covers.")
    trace_max_share: float = Field(
        0.04,
        gt=0,
        le=1,
        description="The trace window covers at most this share of the job's planned training steps (traced steps "
        "run slower): a short job traces fewer steps, one of under 1/share steps none.",
    )
    rules: list[str] = Field(default_factory=lambda: list(PROFILER_RULES))
    rule_parameters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    report: bool = Field(True, description="Write report.html when the job ends.")

    @model_validator(mode="after")
    def _known_rules(self) -> ProfilerConfig:
        unknown = sorted(set(self.rules) - set(PROFILER_RULES))
        if unknown:
            raise ValueError(f"unknown profiler rule(s) {unknown}; known: {', '.join(PROFILER_RULES)}")
        stray = sorted(set(self.rule_parameters) - set(self.rules))
        if stray:
            raise ValueError(f"rule_parameters names rule(s) {stray} that are not in rules; add them there")
        return self


class TrackingConfig(_Section):
    """Trackers a job also reports to (imgtune.tracking): an MLflow run, TensorBoard event files."""

    mlflow: bool = Field(False, description="Make the job an MLflow run (pip install 'imgtune[mlflow]').")
    mlflow_uri: str | None = Field(
        None, description="MLflow tracking URI [default: $MLFLOW_TRACKING_URI, else MLflow's own local store]."
    )
    experiment: str = Field("imgtune", min_length=1, description="MLflow experiment the run goes into.")
    registered_model: str | None = Field(
        None, min_length=1, description="Register the job's model under this name (a new version each job)."
    )
    alias: str | None = Field(None, min_length=1, description="Point this alias of the registered model at it.")
    parent_run_id: str | None = Field(
        None, description="The MLflow run this job's run nests under (set by a tuning job for its trials)."
    )
    tensorboard: bool = Field(False, description="Write TensorBoard event files into JOB/tensorboard as it trains.")

    @model_validator(mode="after")
    def _alias_needs_a_name(self) -> TrackingConfig:
        if self.alias and not self.registered_model:
            raise ValueError(
                "tracking.alias needs tracking.registered_model (--register: the model the alias belongs to)"
            )
        if (self.registered_model or self.parent_run_id) and not self.mlflow:
            raise ValueError("tracking.registered_model and tracking.parent_run_id need tracking.mlflow (--mlflow)")
        return self


# Fine-tuning recipes: values a named recipe gives the keys a config leaves unset (every one stays a key of its
# own, set or tuned like any other). `frozen` trains a new head on the pretrained backbone's features (cached);
# `finetune` trains the whole network, the backbone at a tenth of the head's rate, after a warmup, on a cosine
# schedule, with label smoothing; `finetune-strong` adds layer-wise decay, TrivialAugment, random erasing,
# MixUp/CutMix, a weight EMA and flip TTA (for longer runs: strong regularisation needs epochs to pay).
RECIPES: dict[str, dict[str, dict[str, Any]]] = {
    "custom": {},  # the keys as given, nothing filled in (a job recorded before recipes existed resumes so)
    "frozen": {"model": {"freeze": "backbone"}},
    "finetune": {
        "model": {"freeze": "none"},
        "train": {
            "optimizer": "adamw", "weight_decay": 0.01, "backbone_lr_ratio": 0.1, "warmup_epochs": 0.5,
            "schedule": "cosine", "label_smoothing": 0.1, "batchnorm": "frozen",
        },
    },
    "finetune-strong": {
        "model": {"freeze": "none"},
        "train": {
            "optimizer": "adamw", "weight_decay": 0.05, "backbone_lr_ratio": 0.1, "layer_decay": 0.8,
            "warmup_epochs": 1.0, "schedule": "cosine", "label_smoothing": 0.1, "batchnorm": "frozen",
            "augment": "trivialaugment", "random_erasing": 0.25, "mixup_alpha": 0.2, "cutmix_alpha": 1.0,
            "ema_decay": 0.998, "tta": "flip",
        },
    },
}  # fmt: skip


class JobConfig(_Section):
    """A complete training job."""

    name: str | None = Field(None, description="Job name; generated from the backbone and time if empty.")
    recipe: Literal["auto", "custom", "frozen", "finetune", "finetune-strong"] = Field(
        "auto",
        description="Named values for the keys a config leaves unset (imgtune.config.job.RECIPES); 'auto': "
        "'finetune' when model.freeze is none or all_but_last, else 'frozen'.",
    )
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    debugger: DebuggerConfig = Field(default_factory=DebuggerConfig)
    profiler: ProfilerConfig = Field(default_factory=ProfilerConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, data: Any) -> Any:
        """Fill the keys the config leaves unset from its recipe ('auto' is resolved here, by model.freeze), so
        the job's resolved config names the recipe it got and every value it took from it."""
        if not isinstance(data, dict):
            return data
        recipe = data.get("recipe", "auto")
        if recipe == "auto":
            model = data.get("model")
            freeze = model.get("freeze") if isinstance(model, dict) else getattr(model, "freeze", None)
            recipe = "finetune" if freeze in ("none", "all_but_last") else "frozen"
        if recipe not in RECIPES:
            return data  # (refused by the field's own check)
        data = {**data, "recipe": recipe}
        for section, values in RECIPES[recipe].items():
            given = data.get(section)
            if isinstance(given, BaseModel):  # (a section object: it stays one, its own values first)
                data[section] = type(given).model_validate({**values, **given.model_dump(exclude_unset=True)})
            else:
                data[section] = {**values, **(given or {})}
        return data

    @model_validator(mode="after")
    def _weights_or_pretrained(self) -> JobConfig:
        if self.model.weights and self.model.pretrained == "none":
            raise ValueError("model.weights and model.pretrained=none contradict each other; give one")
        return self


def _parse_scalar(text: str) -> Any:
    """`--set` values are YAML scalars: 0.01, true, null, [0.8, 0.1, 0.1], resnet50."""
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `key.sub=value` overrides to a nested dict, in place, and return it."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"bad --set {item!r}", "write it as key=value, e.g. train.lr=0.01")
        node = raw
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"bad --set {item!r}: {part!r} is not a section")
            node = child
        node[parts[-1]] = _parse_scalar(value)
    return raw


def load_config_file(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level")
    return raw


def recorded_config(raw: dict[str, Any]) -> dict[str, Any]:
    """A job's config as its job.json recorded it, ready to validate again: one recorded before recipes existed
    (no `recipe`) keeps its values as they were (recipe `custom`), gaining none of a recipe's."""
    return {**raw, "recipe": raw.get("recipe", "custom")}


def build_config(raw: dict[str, Any], source: str = "config") -> JobConfig:
    """Validate a nested dict into a JobConfig, turning pydantic's errors into one ConfigError."""
    from imgtune.config.options import config_error

    try:
        return JobConfig.model_validate(raw)
    except ValidationError as exc:
        raise config_error(exc, source) from None


def merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """Deep-merge `update` into a copy of `base`; None values in `update` are ignored."""
    out = dict(base)
    for key, value in update.items():
        if value is None:
            continue
        if isinstance(value, dict):
            out[key] = merge(out[key] if isinstance(out.get(key), dict) else {}, value)
        else:
            out[key] = value
    return out
