"""A tiny real training run with the debugger and rules attached, for the rule tests.

Everything is real: a small torch model, in-memory data, the `Trainer`, a `DebuggerCallback` writing to
`DIR/debugger`, and a `RuleCallback` running the rules online. Nothing of imgtune is mocked.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from imgtune.config import DebuggerConfig, SaveConfig
from imgtune.debugger.capture import DebuggerCallback
from imgtune.debugger.rules import Finding, Rule
from imgtune.debugger.runner import RuleCallback, RuleRunner
from imgtune.debugger.store import Trial
from imgtune.training.callbacks import Callback
from imgtune.training.trainer import Trainer

# The tests pin when tensors are saved (the library's defaults may change): training tensors every 10 train
# steps, valid-phase tensors at every step. `debugger_overrides` replaces these.
PINNED = {"train": SaveConfig(save_interval=10), "eval": SaveConfig(save_interval=1)}


@dataclass
class RunResult:
    results: dict[str, dict[str, Any]]
    trial: Trial
    trainer: Trainer
    directory: Path

    def status(self, rule: str) -> str:
        return self.results[rule]["status"]

    def findings(self, rule: str) -> list[dict[str, Any]]:
        return self.results[rule]["findings"]

    def first(self, rule: str) -> dict[str, Any]:
        """The first finding of `rule` (a dict: step, message, tensor, evidence)."""
        findings = self.findings(rule)
        assert findings, f"{rule} found nothing: {self.results[rule]}"
        return findings[0]


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def blobs(n: int = 96, classes: int = 3, dim: int = 8, *, spread: float = 3.0, seed: int = 0) -> TensorDataset:
    """Gaussian clusters around fixed centres (the same centres for every seed): an easy, learnable task."""
    centres = torch.randn(classes, dim, generator=seeded(1234)) * spread / dim**0.5
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=seeded(seed + 1))]
    return TensorDataset(centres[labels] + torch.randn(n, dim, generator=seeded(seed)), labels)


def noise(n: int, classes: int = 3, dim: int = 8, *, seed: int = 0) -> TensorDataset:
    """Random inputs with random labels: nothing to learn, only to memorise."""
    g = seeded(seed)
    return TensorDataset(torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g))


def images(n: int = 96, classes: int = 2, *, normalised: bool, seed: int = 0) -> TensorDataset:
    """Synthetic [n, 3, 16, 16] images with values in [0, 1]; normalised: (x - 0.5) / 0.29 (mean about 0)."""
    g = seeded(seed)
    x = torch.rand(n, 3, 16, 16, generator=g)
    labels = torch.arange(n) % classes
    x[labels == 1, 0] = x[labels == 1, 0] * 0.5 + 0.25  # class 1: a narrower red channel, same mean
    if normalised:
        x = (x - 0.5) / 0.29
    return TensorDataset(x, labels)


def mlp(dim: int = 8, hidden: int = 16, classes: int = 3, *, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, classes))


def small_cnn(classes: int = 2, *, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, classes)
    )


def run(
    directory: Path,
    model: nn.Module,
    train_ds: Dataset,
    valid_ds: Dataset | None,
    rules: list[Rule],
    *,
    epochs: int = 1,
    lr: float = 0.05,
    optimizer: str = "sgd",
    debugger_overrides: dict[str, Any] | None = None,
    batch_size: int = 16,
    shuffle: bool = True,
    num_classes: int | None = None,
    stop_on: list[str] | None = None,
    on_finding: Callable[[str, Finding], None] | None = None,
    callbacks: Iterable[Callback] = (),
    seed: int = 0,
) -> RunResult:
    """Train `model` for `epochs` with the debugger capturing into `directory/debugger` and `rules` online.

    Returns the settled rule results (after `RuleCallback.finish()`), the capture's trial, and the trainer.
    """
    debug_dir = directory / "debugger"
    config = DebuggerConfig(**{**PINNED, "rules": [], **(debugger_overrides or {})})
    capture = DebuggerCallback(debug_dir, config, requirements=[req for r in rules for req in r.requirements()])
    runner = RuleRunner(rules, stop_on=stop_on, on_finding=on_finding)
    rule_callback = RuleCallback(runner, lambda: capture.trial, debug_dir)
    loaders: dict[str, DataLoader] = {
        "train": DataLoader(train_ds, batch_size=batch_size, shuffle=shuffle, generator=seeded(seed))
    }
    if valid_ds is not None:
        loaders["valid"] = DataLoader(valid_ds, batch_size=batch_size)
    if num_classes is None:
        num_classes = [m for m in model.modules() if isinstance(m, nn.Linear)][-1].out_features
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr)
    elif optimizer == "adam":
        opt = torch.optim.Adam(model.parameters(), lr=lr)
    else:
        raise ValueError(f"unknown optimizer {optimizer!r}")
    trainer = Trainer(
        model,
        opt,
        loaders,
        epochs=epochs,
        num_classes=num_classes,
        callbacks=[capture, rule_callback, *callbacks],
        seed=seed,
    )
    try:
        trainer.fit()
        results = rule_callback.finish()
    finally:
        capture.close()
    assert not trainer.runner.failures, trainer.runner.failures  # the debugger's callbacks never failed
    return RunResult(results, capture.trial, trainer, debug_dir)
