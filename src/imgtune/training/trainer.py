"""The training loop: one loop, many observers (see `imgtune.training.callbacks`)."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from imgtune.training import distributed
from imgtune.training.callbacks import Callback, CallbackRunner, Event, StopTraining
from imgtune.training.metrics import PhaseMetrics


def is_compile_error(exc: BaseException) -> bool:
    """Did torch.compile fail (dynamo, or inductor: no C++ compiler, a failed build, an unsupported operator),
    rather than the model's own computation?"""
    from torch._dynamo.exc import TorchDynamoException

    return isinstance(exc, TorchDynamoException) or type(exc).__module__.startswith("torch._inductor")


class Trainer:
    """Trains `module` on `loaders["train"]`, validates on `loaders["valid"]` each epoch.

    The state callbacks read is plain attributes: `epoch` (1-based), `step` (optimizer steps so far),
    `phase`, `batch_index`, `inputs`, `targets`, `outputs`, `loss`, `metrics` (the running PhaseMetrics),
    `epoch_record` (the finished epoch's numbers) and `history` (all epoch records).

    `step_timing` holds the current batch's seconds per segment (data wait, host-to-device copy, forward,
    backward, optimizer step), measured without the callbacks' own time; `batch_started` is when the batch's
    fetch began (perf_counter). With `sync_timing` on, CUDA work is waited for at each segment's end, so the
    times are the device's and not only the launches' (the profiler turns it on).

    Data-parallel (inside a torch.distributed process group of more than one rank): training steps run through
    DistributedDataParallel, whose gradients are averaged over ranks, while `module` stays the plain module
    (callbacks, checkpoints and the model bundle see no `module.` prefixes); each phase's metrics are summed over
    ranks before `phase_end`, so every rank sees the whole phase's numbers; a stop requested on any rank is agreed
    on by all after each training batch and each epoch, so no rank is left waiting for the others.
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer,
        loaders: dict[str, Iterable],
        *,
        epochs: int,
        num_classes: int,
        loss_fn: nn.Module | None = None,
        device: torch.device | str = "cpu",
        scheduler: Any = None,
        callbacks: Iterable[Callback] = (),
        amp_dtype: torch.dtype | None = None,
        seed: int = 0,
        log: Callable[[str], None] | None = None,
        data_parallel: bool | None = None,
        tta_flip: bool = False,
        channels_last: bool = False,
    ):
        self.module = module
        self.tta_flip = tta_flip  # evaluation averages the logits of each image and its mirror image
        self.memory_format = torch.channels_last if channels_last else torch.preserve_format  # of image batches
        # None: data-parallel whenever this process is one of several ranks; False: train alone even so.
        self.data_parallel = distributed.is_distributed() if data_parallel is None else data_parallel
        self._train_module = self._data_parallel(module, torch.device(device)) if self.data_parallel else module
        self.optimizer = optimizer
        self.loaders = loaders
        self.epochs = epochs
        self.num_classes = num_classes
        self.loss_fn = loss_fn or nn.CrossEntropyLoss()
        self.device = torch.device(device)
        self.scheduler = scheduler
        self.runner = CallbackRunner(list(callbacks))
        self.amp_dtype = amp_dtype
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=amp_dtype == torch.float16)
        self.seed = seed
        self._log = log
        self.epoch = 0
        self.step = 0
        self.phase = ""
        self.batch_index = 0
        self.inputs: torch.Tensor | None = None
        self.targets: torch.Tensor | None = None
        # what the loss compares the outputs with, when a callback changed it at batch_start (MixUp's soft labels);
        # `targets` stay the batch's labels, for the metrics
        self.loss_targets: torch.Tensor | None = None
        self.outputs: torch.Tensor | None = None
        self.loss: torch.Tensor | None = None
        self.metrics: PhaseMetrics | None = None
        self.epoch_record: dict[str, Any] = {}
        self.history: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.step_timing: dict[str, float] = {}
        self.batch_started = 0.0
        self.sync_timing = False
        self._mark_time = 0.0
        # torch.compile's module for training steps, when a callback puts one here (imgtune.training.compiled);
        # if it fails, the step runs eager, this stays None and `compile_error` says why
        self.compiled_module: nn.Module | None = None
        self.compile_error: str | None = None

    @property
    def train_module(self) -> nn.Module:
        """What a training step runs: the module, or its DistributedDataParallel wrapper."""
        return self._train_module

    @staticmethod
    def _data_parallel(module: nn.Module, device: torch.device) -> nn.Module:
        if not any(p.requires_grad for p in module.parameters()):
            return module
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None)

    @property
    def callbacks(self) -> list[Callback]:
        return self.runner.callbacks

    def log(self, message: str) -> None:
        if self._log:
            self._log(message)

    def emit(self, event: Event) -> None:
        try:
            self.runner.emit(event, self)
        except StopTraining as stop:
            self.stop_reason = self.stop_reason or stop.reason
            self.log(f"stop requested: {stop.reason}")

    def request_stop(self, reason: str) -> None:
        """End training after the current batch (for callbacks; same as raising StopTraining)."""
        self.stop_reason = self.stop_reason or reason

    def _agree_on_stop(self) -> bool:
        """Every rank calls this at the same point: True when any rank asked to stop; then all ranks keep the
        reason of the lowest rank that asked."""
        if not self.data_parallel:
            return self.stop_reason is not None
        first = distributed.first_stopping_rank(self.stop_reason is not None)
        if first is None:
            return False
        self.stop_reason = distributed.broadcast_text(self.stop_reason, first)
        return True

    def current_lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def _seed_epoch(self, epoch: int) -> None:
        """Randomness of an epoch depends on (seed, epoch) only, so a resumed epoch is the same epoch."""
        torch.manual_seed(self.seed * 100_003 + epoch)
        for loader in self.loaders.values():
            generator = getattr(loader, "generator", None)
            if generator is not None:
                generator.manual_seed(self.seed * 100_003 + epoch)
            for owner in (loader, getattr(loader, "dataset", None), getattr(loader, "sampler", None)):
                if hasattr(owner, "set_epoch"):
                    owner.set_epoch(epoch)

    def _start_timing(self) -> None:
        self.step_timing = {}
        self.batch_started = self._mark_time = time.perf_counter()

    def _mark(self, segment: str) -> None:
        """Close a timed segment: the time since the last mark goes to `segment`."""
        if self.sync_timing and self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.step_timing[segment] = self.step_timing.get(segment, 0.0) + now - self._mark_time
        self._mark_time = now

    def _resume_timing(self) -> None:
        """After callbacks ran: their time is not the next segment's."""
        self._mark_time = time.perf_counter()

    def run_phase(self, phase: str, *, train: bool, confusion: bool = False) -> PhaseMetrics:
        """One pass over `loaders[phase]`, training or evaluating."""
        self.phase = phase
        self.metrics = PhaseMetrics(self.num_classes, confusion=confusion)
        self.module.train(train)
        forward = self.module
        if train:
            forward = self._train_module if self.compiled_module is None else self.compiled_module
        if self.data_parallel and not train:
            distributed.share_buffers(self.module)  # every rank evaluates rank 0's model (the one it saves)
        self.emit(Event.PHASE_START)
        grad = contextlib.nullcontext() if train else torch.inference_mode()
        with grad:
            batches = iter(self.loaders[phase])
            batch_index = 0
            while True:
                self._start_timing()
                try:
                    inputs, targets = next(batches)
                except StopIteration:
                    break
                self._mark("data")
                self.batch_index = batch_index
                self.inputs = inputs.to(self.device, non_blocking=True, memory_format=self.memory_format)
                self.targets = targets.to(self.device, non_blocking=True)
                self.loss_targets = None
                self._mark("h2d")
                self.emit(Event.BATCH_START)
                self._resume_timing()
                compiled = self.compiled_module is not None and forward is self.compiled_module
                try:
                    self._forward(forward, train)
                except Exception as exc:
                    if not (compiled and is_compile_error(exc)):
                        raise
                    forward, compiled = self._compile_failed(exc), False
                    self._forward(forward, train)
                self._mark("forward")
                self.emit(Event.AFTER_FORWARD)
                if train:
                    self._resume_timing()
                    self.optimizer.zero_grad(set_to_none=True)
                    failure = None
                    try:
                        self.scaler.scale(self.loss).backward()
                    except Exception as exc:  # a compiled module compiles its backward at the first backward
                        if not (compiled and is_compile_error(exc)):
                            raise
                        failure = exc
                    if failure is not None:  # (outside the handler: the failed graph's tensors are let go first)
                        self.outputs = self.loss = None
                        forward, compiled, failure = self._compile_failed(failure), False, None
                        self.optimizer.zero_grad(set_to_none=True)
                        self._forward(forward, train)  # once more, eager (batch-norm statistics see the batch twice)
                        self.scaler.scale(self.loss).backward()
                    if self.scaler.is_enabled():  # callbacks see true gradients, not loss-scaled ones
                        self.scaler.unscale_(self.optimizer)
                    self._mark("backward")
                    self.emit(Event.AFTER_BACKWARD)
                    self._resume_timing()
                    self.scaler.step(self.optimizer)
                    self.scaler.update()
                    self._mark("optimizer")
                    self.step += 1
                    self.emit(Event.AFTER_STEP)
                self.metrics.update(self.outputs, self.targets, self.loss)
                self.emit(Event.BATCH_END)
                batch_index += 1
                if train and self._agree_on_stop():
                    break
        if self.data_parallel:
            self.metrics.sum_over_ranks()
        self.emit(Event.PHASE_END)
        return self.metrics

    def _forward(self, forward: nn.Module, train: bool) -> None:
        """The batch's outputs and loss (MixUp's soft targets, when a callback set them)."""
        with self._autocast():
            self.outputs = forward(self.inputs)
            if self.tta_flip and not train and self.inputs.dim() == 4:
                self.outputs = (self.outputs + forward(self.inputs.flip(-1))) / 2
            loss_targets = self.targets if self.loss_targets is None else self.loss_targets
            self.loss = self.loss_fn(self.outputs.float(), loss_targets)

    def _compile_failed(self, exc: Exception) -> nn.Module:
        """The compiled module failed (it compiles at its first call): train on eager; returns what to run."""

        def said(error: BaseException) -> str:
            return f"{type(error).__name__}: {(str(error).strip().splitlines() or [''])[0][:300]}"

        cause = getattr(exc, "inner_exception", None) or exc.__cause__  # dynamo's BackendCompilerFailed wraps it
        self.compile_error = said(exc) + (f" {said(cause)}" if cause is not None else "")
        self.compiled_module = None
        self.log(f"torch.compile failed ({self.compile_error}): training goes on eager")
        return self._train_module

    def fit(self, start_epoch: int = 1) -> list[dict[str, Any]]:
        """Train from `start_epoch` to `epochs` (or until a callback stops it); returns the history."""
        # Ranks leave the loop only on an agreed stop: a stop asked between two agreements (a callback in
        # phase_end, the debugger's watchdog thread) is seen by every rank at the next one, never by one alone.
        self.emit(Event.FIT_START)
        stopping = self._agree_on_stop()
        for epoch in range(start_epoch, self.epochs + 1):
            if stopping:
                break
            self.epoch = epoch
            self._seed_epoch(epoch)
            started = time.perf_counter()
            self.epoch_record = {"epoch": epoch}
            self.emit(Event.EPOCH_START)
            self.epoch_record["lr"] = self.current_lr()  # (after epoch_start: a callback may set it)
            train = self.run_phase("train", train=True)
            self.epoch_record.update(train_loss=train.loss, train_accuracy=train.accuracy)
            if self._agree_on_stop():  # stopped mid-epoch: the epoch is incomplete, record nothing for it
                break
            if "valid" in self.loaders:
                valid = self.run_phase("valid", train=False)
                self.epoch_record.update(
                    valid_loss=valid.loss, valid_accuracy=valid.accuracy, valid_top5_accuracy=valid.top5
                )
            if self.scheduler is not None:
                self.scheduler.step()
            self.epoch_record.update(step=self.step, epoch_time=time.perf_counter() - started)
            self.history.append(self.epoch_record)
            self.emit(Event.EPOCH_END)
            stopping = self._agree_on_stop()
        self.emit(Event.FIT_END)
        return self.history

    def evaluate(self, phase: str, confusion: bool = True) -> PhaseMetrics:
        """Evaluate the module on `loaders[phase]` (e.g. the test split)."""
        return self.run_phase(phase, train=False, confusion=confusion)
