"""The Trainer loop on small in-memory data: events, callbacks, metrics, stopping, early stopping."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from imgtune.training.callbacks import Callback, StopTraining
from imgtune.training.metrics import PhaseMetrics
from imgtune.training.standard_callbacks import EarlyStopping
from imgtune.training.trainer import Trainer


def blobs(n: int = 96, classes: int = 3, dim: int = 8, seed: int = 0) -> TensorDataset:
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 4
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    return TensorDataset(centres[labels] + torch.randn(n, dim, generator=g), labels)


def make_trainer(callbacks=(), epochs=3, lr=0.05, batch_size=10) -> Trainer:
    torch.manual_seed(0)
    module = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 3))
    loaders = {
        "train": DataLoader(blobs(), batch_size=batch_size, shuffle=True, generator=torch.Generator()),
        "valid": DataLoader(blobs(seed=1), batch_size=batch_size),
    }
    return Trainer(
        module,
        torch.optim.Adam(module.parameters(), lr=lr),
        loaders,
        epochs=epochs,
        num_classes=3,
        callbacks=callbacks,
    )


class Recorder(Callback):
    def __init__(self):
        self.events = []

    def __getattr__(self, name):
        if name.startswith("on_"):
            return lambda trainer: self.events.append((name[3:], trainer.phase))
        raise AttributeError(name)


def test_events_arrive_in_order():
    recorder = Recorder()
    make_trainer([recorder], epochs=1, batch_size=48).fit()
    names = [e for e, _ in recorder.events]
    assert names[0] == "fit_start" and names[-1] == "fit_end"
    train_batch = ["batch_start", "after_forward", "after_backward", "after_step", "batch_end"]
    assert names[1:4] == ["epoch_start", "phase_start", *train_batch[:1]]
    assert names[3:8] == train_batch
    valid_start = recorder.events.index(("phase_start", "valid"))
    assert "after_backward" not in names[valid_start:]
    assert names[-2] == "epoch_end"


def test_learns_and_records_each_epoch():
    trainer = make_trainer(epochs=4)
    history = trainer.fit()
    assert [r["epoch"] for r in history] == [1, 2, 3, 4]
    assert history[-1]["valid_accuracy"] > 0.9
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert trainer.step == 4 * math.ceil(96 / 10)


def test_loss_is_a_per_sample_mean_with_uneven_batches():
    metrics = PhaseMetrics(num_classes=2)
    logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0]])
    targets = torch.tensor([0, 0, 1])
    loss = nn.CrossEntropyLoss(reduction="none")(logits, targets)
    metrics.update(logits[:1], targets[:1], loss[:1].mean())  # a batch of 1
    metrics.update(logits[1:], targets[1:], loss[1:].mean())  # a batch of 2
    assert metrics.loss == pytest.approx(float(loss.mean()))
    assert metrics.accuracy == pytest.approx(1 / 3)
    assert metrics.samples == 3


def test_confusion_and_per_class_accuracy():
    metrics = PhaseMetrics(num_classes=3, confusion=True)
    logits = torch.eye(3)[[0, 1, 1, 2]] * 5
    targets = torch.tensor([0, 1, 2, 2])
    metrics.update(logits, targets, torch.tensor(0.0))
    assert metrics.confusion.tolist() == [[1, 0, 0], [0, 1, 0], [0, 1, 1]]
    assert metrics.per_class_accuracy() == [1.0, 1.0, 0.5]


def test_failing_callback_is_reported_and_switched_off():
    class Broken(Callback):
        calls = 0

        def on_batch_end(self, trainer):
            Broken.calls += 1
            raise ValueError("boom")

    trainer = make_trainer([Broken()], epochs=2)
    history = trainer.fit()
    assert len(history) == 2  # training went on
    assert Broken.calls == 1
    assert trainer.runner.failures[0]["callback"] == "Broken"
    assert "boom" in trainer.runner.failures[0]["error"]


def test_a_failing_core_callback_fails_the_run():
    class LosingCheckpoints(Callback):
        core = True  # like the checkpointer: training must not go on without it

        def on_epoch_end(self, trainer):
            raise OSError("No space left on device")

    trainer = make_trainer([LosingCheckpoints()], epochs=3)
    with pytest.raises(OSError, match="No space left"):
        trainer.fit()
    assert len(trainer.history) == 1 and trainer.runner.failures == []


def test_stop_training_ends_the_run_with_its_reason():
    class StopAtStep(Callback):
        def on_after_step(self, trainer):
            if trainer.step == 3:
                raise StopTraining("enough")

    trainer = make_trainer([StopAtStep()], epochs=5)
    trainer.fit()
    assert trainer.stop_reason == "enough"
    assert trainer.step == 3
    assert trainer.history == []  # the interrupted epoch is not recorded as complete


def test_early_stopping_stops_and_restores_the_best_weights():
    stopper = EarlyStopping("valid_loss", patience=2)
    # A learning rate this large makes the loss climb after the first epochs.
    trainer = make_trainer([stopper], epochs=30, lr=3.0)
    history = trainer.fit()
    assert trainer.stop_reason and "early stopping" in trainer.stop_reason
    assert len(history) < 30
    best = min(history, key=lambda r: r["valid_loss"])
    assert stopper.best_epoch == best["epoch"]
    assert stopper.restore_best(trainer.module)
    metrics = trainer.evaluate("valid", confusion=False)
    assert metrics.loss == pytest.approx(best["valid_loss"], rel=1e-5)


def test_same_seed_same_run_and_resumable_epoch_order():
    first = make_trainer(epochs=2)
    first.seed = 7
    second = make_trainer(epochs=2)
    second.seed = 7
    assert first.fit() == [{**r, "epoch_time": pytest.approx(r["epoch_time"], abs=10)} for r in second.fit()]


def test_bfloat16_autocast_trains_on_cpu():
    trainer = make_trainer(epochs=3)
    trainer.amp_dtype = torch.bfloat16
    history = trainer.fit()
    assert history[-1]["valid_accuracy"] > 0.9


def test_a_stop_request_still_reaches_later_callbacks():
    class StopFirst(Callback):
        order = 0

        def on_epoch_end(self, trainer):
            if trainer.epoch == 2:
                raise StopTraining("stop after epoch 2")

    class Later(Callback):
        order = 50
        seen: list[int] = []

        def on_epoch_end(self, trainer):
            Later.seen.append(trainer.epoch)

    trainer = make_trainer([StopFirst(), Later()], epochs=5)
    trainer.fit()
    assert Later.seen == [1, 2]
    assert trainer.stop_reason == "stop after epoch 2"
    assert len(trainer.history) == 2


def test_early_stopping_with_min_delta_and_nan_losses():
    stopper = EarlyStopping("valid_loss", patience=1, min_delta=0.01)

    class Fake:
        module = nn.Linear(1, 1)
        stop_reason = None

        def request_stop(self, reason):
            self.stop_reason = reason

    fake = Fake()
    for epoch, loss in enumerate([1.0, 0.995], start=1):
        fake.epoch, fake.epoch_record = epoch, {"valid_loss": loss}
        stopper.on_epoch_end(fake)
    assert stopper.best_epoch == 1  # 0.995 is not better by min_delta
    assert "best 1.0000 at epoch 1" in fake.stop_reason

    nan_stopper, fake = EarlyStopping("valid_loss", patience=1), Fake()
    for epoch in (1, 2):
        fake.epoch, fake.epoch_record = epoch, {"valid_loss": float("nan")}
        nan_stopper.on_epoch_end(fake)
    assert nan_stopper.best_epoch is None and "never finite" in fake.stop_reason


def test_best_pt_carries_its_epoch_and_a_later_one_is_not_restored(tmp_path):
    """A job killed between writing best.pt and its checkpoint leaves a best.pt of an epoch the checkpoint does
    not know as the best: a resumed job must not restore it as the best weights."""
    from imgtune.training.standard_callbacks import atomic_torch_save, load_checkpoint

    module = nn.Linear(2, 2)
    best_path = tmp_path / "best.pt"
    writer = EarlyStopping("valid_loss", patience=3, best_path=best_path)

    class Epoch:  # what on_epoch_end reads of a trainer
        def __init__(self, epoch: int, loss: float):
            self.epoch, self.epoch_record, self.module = epoch, {"valid_loss": loss}, module

    writer.on_epoch_end(Epoch(2, 0.5))
    assert load_checkpoint(best_path)["epoch"] == 2 and writer.best_epoch == 2
    saved = {k: v.clone() for k, v in module.state_dict().items()}

    resumed = EarlyStopping("valid_loss", patience=3, best_path=best_path)
    resumed.load_state_dict(writer.state_dict())  # the checkpoint's view: the best is epoch 2
    with torch.no_grad():
        module.weight.add_(1.0)
    assert resumed.restore_best(module) and torch.equal(module.weight, saved["weight"])  # epoch 2's weights back

    atomic_torch_save({"epoch": 3, "state": {k: v + 5 for k, v in saved.items()}}, best_path)  # killed after this
    messages: list[str] = []
    with torch.no_grad():
        module.weight.add_(1.0)
    assert not resumed.restore_best(module, messages.append)
    assert "best.pt holds epoch 3, but the checkpoint's best is epoch 2" in messages[0]
    assert torch.equal(module.weight, saved["weight"] + 1)  # left as it was, not epoch 3's weights
