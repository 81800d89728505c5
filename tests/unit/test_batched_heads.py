"""Heads trained together (imgtune.training.batched_heads) end as each would alone: same metrics every epoch,
same early stop, same final weights, with the real Trainer, optimizer, schedule and feature loader alone."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from imgtune.config import JobConfig, build_config
from imgtune.models.factory import make_head
from imgtune.training.batched_heads import HeadBatch, batch_key
from imgtune.training.feature_cache import FeatureLoader
from imgtune.training.process import _best_record
from imgtune.training.setup import make_optimizer, make_scheduler, seed_everything
from imgtune.training.standard_callbacks import EarlyStopping
from imgtune.training.trainer import Trainer

FEATURES, CLASSES = 24, 5


def features(samples: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Separable-ish features: a class's mean plus noise, so that heads learn and differ."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(samples) % CLASSES
    means = torch.randn(CLASSES, FEATURES, generator=torch.Generator().manual_seed(99))
    return means[labels] + 1.5 * torch.randn(samples, FEATURES, generator=generator), labels


def loaders(batch_size: int) -> dict[str, FeatureLoader]:
    train_x, train_y = features(90, 1)
    valid_x, valid_y = features(40, 2)
    return {
        "train": FeatureLoader(train_x.unsqueeze(0), train_y, batch_size, shuffle=True),
        "valid": FeatureLoader(valid_x.unsqueeze(0), valid_y, batch_size, shuffle=False),
    }


def config(**train_and_model) -> JobConfig:
    model = {k: train_and_model.pop(k) for k in ("head", "head_hidden", "dropout") if k in train_and_model}
    return build_config({"data": {"path": "unused"}, "model": model, "train": {"batch_size": 16, **train_and_model}})


def train_alone(cfg: JobConfig) -> tuple[list[dict], dict, dict[str, torch.Tensor]]:
    """What imgtune.training.process does for a frozen backbone on cached features, on these features."""
    seed_everything(cfg.train.seed, False)
    head = make_head(cfg.model.head, FEATURES, CLASSES, cfg.model.head_hidden, cfg.model.dropout, seed=cfg.train.seed)
    optimizer = make_optimizer(head.parameters(), cfg.train)
    es = cfg.train.early_stopping
    stopper = EarlyStopping(es.metric, es.patience, es.min_delta, enabled=es.enabled)
    trainer = Trainer(
        head,
        optimizer,
        loaders(cfg.train.batch_size),
        epochs=cfg.train.epochs,
        num_classes=CLASSES,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing),
        scheduler=make_scheduler(optimizer, cfg.train),
        callbacks=[stopper],
        seed=cfg.train.seed,
    )
    trainer.fit()
    restored = es.restore_best and stopper.restore_best(head)
    results = {"stop_reason": trainer.stop_reason, "best_epoch": stopper.best_epoch, "epochs_run": len(trainer.history)}
    results["best"] = _best_record(trainer.history, stopper.best_epoch if restored else None)
    return trainer.history, results, head.state_dict()


def train_together(configs: list[JobConfig]) -> HeadBatch:
    batch = HeadBatch(configs, FEATURES, CLASSES, torch.device("cpu"))
    data = loaders(configs[0].train.batch_size)
    for epoch in range(1, configs[0].train.epochs + 1):
        if not batch.active():
            break
        batch.run_epoch(epoch, data)
    return batch


def assert_same_record(together: dict, alone: dict) -> None:
    assert together.keys() == alone.keys()
    for key, value in alone.items():
        if key == "epoch_time":
            continue
        if isinstance(value, float) and not math.isnan(value):
            assert together[key] == pytest.approx(value, rel=1e-4, abs=1e-5), key
        else:
            assert together[key] == value, key


@pytest.mark.parametrize(
    "shared, heads",
    [
        pytest.param(  # the default head: Adam, no dropout; lr, weight decay and width differ
            {"epochs": 4},
            [{"lr": 0.01}, {"lr": 0.003, "weight_decay": 0.01}, {"lr": 0.05, "head_hidden": 32}, {"lr": 0.001}],
            id="adam-lr-wd-width",
        ),
        pytest.param(  # dropout drawn per head, as nn.Dropout draws it; SGD's momentum per head; cosine schedule
            {"epochs": 3, "optimizer": "sgd", "schedule": "cosine"},
            [
                {"lr": 0.05, "dropout": 0.3},
                {"lr": 0.1, "momentum": 0.5, "head_hidden": 64},
                {"lr": 0.02, "dropout": 0.1},
            ],
            id="sgd-momentum-dropout-cosine",
        ),
        pytest.param(  # early stopping ends heads at different epochs and restores their best weights
            {"epochs": 8, "early_stopping": {"patience": 1}},
            [{"lr": 0.5}, {"lr": 0.002}, {"lr": 0.08, "head": "linear"}][:2],
            id="early-stopping",
        ),
        pytest.param(
            {"epochs": 3, "optimizer": "adamw", "head": "linear", "label_smoothing": 0.1},
            [{"lr": 0.02, "dropout": 0.2}, {"lr": 0.005, "weight_decay": 0.05}],
            id="linear-adamw-smoothing",
        ),
    ],
)
def test_each_head_trained_together_equals_it_trained_alone(shared, heads):
    configs = [config(**shared, **head) for head in heads]
    batch = train_together(configs)
    stops = set()
    for k, cfg in enumerate(configs):
        history, alone, state = train_alone(cfg)
        together, weights = batch.finish(k)
        assert len(batch.heads[k].history) == len(history) == together["epochs_run"]
        for mine, theirs in zip(batch.heads[k].history, history, strict=True):
            assert_same_record(mine, theirs)
        assert together["best_epoch"] == alone["best_epoch"]
        assert str(together["stop_reason"]).split(" (best")[0] == str(alone["stop_reason"]).split(" (best")[0]
        assert_same_record(together["best"], alone["best"])
        assert weights.keys() == state.keys()
        for name, tensor in state.items():
            # float sums in another order, amplified over 8 epochs at lr 0.5: 2e-5 apart on an AVX2-only CPU
            torch.testing.assert_close(weights[name], tensor, rtol=1e-4, atol=1e-4)
        stops.add(together["stop_reason"])
    if "early_stopping" in shared:
        assert any(stops) and len({len(h.history) for h in batch.heads}) == 2  # heads stopped at different epochs


def test_a_tuner_stops_one_head_and_the_others_go_on():
    configs = [config(epochs=3, lr=lr) for lr in (0.01, 0.02, 0.03)]
    batch = HeadBatch(configs, FEATURES, CLASSES, torch.device("cpu"))
    data = loaders(16)
    assert set(batch.run_epoch(1, data)) == {0, 1, 2}
    batch.stop(1, "stopped early by the tuner's scheduler")
    frozen = batch.head_state(1)
    assert set(batch.run_epoch(2, data)) == {0, 2}
    for name, tensor in batch.head_state(1).items():  # a stopped head is no longer trained
        assert torch.equal(tensor, frozen[name])
    results, _ = batch.finish(1)
    assert results["epochs_run"] == 1 and results["stop_reason"].startswith("stopped early")
    # the others equal their training alone
    history, _, _ = train_alone(configs[2])
    batch.run_epoch(3, data)
    for mine, theirs in zip(batch.heads[2].history, history, strict=True):
        assert_same_record(mine, theirs)


def test_heads_train_together_only_when_their_configs_differ_in_vectorized_keys():
    assert batch_key(config(lr=0.1, dropout=0.2, head_hidden=7)) == batch_key(config(lr=0.3, weight_decay=0.1))
    assert batch_key(config(batch_size=32)) != batch_key(config(batch_size=16))
    assert batch_key(config(seed=1)) != batch_key(config(seed=2))
    with pytest.raises(ValueError, match="equal but for"):
        HeadBatch([config(batch_size=32), config(batch_size=16)], FEATURES, CLASSES, torch.device("cpu"))
