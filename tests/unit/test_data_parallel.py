"""Data-parallel semantics without Ray: the loaders' shards, and the Trainer on a real gloo process group of two
processes (torch.multiprocessing) against one process on the same data."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch.utils.data import Dataset

from imgtune.data.dataset import make_loader
from imgtune.training.callbacks import Callback, StopTraining
from imgtune.training.trainer import Trainer
from imgtune.tuning import gloo_interface
from servers import free_port


class Numbered(Dataset):
    """Item i is (i as a feature vector, i % 3): which samples a loader yields is visible in its batches."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return torch.full((4,), float(index)), index % 3


def indices(loader) -> list[list[int]]:
    return [[int(x) for x in inputs[:, 0]] for inputs, _ in loader]


@pytest.mark.parametrize("size", [64, 70])
def test_ranks_batches_together_are_the_single_process_batch(size: int):
    single = make_loader(Numbered(size), batch_size=8, shuffle=True, num_workers=0, seed=3)
    ranks = [
        make_loader(Numbered(size), batch_size=8, shuffle=True, num_workers=0, seed=3, rank=r, world_size=2)
        for r in range(2)
    ]
    for epoch in (1, 2):
        for loader in (single, *ranks):
            loader.sampler.set_epoch(epoch)
        whole, parts = indices(single), [indices(loader) for loader in ranks]
        assert len(parts[0]) == len(parts[1])  # every rank runs the same number of steps
        assert all(len(batch) == 4 for part in parts for batch in part[:-1])  # the global batch 8, split in two
        for step, batch in enumerate(whole):
            together = sorted(parts[0][step] + parts[1][step])
            if size % 2 == 0:
                assert together == sorted(batch)
            else:  # an odd size: the sampler repeats a sample so that both ranks take as many
                assert set(batch) <= set(together) and len(together) - len(batch) <= 1
    assert indices(single) != sorted(indices(single))  # it does shuffle, by epoch
    single.sampler.set_epoch(1)
    first = indices(single)
    single.sampler.set_epoch(2)
    assert indices(single) != first


def test_evaluation_shards_count_each_sample_once():
    shards = [
        sorted(i for batch in indices(make_loader(Numbered(25), batch_size=4, shuffle=False, num_workers=0,
                                                  rank=r, world_size=2)) for i in batch)
        for r in range(2)
    ]  # fmt: skip
    assert sorted(shards[0] + shards[1]) == list(range(25))
    assert not set(shards[0]) & set(shards[1])


# -- the Trainer on two ranks -----------------------------------------------------------------------------


def _data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    features = torch.randn(96, 10, generator=generator)
    labels = (features[:, 0] > 0).long() + (features[:, 1] > 0).long()
    return features, labels


class Pairs(Dataset):
    def __init__(self, features: torch.Tensor, labels: torch.Tensor):
        self.features, self.labels = features, labels

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.features[index], self.labels[index]


class StopOnRankZero(Callback):
    """Asks to stop on rank 0 only, at one training batch: the other rank must stop with it."""

    def __init__(self, at_step: int):
        self.at_step = at_step

    def on_batch_end(self, trainer: Trainer) -> None:
        if trainer.phase == "train" and trainer.step == self.at_step and dist.get_rank() == 0:
            raise StopTraining("rank 0 asked")


class StopAfterTrainingPhaseOnRankZero(Callback):
    """Asks to stop on rank 0 only, after the last training batch's agreement (in epoch 2's training phase_end):
    every rank must still leave at the same point."""

    def on_phase_end(self, trainer: Trainer) -> None:
        if trainer.phase == "train" and trainer.epoch == 2 and dist.get_rank() == 0:
            trainer.request_stop("rank 0 asked late")


def _train(rank: int, world_size: int, stop_at: int | None = None, variant: str = "") -> dict:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), nn.ReLU(), nn.Linear(16, 3))
    if variant == "batchnorm":
        model = nn.Sequential(nn.Linear(10, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 3))
    callbacks: list[Callback] = [StopOnRankZero(stop_at)] if stop_at else []
    if variant == "late stop":
        callbacks.append(StopAfterTrainingPhaseOnRankZero())
    train, valid = Pairs(*_data(0)), Pairs(*_data(1))
    loaders = {
        "train": make_loader(train, batch_size=16, shuffle=True, num_workers=0, rank=rank, world_size=world_size),
        "valid": make_loader(valid, batch_size=16, shuffle=False, num_workers=0, rank=rank, world_size=world_size),
    }
    trainer = Trainer(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        loaders,
        epochs=3,
        num_classes=3,
        callbacks=callbacks,
    )
    history = trainer.fit()
    return {
        "history": history,
        "step": trainer.step,
        "stop_reason": trainer.stop_reason,
        "weights": {k: v.clone() for k, v in model.state_dict().items()},
    }


def _rank_main(rank: int, port: int, out: str, stop_at: int | None, variant: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), **gloo_interface("127.0.0.1"))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.save(_train(rank, 2, stop_at, variant), Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _two_ranks(tmp_path: Path, stop_at: int | None = None, variant: str = "") -> list[dict]:
    """Both ranks' results; fails (instead of hanging) when the ranks wait for each other for good."""
    args = (free_port(), str(tmp_path), stop_at, variant)
    context = mp.start_processes(_rank_main, args=args, nprocs=2, start_method="spawn", join=False)
    deadline = time.monotonic() + 120
    while not context.join(timeout=2):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.kill()
            pytest.fail("the ranks hung: one waits in a collective the other never reaches")
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]


def test_two_ranks_train_as_one_process(tmp_path: Path):
    single = _train(0, 1)
    ranks = _two_ranks(tmp_path)
    for result in ranks:
        assert result["step"] == single["step"] == 18  # 96 samples / global batch 16 x 3 epochs
        for mine, theirs in zip(result["history"], single["history"], strict=True):
            for key in ("train_loss", "valid_loss"):
                assert mine[key] == pytest.approx(theirs[key], rel=1e-5), key
            for key in ("train_accuracy", "valid_accuracy", "valid_top5_accuracy"):
                assert mine[key] == theirs[key], key
        for name, tensor in single["weights"].items():  # no `module.` prefix: the plain module is kept
            torch.testing.assert_close(result["weights"][name], tensor, rtol=1e-4, atol=1e-5)


def test_a_stop_on_one_rank_stops_every_rank(tmp_path: Path):
    ranks = _two_ranks(tmp_path, stop_at=4)
    assert [r["step"] for r in ranks] == [4, 4]
    assert [r["stop_reason"] for r in ranks] == ["rank 0 asked", "rank 0 asked"]
    assert [len(r["history"]) for r in ranks] == [0, 0]  # stopped inside epoch 1: no epoch recorded


def test_a_stop_asked_between_agreements_still_stops_every_rank_together(tmp_path: Path):
    ranks = _two_ranks(tmp_path, variant="late stop")
    assert [r["stop_reason"] for r in ranks] == ["rank 0 asked late"] * 2
    assert [len(r["history"]) for r in ranks] == [1, 1]  # epoch 2 stopped after its training phase: not recorded
    assert [r["step"] for r in ranks] == [12, 12]


def test_every_rank_evaluates_and_keeps_rank_zeros_batchnorm_statistics(tmp_path: Path):
    ranks = _two_ranks(tmp_path, variant="batchnorm")
    for name in ("1.running_mean", "1.running_var", "1.num_batches_tracked"):
        torch.testing.assert_close(ranks[0]["weights"][name], ranks[1]["weights"][name], rtol=0, atol=0)
    assert [len(r["history"]) for r in ranks] == [3, 3]
