"""Fine-tuning recipes (imgtune.training.recipe, imgtune.config.job.RECIPES): what each piece changes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgtune.config.job import RECIPES, JobConfig, TrainConfig, apply_overrides, build_config, load_config_file
from imgtune.models.factory import ImageClassifier, ModelSpec, backbone_stages
from imgtune.training.callbacks import Callback
from imgtune.training.recipe import (
    BASE_LR,
    BatchMixing,
    HeadOnlyEpochs,
    LrPerStep,
    WeightEMA,
    freeze_batchnorm_statistics,
    lr_factor,
    make_optimizer,
)
from imgtune.training.trainer import Trainer


def tiny_classifier(classes: int = 3) -> ImageClassifier:
    """A 3-stage conv backbone with batch norm and a linear head: an ImageClassifier as create_model makes."""
    torch.manual_seed(0)
    stages = [nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU())]
    stages += [nn.Sequential(nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU()) for _ in range(2)]
    backbone = nn.Sequential(nn.Sequential(*stages), nn.AdaptiveAvgPool2d(1), nn.Flatten())
    spec = ModelSpec("tiny", classes, head="linear", freeze="none")
    norm = {"mean": [0.5] * 3, "std": [0.5] * 3}
    return ImageClassifier(backbone, nn.Linear(4, classes), spec, 4, norm)


def images(n: int = 24, classes: int = 3, size: int = 8) -> TensorDataset:
    g = torch.Generator().manual_seed(1)
    labels = torch.arange(n) % classes
    x = torch.randn(n, 3, size, size, generator=g)
    x[:, 0, :, : size // 2] += labels[:, None, None].float()  # a left-half cue: not symmetric under a flip
    return TensorDataset(x, labels)


def trainer_for(model: nn.Module, cfg: TrainConfig, callbacks=(), tta: bool = False) -> Trainer:
    loaders = {"train": DataLoader(images(), batch_size=8, shuffle=True, generator=torch.Generator()),
               "valid": DataLoader(images(), batch_size=8)}  # fmt: skip
    return Trainer(
        model, make_optimizer(model, cfg), loaders, epochs=cfg.epochs, num_classes=3, callbacks=callbacks, tta_flip=tta
    )


def test_recipes_fill_only_the_keys_a_config_leaves_unset_and_round_trip(tmp_path):
    assert JobConfig(data={"path": "d"}).recipe == "frozen"  # today's default: a frozen backbone
    unfrozen = JobConfig(data={"path": "d"}, model={"freeze": "none"})  # --freeze none alone: the finetune recipe
    assert unfrozen.recipe == "finetune" and unfrozen.train.backbone_lr_ratio == RECIPES["finetune"]["train"][
        "backbone_lr_ratio"]  # fmt: skip
    raw = {"data": {"path": "d"}, "recipe": "finetune-strong"}
    apply_overrides(raw, ["train.mixup_alpha=0.4", "train.lr=0.01", "model.freeze=all_but_last"])
    strong = JobConfig.model_validate(raw)
    assert (strong.train.mixup_alpha, strong.train.lr, strong.model.freeze) == (0.4, 0.01, "all_but_last")  # --set wins
    assert strong.train.cutmix_alpha == 1.0 and strong.train.ema_decay == 0.998 and strong.train.tta == "flip"
    path = tmp_path / "job.yaml"
    path.write_text(
        "data: {path: d}\nrecipe: finetune\ntrain: {warmup_epochs: 2, augment: randaugment, head_only_epochs: 1}\n"
    )
    from_file = build_config(load_config_file(path))
    assert (from_file.train.warmup_epochs, from_file.train.augment, from_file.train.head_only_epochs) == (
        2, "randaugment", 1)  # fmt: skip
    assert from_file.train.optimizer == "adamw"  # the rest from the recipe
    off = build_config(apply_overrides({"data": {"path": "d"}}, ["train.mixed_precision=off"]))
    assert off.train.mixed_precision == "off"  # (YAML reads off as false)
    for config in (strong, from_file):  # a job's resolved config (job.json) validates to itself
        assert JobConfig.model_validate(config.model_dump(mode="json")) == config
    with pytest.raises(ValueError, match="recipe"):
        JobConfig(data={"path": "d"}, recipe="finetune-weak")
    with pytest.raises(ValueError, match="head_only_epochs"):
        JobConfig(data={"path": "d"}, train={"workers": 2, "head_only_epochs": 1})


def test_parameter_groups_give_the_backbone_a_lower_rate_decaying_by_stage():
    model = tiny_classifier()
    cfg = TrainConfig(lr=0.01, backbone_lr_ratio=0.1, layer_decay=0.5)
    optimizer = make_optimizer(model, cfg)
    rates = {group["name"]: group["lr"] for group in optimizer.param_groups}
    assert len(backbone_stages(model.backbone)) == 3
    assert rates == pytest.approx({"head": 0.01, "backbone.2": 0.001, "backbone.1": 0.0005, "backbone.0": 0.00025})
    grouped = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(grouped) == len(list(model.parameters())) == len({id(p) for p in grouped})  # each once
    # a frozen backbone: the head alone
    for p in model.backbone.parameters():
        p.requires_grad_(False)
    assert [g["name"] for g in make_optimizer(model, cfg).param_groups] == ["head"]


def test_warmup_then_cosine_per_step_depends_on_the_step_alone():
    cfg = TrainConfig(epochs=4, warmup_epochs=1, schedule="cosine")
    factors = [lr_factor(step, 10, cfg) for step in range(40)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])  # linear warmup over one epoch
    assert factors[10] == pytest.approx(1.0) and factors[-1] < 0.01  # cosine from the top to about 0
    assert all(a >= b for a, b in zip(factors[10:], factors[11:], strict=False))
    model = tiny_classifier()
    trainer = trainer_for(model, TrainConfig(epochs=2, lr=0.01, warmup_epochs=1, schedule="cosine"))
    setter = LrPerStep(TrainConfig(epochs=2, lr=0.01, warmup_epochs=1, schedule="cosine"), 3)
    trainer.step, trainer.phase = 2, "train"
    setter.on_batch_start(trainer)
    head = trainer.optimizer.param_groups[0]
    assert head["lr"] == pytest.approx(head[BASE_LR] * 3 / 3) and head[BASE_LR] == 0.01
    trainer.step = 1
    setter.on_batch_start(trainer)
    assert head["lr"] == pytest.approx(0.01 * 2 / 3)


def test_mixup_and_cutmix_mix_the_inputs_and_soften_the_loss_targets_not_the_metrics():
    torch.manual_seed(0)
    for mixup, cutmix in ((0.4, 0.0), (0.0, 1.0), (0.4, 1.0)):
        mixing = BatchMixing(3, mixup, cutmix)

        class Batch:
            phase = "train"
            inputs = torch.randn(8, 3, 8, 8)
            targets = torch.arange(8) % 3
            loss_targets = None

        batch = Batch()
        original = batch.inputs.clone()
        mixing.on_batch_start(batch)
        assert not torch.equal(batch.inputs, original)  # mixed with another image of the batch
        soft = batch.loss_targets
        assert soft.shape == (8, 3) and torch.allclose(soft.sum(1), torch.ones(8))
        assert ((soft > 0).sum(1) >= 1).all() and ((soft > 0) & (soft < 1)).any()  # two labels share some rows
        assert torch.equal(batch.targets, torch.arange(8) % 3)  # the metrics still count the batch's own labels
    # on the valid phase nothing changes
    batch = Batch()
    batch.phase, before = "valid", batch.inputs.clone()
    BatchMixing(3, 0.4, 0.0).on_batch_start(batch)
    assert torch.equal(batch.inputs, before) and batch.loss_targets is None


def test_a_trainer_with_mixing_trains_on_soft_targets():
    model = tiny_classifier()
    cfg = TrainConfig(epochs=1, lr=0.01)
    seen = []

    class Spy(BatchMixing):
        def on_after_forward(self, trainer):
            seen.append(trainer.loss_targets)

    trainer_for(model, cfg, [Spy(3, 0.4, 0.0)]).fit()
    assert seen and seen[0] is not None and seen[0].dtype.is_floating_point and seen[0].shape[1] == 3


def test_flip_tta_averages_each_image_and_its_mirror():
    model = tiny_classifier()
    model.eval()
    x = images()[:8][0]
    with torch.inference_mode():
        expected = (model(x) + model(x.flip(-1))) / 2
        plain = model(x)
    outputs = []

    class Keep(Callback):
        def on_after_forward(self, trainer):
            if trainer.phase == "valid" and trainer.batch_index == 0:
                outputs.append(trainer.outputs.clone())

    for tta in (True, False):
        trainer = trainer_for(model, TrainConfig(epochs=1), [Keep()], tta=tta)
        trainer.loaders["train"] = []  # evaluate only
        trainer.run_phase("valid", train=False)
    assert torch.allclose(outputs[0], expected, atol=1e-5) and torch.allclose(outputs[1], plain, atol=1e-5)
    assert not torch.allclose(outputs[0], outputs[1], atol=1e-4)  # the model is not mirror-symmetric


def test_head_only_epochs_keep_the_backbone_still_then_train_it():
    model = tiny_classifier()
    cfg = TrainConfig(epochs=2, lr=0.05, head_only_epochs=1)
    before = [p.detach().clone() for p in model.backbone.parameters()]
    head_before = [p.detach().clone() for p in model.head.parameters()]
    snapshots = []

    class AfterEpoch(Callback):
        def on_epoch_end(self, trainer):
            snapshots.append([p.detach().clone() for p in model.backbone.parameters()])

    trainer_for(model, cfg, [HeadOnlyEpochs(model, 1), AfterEpoch()]).fit()
    assert all(torch.equal(a, b) for a, b in zip(before, snapshots[0], strict=True))  # epoch 1: head alone
    assert not all(torch.equal(a, b) for a, b in zip(before, snapshots[1], strict=True))  # epoch 2: all of it
    assert not all(torch.equal(a, b) for a, b in zip(head_before, model.head.parameters(), strict=True))


def test_frozen_batchnorm_statistics_stay_as_pretrained():
    model = tiny_classifier()
    assert freeze_batchnorm_statistics(model) == 3
    stats = [m.running_mean.clone() for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    trainer_for(model, TrainConfig(epochs=1, lr=0.05)).fit()
    after = [m.running_mean for m in model.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(torch.equal(a, b) for a, b in zip(stats, after, strict=True))
    learned = tiny_classifier()
    trainer_for(learned, TrainConfig(epochs=1, lr=0.05)).fit()
    moved = [m.running_mean for m in learned.backbone.modules() if isinstance(m, nn.BatchNorm2d)]
    assert not all(torch.equal(a, b) for a, b in zip(stats, moved, strict=True))  # (they would have moved)


def test_weight_ema_is_what_evaluation_and_the_final_model_use_and_survives_a_checkpoint():
    model = tiny_classifier()
    ema = WeightEMA(model, decay=0.9)
    trainer = trainer_for(model, TrainConfig(epochs=2, lr=0.05), [ema])
    trainer.fit()
    averaged = ema.average.module.state_dict()
    assert all(torch.equal(v, averaged[k]) for k, v in model.state_dict().items())  # the model keeps the average
    assert ema.training_weights is not None  # the last training weights, kept aside (checkpointed)
    differs = [k for k, v in ema.training_weights.items() if v.is_floating_point() and not torch.equal(v, averaged[k])]
    assert differs  # the average is not the last weights
    state = ema.state_dict()
    other = WeightEMA(tiny_classifier(), decay=0.9)
    other.load_state_dict(state)
    assert all(torch.equal(v, state["average"][k]) for k, v in other.average.state_dict().items())
    assert math.isclose(int(other.average.n_averaged), trainer.step)


def test_the_finetune_search_space_is_named_and_every_corner_is_a_valid_job():
    from imgtune.tuning.space import FINETUNE_SPACE, apply_values, load_space

    space = load_space("finetune")
    assert set(space.keys) == set(FINETUNE_SPACE) >= {"train.backbone_lr_ratio", "train.warmup_epochs"}
    base = JobConfig(data={"path": "d"}, recipe="finetune").model_dump(mode="json")
    space.check_against(base)  # raises on a key or a value a job config refuses
    trial = build_config(apply_values(base, {"train.augment": "randaugment", "train.backbone_lr_ratio": 0.05}))
    assert trial.train.augment == "randaugment" and trial.train.backbone_lr_ratio == 0.05
    assert trial.train.optimizer == "adamw"  # the rest as the recipe set it


def test_a_cpu_with_native_bf16_trains_images_under_bf16_autocast_in_channels_last():
    from imgtune.training.setup import amp_dtype, cpu_has_native_bf16

    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu, fine_tuning=True) == (torch.bfloat16 if cpu_has_native_bf16() else None)
    assert amp_dtype("auto", cpu, fine_tuning=False) is None  # a head on frozen features keeps fp32's numbers
    assert amp_dtype("off", cpu, fine_tuning=True) is None and amp_dtype("bf16", cpu) == torch.bfloat16
    model = tiny_classifier().to(memory_format=torch.channels_last)
    seen = []

    class Formats(Callback):
        def on_after_forward(self, trainer):
            seen.append(trainer.inputs.is_contiguous(memory_format=torch.channels_last))

    loaders = {"train": DataLoader(images(), batch_size=8)}
    Trainer(model, make_optimizer(model, TrainConfig()), loaders, epochs=1, num_classes=3, callbacks=[Formats()],
            channels_last=True).fit()  # fmt: skip
    assert seen and all(seen)


def test_review_fixes_warmup_never_overshoots_legacy_configs_keep_their_values_and_sections_stay_models():
    from imgtune.config.job import recorded_config
    from imgtune.tuning.batched import can_batch

    for steps in (3, 9, 10):  # a warmup that is not a whole number of steps
        factors = [lr_factor(s, steps, TrainConfig(epochs=3, warmup_epochs=0.5, schedule="cosine")) for s in range(30)]
        assert max(factors) <= 1.0 and factors[0] > 0
    # a job recorded before recipes (no `recipe`, an unfrozen backbone): resumed with its own values, one group
    old = JobConfig(data={"path": "d"}, model={"freeze": "none"}, recipe="custom").model_dump(mode="json")
    del old["recipe"]
    for key in ("backbone_lr_ratio", "layer_decay", "warmup_epochs", "batchnorm", "augment", "ema_decay", "tta"):
        del old["train"][key]
    resumed = build_config(recorded_config(old))
    assert (resumed.train.optimizer, resumed.train.backbone_lr_ratio, resumed.train.batchnorm) == ("adam", 1.0, "train")
    assert len(make_optimizer(tiny_classifier(), resumed.train).param_groups) == 1  # its checkpoint's one group
    # a section given as an object stays one (and assignment works)
    from imgtune.config.job import ModelConfig

    config = JobConfig(data={"path": "d"}, model=ModelConfig(freeze="none"))
    config.name = "renamed"
    assert config.train.backbone_lr_ratio == 0.1 and config.name == "renamed" and not isinstance(config.train, dict)
    # batched heads neither warm up nor average: such trials train alone
    observers_off = {"debugger": {"enabled": False}, "profiler": {"enabled": False}}
    assert can_batch(observers_off) and not can_batch({**observers_off, "train": {"warmup_epochs": 1}})
