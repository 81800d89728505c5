"""Many classification heads trained at once on the same cached feature batches (tuning trials on a frozen
backbone).

Trials of a tuning job whose configs differ only in `VECTORIZED` keys (learning rate, weight decay, momentum,
dropout, the mlp head's width) see the same feature batches in the same order: same features, batch size, seed
and schedule. `HeadBatch` stacks their heads into one set of tensors (the mlp head's hidden layer padded with
zeros to the widest head: a zero unit's weights get zero gradients and stay zero), runs one batched matmul per
layer for all of them, and steps one optimizer with a parameter group per head, whose parameters are views into
the stacked tensors. Each head's training is the training job it would be alone (imgtune.training.process with
a frozen backbone and the feature cache), within float tolerance:

- its initial weights come from `make_head(..., seed=seed)`, as `build_model` makes them;
- each epoch reseeds the loader (same order) and a per-head generator standing in for the process's global
  random stream, from which its dropout masks are drawn in the order `nn.Dropout` would draw them;
- the loss, the optimizer and schedule (one param group per head: its lr, weight decay, momentum), the
  per-sample metrics, early stopping (`EarlyStopping`, the same rule and messages) and best-weights restore
  are the single job's.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from imgtune.config import JobConfig
from imgtune.models.factory import make_head
from imgtune.training.setup import amp_dtype, make_optimizer, make_scheduler
from imgtune.training.standard_callbacks import EarlyStopping

VECTORIZED = ("train.lr", "train.weight_decay", "train.momentum", "model.dropout", "model.head_hidden")
"""Config keys whose values may differ between heads trained together."""


def batch_key(config: JobConfig) -> str:
    """Trials whose keys are equal train together; the key is the config without its name and VECTORIZED keys."""
    raw = config.model_dump(mode="json")
    raw["name"] = None
    for key in VECTORIZED:
        section, field = key.split(".")
        raw[section][field] = None
    return json.dumps(raw, sort_keys=True)


@dataclass
class _Head:
    """One head's bookkeeping: its config, its own random stream, early stopping, where it stands."""

    config: JobConfig
    layer_names: list[str]  # the state_dict prefixes of its Linear layers, as the head alone names them
    generator: torch.Generator
    stopper: EarlyStopping
    history: list[dict[str, Any]]
    stop_reason: str | None = None
    done: bool = False
    epoch_record: dict[str, Any] | None = None  # (EarlyStopping reads these three as a Trainer's)
    epoch: int = 0
    module: Any = None

    def request_stop(self, reason: str) -> None:
        self.stop_reason = self.stop_reason or reason


class _StateView:
    """`EarlyStopping` copies `trainer.module.state_dict()`: a head's state, cut out of the stack."""

    def __init__(self, batch: HeadBatch, index: int):
        self.batch, self.index = batch, index

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.batch.head_state(self.index)


class HeadBatch:
    """K heads (configs equal but for VECTORIZED keys) trained together on `num_features`-wide features.

    Call `run_epoch(epoch, loaders)` for epochs 1..E; a head is `done` when its epochs ran out or early stopping
    (its own, or `stop(k, reason)` from a tuner) ended it; `finish(k)` gives its results as a training job's.
    """

    def __init__(self, configs: list[JobConfig], num_features: int, num_classes: int, device: torch.device):
        if not configs or len({batch_key(c) for c in configs}) != 1:
            raise ValueError("heads trained together need configs equal but for " + ", ".join(VECTORIZED))
        first = configs[0]
        self.cfg = first.train
        self.kind = first.model.head
        self.num_classes = num_classes
        self.device = device
        self.epochs = self.cfg.epochs
        modules = [
            make_head(self.kind, num_features, num_classes, c.model.head_hidden, c.model.dropout, seed=c.train.seed)
            for c in configs
        ]
        linears = [[(name, m) for name, m in head.named_children() if isinstance(m, nn.Linear)] for head in modules]
        self.widths = [layers[0][1].out_features if self.kind == "mlp" else 0 for layers in linears]
        self.dropouts = [c.model.dropout for c in configs]
        self.weights, self.biases = self._stack([[m for _, m in layers] for layers in linears])
        # One param group per head, its parameters views into the stacked tensors: the optimizer updates the
        # stack in place, with each head's own hyperparameters.
        self.views = [[nn.Parameter(t.data[k]) for t in (*self.weights, *self.biases)] for k in range(len(configs))]
        self.optimizer = make_optimizer(self.views[0], self.cfg)  # the config's optimizer type and defaults
        self.optimizer.param_groups.clear()
        for views, config in zip(self.views, configs, strict=True):
            hyper = {"lr": config.train.lr, "weight_decay": config.train.weight_decay}
            if self.cfg.optimizer == "sgd":
                hyper["momentum"] = config.train.momentum
            self.optimizer.add_param_group({"params": views, **hyper})
        self.scheduler = make_scheduler(self.optimizer, self.cfg)
        self.amp_dtype = amp_dtype(self.cfg.mixed_precision, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.amp_dtype == torch.float16)
        self.step = 0
        self.heads: list[_Head] = []
        for k, (config, layers) in enumerate(zip(configs, linears, strict=True)):
            es = config.train.early_stopping
            head = _Head(
                config,
                [name for name, _ in layers],
                torch.Generator(),
                EarlyStopping(es.metric, es.patience, es.min_delta, enabled=es.enabled),
                [],
            )
            head.module = _StateView(self, k)
            self.heads.append(head)

    def _stack(self, layers: list[list[nn.Linear]]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Per layer, weights [K, in, out] (transposed: x @ W) and biases [K, out], the hidden width padded."""
        count, weights, biases = len(layers), [], []
        for depth in range(len(layers[0])):
            ins = max(head[depth].in_features for head in layers)
            outs = max(head[depth].out_features for head in layers)
            weight = torch.zeros(count, ins, outs)
            bias = torch.zeros(count, outs)
            for k, head in enumerate(layers):
                linear = head[depth]
                weight[k, : linear.in_features, : linear.out_features] = linear.weight.detach().T
                bias[k, : linear.out_features] = linear.bias.detach()
            weights.append(weight.to(self.device).requires_grad_(True))
            biases.append(bias.to(self.device).requires_grad_(True))
        return weights, biases

    def __len__(self) -> int:
        return len(self.heads)

    def active(self) -> list[int]:
        return [k for k, head in enumerate(self.heads) if not head.done]

    def head_state(self, k: int) -> dict[str, torch.Tensor]:
        """Head k's weights as the head alone names and shapes them (a `make_head` state dict), on the CPU."""
        state = {}
        widths_in = [None, self.widths[k]] if self.kind == "mlp" else [None]
        widths_out = [self.widths[k], None] if self.kind == "mlp" else [None]
        for name, weight, bias, width_in, width_out in zip(
            self.heads[k].layer_names, self.weights, self.biases, widths_in, widths_out, strict=True
        ):
            w = weight.detach()[k, :width_in, :width_out]
            state[f"{name}.weight"] = w.T.contiguous().cpu().clone()
            state[f"{name}.bias"] = bias.detach()[k, :width_out].cpu().clone()
        return state

    def load_head_state(self, k: int, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, weight, bias in zip(self.heads[k].layer_names, self.weights, self.biases, strict=True):
                w, b = state[f"{name}.weight"].T, state[f"{name}.bias"]
                weight[k, : w.shape[0], : w.shape[1]] = w.to(self.device)
                bias[k, : b.shape[0]] = b.to(self.device)

    # -- the forward pass ---------------------------------------------------------------------------------------

    def _dropout_mask(self, k: int, shape: tuple[int, int], width: int | None) -> torch.Tensor | None:
        """Head k's dropout mask for a [B, width] input (None: no dropout), drawn as `nn.Dropout` draws it from
        the head's own stream, then padded with ones to the stacked width."""
        p = self.dropouts[k]
        if not p:
            return None
        rows, columns = shape
        noise = torch.empty(rows, width or columns).bernoulli_(1 - p, generator=self.heads[k].generator)
        noise.div_(1 - p)
        if width is not None and width < columns:
            noise = torch.cat([noise, torch.ones(rows, columns - width)], dim=1)
        return noise

    def _masks(self, shape: tuple[int, int], widths: list[int | None]) -> torch.Tensor | None:
        masks = [self._dropout_mask(k, shape, widths[k]) for k in range(len(self.heads))]
        if all(m is None for m in masks):
            return None
        return torch.stack([torch.ones(shape) if m is None else m for m in masks]).to(self.device)

    def forward(self, features: torch.Tensor, train: bool) -> torch.Tensor:
        """Logits [K, B, classes] of every head for features [B, D]."""
        x: torch.Tensor = features.unsqueeze(0)  # [1, B, D], broadcast over heads until dropout makes it [K, B, D]
        layers = len(self.weights)
        for depth, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            if train:
                widths = [None] * len(self.heads) if depth == 0 else list(self.widths)
                mask = self._masks((features.shape[0], weight.shape[1]), widths)
                if mask is not None:
                    x = x * mask
            x = torch.matmul(x, weight) + bias.unsqueeze(1)
            if depth < layers - 1:
                x = torch.relu(x)
        return x

    # -- epochs -------------------------------------------------------------------------------------------------

    def _seed_epoch(self, epoch: int, loaders: dict[str, Any]) -> None:
        """As Trainer._seed_epoch: the epoch's order and each head's dropout depend on (seed, epoch) only."""
        seed = self.cfg.seed * 100_003 + epoch
        for head in self.heads:
            head.generator.manual_seed(seed)
        for loader in loaders.values():
            generator = getattr(loader, "generator", None)
            if generator is not None:
                generator.manual_seed(seed)

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _phase(self, loader: Iterable, train: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
        """One pass: per head the loss sum, top-1 and top-5 correct counts (as PhaseMetrics counts them)."""
        count = len(self.heads)
        loss_sum = torch.zeros(count, dtype=torch.float64)
        correct1 = torch.zeros(count, dtype=torch.long)
        correct5 = torch.zeros(count, dtype=torch.long)
        samples = 0
        active = {k for k, head in enumerate(self.heads) if not head.done}
        smoothing = self.cfg.label_smoothing
        grad = contextlib.nullcontext() if train else torch.inference_mode()
        with grad:
            for features, targets in loader:
                features = features.to(self.device, non_blocking=True)
                targets = targets.to(self.device, non_blocking=True)
                with self._autocast():
                    logits = self.forward(features, train)
                batch = targets.shape[0]
                # per head, the mean loss over the batch, as CrossEntropyLoss(label_smoothing) on it alone
                per_sample = F.cross_entropy(
                    logits.float().permute(1, 2, 0),
                    targets.unsqueeze(1).expand(batch, count),
                    reduction="none",
                    label_smoothing=smoothing,
                )
                losses = per_sample.mean(dim=0)
                if train:
                    self._step(losses.sum(), active)
                samples += batch
                loss_sum += losses.detach().double().cpu() * batch
                top = logits.detach().float().topk(min(5, self.num_classes), dim=2).indices.cpu()
                hits = top == targets.cpu().view(1, batch, 1)
                correct1 += hits[:, :, 0].sum(dim=1)
                correct5 += hits.any(dim=2).sum(dim=1)
        return loss_sum, correct1, correct5, samples

    def _step(self, loss: torch.Tensor, active: set[int]) -> None:
        for tensor in (*self.weights, *self.biases):
            tensor.grad = None
        self.scaler.scale(loss).backward()
        for k, views in enumerate(self.views):  # a stopped head gets no gradient: the optimizer skips it
            for view, tensor in zip(views, (*self.weights, *self.biases), strict=True):
                view.grad = tensor.grad[k] if k in active else None
        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.step += 1

    def run_epoch(self, epoch: int, loaders: dict[str, Any]) -> dict[int, dict[str, Any]]:
        """Train every running head for one epoch and validate them; returns each running head's epoch record
        (a training job's metrics line). Heads whose training ended get `done`."""
        started = time.perf_counter()
        active = self.active()
        self._seed_epoch(epoch, loaders)
        lrs = [group["lr"] for group in self.optimizer.param_groups]
        train = self._phase(loaders["train"], train=True)
        valid = self._phase(loaders["valid"], train=False) if "valid" in loaders else None
        if self.scheduler is not None:
            self.scheduler.step()
        seconds = (time.perf_counter() - started) / max(1, len(active))  # each head's share of the epoch
        records = {}
        for k in active:
            head = self.heads[k]
            record = {"epoch": epoch, "lr": lrs[k]}
            record.update(_metrics("train", train, k, with_top5=False))
            if valid is not None:
                record.update(_metrics("valid", valid, k, with_top5=True))
            record.update(step=self.step, epoch_time=seconds)
            head.history.append(record)
            head.epoch_record, head.epoch = record, epoch
            head.stopper.on_epoch_end(head)  # type: ignore[arg-type]  (a head reads as the Trainer it needs)
            if head.stop_reason or epoch >= self.epochs:
                head.done = True
            records[k] = record
        return records

    def stop(self, k: int, reason: str) -> None:
        """End head k's training now (a tuner's scheduler stopped its trial)."""
        self.heads[k].request_stop(reason)
        self.heads[k].done = True

    def finish(self, k: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
        """Head k's results for its job.json (as a single training job's) and its final weights (early
        stopping's best when the config restores it)."""
        head = self.heads[k]
        has_valid = any("valid_loss" in r for r in head.history)
        restore = head.config.train.early_stopping.restore_best and has_valid and head.stopper._best_state is not None
        state = dict(head.stopper._best_state) if restore else self.head_state(k)
        best_epoch = head.stopper.best_epoch if has_valid else None
        best = next((r for r in head.history if restore and r["epoch"] == best_epoch), None)
        results = {
            "epochs_run": len(head.history),
            "stop_reason": head.stop_reason,
            "best_epoch": best_epoch,
            "restored_best": bool(restore),
            "best": best or (head.history[-1] if head.history else None),
            "callback_failures": [],
        }
        return results, state


def _metrics(phase: str, sums: tuple, k: int, with_top5: bool) -> dict[str, float]:
    loss_sum, correct1, correct5, samples = sums
    nan = float("nan")
    out = {
        f"{phase}_loss": float(loss_sum[k]) / samples if samples else nan,
        f"{phase}_accuracy": int(correct1[k]) / samples if samples else nan,
    }
    if with_top5:
        out[f"{phase}_top5_accuracy"] = int(correct5[k]) / samples if samples else nan
    return out
