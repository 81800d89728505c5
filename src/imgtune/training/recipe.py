"""Fine-tuning an unfrozen backbone: learning rates per part of the network, warmup then the schedule per step,
gradual unfreezing, frozen batch-norm statistics, MixUp/CutMix on batches, and a weight EMA.

Each piece is a key of `TrainConfig` (imgtune.config.job.RECIPES gives them values by name) and a plain torch or
torchvision object: parameter groups for the optimizer, Trainer callbacks, `v2.MixUp`/`v2.CutMix`,
`torch.optim.swa_utils.AveragedModel`. Every callback's state derives from the trainer's step and epoch or is in
the checkpoint, so a resumed job continues as it would have.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torchvision.transforms import v2

from imgtune.config import TrainConfig
from imgtune.models.factory import ImageClassifier, backbone_stages
from imgtune.training.callbacks import Callback

BASE_LR = "imgtune_base_lr"  # in a parameter group: its rate before warmup and schedule


def parameter_groups(module: nn.Module, cfg: TrainConfig) -> list[dict[str, Any]]:
    """The optimizer's parameter groups: the head at `lr`; an unfrozen backbone at `lr * backbone_lr_ratio`, its
    stages from the last down each `layer_decay` times the one above. A module that is not an ImageClassifier
    (a head on cached features) is one group. Parameters frozen now but unfrozen later (head_only_epochs) are
    in their groups already."""
    if not isinstance(module, ImageClassifier) or (cfg.backbone_lr_ratio == 1 and cfg.layer_decay == 1):
        return [{"params": list(module.parameters()), "lr": cfg.lr}]  # one rate: one group (as before recipes)
    groups = [{"params": list(module.head.parameters()), "lr": cfg.lr, "name": "head"}]
    stages = backbone_stages(module.backbone)
    stage_of = {id(p): i for i, stage in enumerate(stages) for p in stage.parameters()}
    rates = [cfg.lr * cfg.backbone_lr_ratio * cfg.layer_decay ** (len(stages) - 1 - i) for i in range(len(stages))]
    by_stage: dict[int, list[nn.Parameter]] = {}
    for parameter in module.backbone.parameters():
        by_stage.setdefault(stage_of.get(id(parameter), 0), []).append(parameter)
    if any(p.requires_grad for p in module.backbone.parameters()):
        groups += [{"params": ps, "lr": rates[i], "name": f"backbone.{i}"} for i, ps in sorted(by_stage.items())]
    return groups


def make_optimizer(module: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """The config's optimizer over `parameter_groups`, each group's rate kept as its base for the per-step
    schedule (LrPerStep). (Parameters that HeadOnlyEpochs holds still for the first epochs are trainable when
    this is called, so they are in.)"""
    from imgtune.training.setup import make_optimizer as optimizer_over

    return optimizer_over([{**group, BASE_LR: group["lr"]} for group in parameter_groups(module, cfg)], cfg)


def lr_factor(step: int, steps_per_epoch: int, cfg: TrainConfig) -> float:
    """The factor of each group's base rate at optimizer step `step` (0-based): linear warmup over
    `warmup_epochs`, then the schedule (cosine to 0 at the last step, step decay, or constant)."""
    warmup = round(cfg.warmup_epochs * steps_per_epoch) if cfg.warmup_epochs > 0 else 0
    warmup = max(warmup, 1) if cfg.warmup_epochs > 0 else 0  # (whole steps: the rate never overshoots)
    if step < warmup:
        return (step + 1) / warmup
    total = max(cfg.epochs * steps_per_epoch - warmup, 1)
    progress = min((step - warmup) / total, 1.0)
    if cfg.schedule == "cosine":
        return 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "step":
        return cfg.gamma ** ((step // max(steps_per_epoch, 1)) // cfg.step_size)
    return 1.0


def schedules_per_step(cfg: TrainConfig) -> bool:
    """Warmup moves the rate every step (LrPerStep); without it the epoch schedulers of setup.make_scheduler do."""
    return cfg.warmup_epochs > 0


class LrPerStep(Callback):
    """Sets every group's rate before each training batch from the step count alone (`lr_factor`): nothing to
    keep in a checkpoint, a resumed job continues on the same curve."""

    order = -50
    core = True

    def __init__(self, cfg: TrainConfig, steps_per_epoch: int):
        self.cfg = cfg
        self.steps_per_epoch = max(steps_per_epoch, 1)

    def _set(self, trainer: Any) -> None:
        factor = lr_factor(trainer.step, self.steps_per_epoch, self.cfg)
        for group in trainer.optimizer.param_groups:
            group["lr"] = group.get(BASE_LR, group["lr"]) * factor

    def on_epoch_start(self, trainer: Any) -> None:
        self._set(trainer)  # (the epoch record's lr is the first step's)

    def on_batch_start(self, trainer: Any) -> None:
        if trainer.phase == "train":
            self._set(trainer)


class HeadOnlyEpochs(Callback):
    """Gradual unfreezing: the backbone does not train in the first `epochs` epochs (the new head settles
    first, so its random start does not shake the pretrained weights), then it does. Decided by the epoch
    number, so a resumed job does the same."""

    order = -60
    core = True

    def __init__(self, model: ImageClassifier, epochs: int):
        self.model = model
        self.epochs = epochs
        self.trainable = [p for p in model.backbone.parameters() if p.requires_grad]

    def on_epoch_start(self, trainer: Any) -> None:
        train_backbone = trainer.epoch > self.epochs
        for parameter in self.trainable:
            parameter.requires_grad_(train_backbone)
        if trainer.epoch == self.epochs + 1:
            trainer.log(f"epoch {trainer.epoch}: the backbone trains from now on (head alone before)")


def freeze_batchnorm_statistics(model: ImageClassifier) -> int:
    """Keep the backbone's batch-norm layers in eval mode while training (their running statistics stay the
    pretrained ones; their scale and shift still learn). Returns how many."""
    layers = [m for m in model.backbone.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.frozen_modules.extend(layers)
    return len(layers)


class BatchMixing(Callback):
    """MixUp and/or CutMix on each training batch (torchvision's v2.MixUp, v2.CutMix; with both, one of them at
    random per batch): the inputs are mixed and the loss compares the outputs with the mixed (soft) labels,
    while the metrics still count the batch's own labels."""

    order = -40
    core = True

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float):
        mixes = []
        if mixup_alpha > 0:
            mixes.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            mixes.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = mixes[0] if len(mixes) == 1 else v2.RandomChoice(mixes)

    def on_batch_start(self, trainer: Any) -> None:
        if trainer.phase != "train" or trainer.inputs.dim() != 4:
            return
        trainer.inputs, trainer.loss_targets = self.mix(trainer.inputs, trainer.targets)


class WeightEMA(Callback):
    """An exponential moving average of the weights (torch.optim.swa_utils.AveragedModel, its decay warmed up
    as timm does: min(decay, (1 + n) / (10 + n)) after n updates), updated after every optimizer step.

    Evaluation uses it: from the start of each validation phase to the start of the next training phase the
    module holds the averaged weights (so early stopping measures and keeps them), and after training it keeps
    them (the model bundle is the average). The average and the training weights are in the checkpoint."""

    order = 40
    core = True

    def __init__(self, module: nn.Module, decay: float):
        self.module = module
        self.decay = decay
        self.average = torch.optim.swa_utils.AveragedModel(module, avg_fn=self._blend, use_buffers=True)
        self.training_weights: dict[str, torch.Tensor] | None = None  # while the module holds the average
        self._now = decay

    def _blend(self, averaged: torch.Tensor, current: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
        return averaged + (current - averaged) * (1 - self._now)

    def on_after_step(self, trainer: Any) -> None:
        # the decay of this update, from the step count (a Python number: no device sync per parameter)
        updates = trainer.step - 1
        self._now = min(self.decay, (1 + updates) / (10 + updates))
        self.average.update_parameters(self.module)

    def _use_average(self) -> None:
        if self.training_weights is None:
            self.training_weights = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
            self.module.load_state_dict(self.average.module.state_dict())

    def on_phase_start(self, trainer: Any) -> None:
        if trainer.phase == "train":
            if self.training_weights is not None:
                self.module.load_state_dict(self.training_weights)
                self.training_weights = None
        else:
            self._use_average()

    def on_fit_end(self, trainer: Any) -> None:
        self._use_average()

    def state_dict(self) -> dict:
        return {"average": self.average.state_dict(), "training_weights": self.training_weights}

    def load_state_dict(self, state: dict) -> None:
        self.average.load_state_dict(state["average"])
        self.training_weights = state.get("training_weights")


def recipe_callbacks(model: nn.Module, cfg: TrainConfig, num_classes: int, steps_per_epoch: int, images: bool):
    """The Trainer callbacks `cfg` asks for: per-step rates, gradual unfreezing, batch mixing and the EMA (the
    last two on images only: a head on cached features sees no image)."""
    callbacks: list[Callback] = []
    if schedules_per_step(cfg):
        callbacks.append(LrPerStep(cfg, steps_per_epoch))
    if isinstance(model, ImageClassifier) and cfg.head_only_epochs and not model.backbone_frozen:
        callbacks.append(HeadOnlyEpochs(model, cfg.head_only_epochs))
    if images and (cfg.mixup_alpha > 0 or cfg.cutmix_alpha > 0):
        callbacks.append(BatchMixing(num_classes, cfg.mixup_alpha, cfg.cutmix_alpha))
    if cfg.ema_decay > 0:
        callbacks.append(WeightEMA(model, cfg.ema_decay))
    return callbacks
