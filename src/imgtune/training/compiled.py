"""torch.compile for a network trained on images, where it pays: `train.compile` on, off or auto.

`auto` decides by measurement and remembers, as the inference backends do (imgtune.models.backends.choose): the
first job of a kind (device, torch, architecture, trainable parameters, batch and input shape, precision, memory
format) long enough to measure trains its first epoch eager (one-off costs: the debugger's dense window, warm-up),
then one epoch eager and one compiled, measured: their median step times (copy, forward, backward and optimizer,
the device waited for; data waits and callbacks left out; full batches only; the compiled epoch's first steps,
which compile, left out). It keeps the faster for its remaining epochs and records the choice in
``CACHE/training/compile.json``; a later job of that kind takes the recorded choice from its first step.
Compiling is slow the first time (two to three minutes for MobileNetV2 on a 2-core CPU; torch's own cache makes
it faster later), so auto only compiles in a job long enough to pay that back: the training left, estimated
from the measured (or remembered) eager step, must be MIN_JOB_SECONDS or more; a shorter job (or one with fewer
than MEASURE_EPOCHS epochs left after gradual unfreezing, or fewer than MIN_STEPS full batches an epoch) trains
eager and records nothing.

When the module's forward hooks change (the debugger removes the hooks a rule's first steps needed), the
compiled module is built again at the next epoch's start: a compiled graph keeps calling the hooks it was
traced with.

Evaluation stays eager; the compiled module shares the eager module's parameters, so checkpoints, the debugger
and the model bundle see one module. If compiling fails (no C++ compiler, an unsupported operator; in the
forward or in the backward, which compiles at the first backward), the step runs again eager, the rest of the
job trains eager, the job says why in its log and `compile` summary, and auto records nothing.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from imgtune.core.io import cache_dir
from imgtune.models.backends.base import architecture_signature, device_description
from imgtune.models.backends.choose import ChoiceRecord
from imgtune.training.callbacks import Callback

if TYPE_CHECKING:
    from imgtune.training.trainer import Trainer

MEASURE_EPOCHS = 4  # epochs left (after head-only ones) for auto to measure: warm-up, eager, compiled, the rest
MIN_STEPS = 8  # full batches an epoch, for a median step time worth comparing
COMPILE_STEPS = 2  # the compiled epoch's first full steps compile (forward, then backward): not timed
PAYS = 0.95  # compiled is taken when its median step takes at most this share of eager's
MIN_JOB_SECONDS = 1200.0  # eager training left, estimated from the eager step, for auto to compile


def record_file() -> Path:
    return cache_dir() / "training" / "compile.json"


def compile_key(
    module: nn.Module, device: torch.device, batch_size: int, image_size: int, amp: torch.dtype | None, nhwc: bool
) -> str:
    """What a measured choice holds for: the device, torch, the network and which of its parameters train, the
    batch and input shape, the autocast dtype and the memory format."""
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    parts = [device_description(device), torch.__version__, architecture_signature(module), f"trainable={trainable}"]
    parts += [f"batch={batch_size}", f"size={image_size}", f"amp={amp}", f"channels_last={nhwc}"]
    return "|".join(parts)


def step_seconds(trainer: Trainer) -> float:
    """The last training step's own time: the copy to the device, forward, backward and the optimizer step."""
    timing = trainer.step_timing
    return sum(timing.get(segment, 0.0) for segment in ("h2d", "forward", "backward", "optimizer"))


def forward_hooks(module: nn.Module) -> tuple[int, ...]:
    """Which forward hooks the module's submodules have now (their ids)."""
    return tuple(key for sub in module.modules() for key in (*sub._forward_hooks, *sub._forward_pre_hooks))


class CompiledTraining(Callback):
    """Puts the compiled module in the Trainer's training steps, by `mode` (see the module docstring).

    `key`: the choice's record key (compile_key); `full_batch`: the batch size whose steps are timed (the last,
    smaller batch of an epoch recompiles). `summary` (for job.json's `compile`) says what was done and why."""

    order = 4  # before the callbacks that time or inspect the epoch's steps

    def __init__(
        self,
        module: nn.Module,
        mode: str,
        key: str,
        full_batch: int,
        *,
        first_trainable_epoch: int = 1,
        record: ChoiceRecord | None = None,
        log: Callable[[str], None] | None = None,
        compiler: Callable[[nn.Module], nn.Module] = torch.compile,
        min_job_seconds: float = MIN_JOB_SECONDS,
    ):
        self.module = module
        self.mode = mode
        self.key = key
        self.full_batch = full_batch
        self.first_trainable_epoch = first_trainable_epoch
        self.record = record or ChoiceRecord(record_file())
        self.log = log or (lambda message: None)
        self.compiler = compiler
        self.min_job_seconds = min_job_seconds
        self.compiled: nn.Module | None = None
        self._compiled_with: tuple[int, ...] = ()  # the forward hooks the compiled module was traced with
        self.plan: dict[int, str] | None = None  # epoch -> "eager" | "compiled" | "measure-eager" | "measure-compiled"
        self.times: dict[str, list[float]] = {"eager": [], "compiled": []}
        self._full_steps = 0
        self._restore_sync: bool | None = None  # the Trainer's sync_timing before a measured epoch turned it on
        self.summary: dict[str, Any] = {"mode": mode, "compiled": False}

    # -- the plan -------------------------------------------------------------------------------------------

    def _make_plan(self, trainer: Trainer) -> dict[int, str]:
        epochs = range(trainer.epoch, trainer.epochs + 1)
        if self.mode != "auto":
            self.summary["chosen_by"] = "configuration"
            return dict.fromkeys(epochs, "compiled" if self.mode == "on" else "eager")
        steps = len(trainer.loaders["train"]) if hasattr(trainer.loaders["train"], "__len__") else 0
        remembered = self._remembered()
        first = max(trainer.epoch, self.first_trainable_epoch)  # head-only epochs train eager (another graph)
        if remembered is not None:
            self.summary.update(chosen_by="record", eager_step_s=remembered["eager_step_s"])
            self.summary["compiled_step_s"] = remembered["compiled_step_s"]
            left = remembered["eager_step_s"] * steps * (trainer.epochs - first + 1)
            plan = dict.fromkeys(epochs, "eager")
            if remembered["compiled"] and left < self.min_job_seconds:
                self.summary["reason"] = self._too_short(left)
            elif remembered["compiled"]:
                plan.update(dict.fromkeys(range(first, trainer.epochs + 1), "compiled"))
            return plan
        if trainer.epochs - first + 1 < MEASURE_EPOCHS or steps - 1 < MIN_STEPS:
            self.summary["chosen_by"] = "too short"
            self.summary["reason"] = (
                f"too short to measure (auto needs {MEASURE_EPOCHS} epochs of at least {MIN_STEPS + 1} batches "
                "with every parameter training)"
            )
            return dict.fromkeys(epochs, "eager")
        plan = dict.fromkeys(epochs, "eager")
        plan[first + 1], plan[first + 2] = "measure-eager", "measure-compiled"
        self.summary["chosen_by"] = "measurement"
        return plan

    def _remembered(self) -> dict[str, Any] | None:
        remembered = self.record.get(self.key)
        fields = {"compiled": bool, "eager_step_s": float, "compiled_step_s": float}
        if not isinstance(remembered, dict) or not all(isinstance(remembered.get(k), t) for k, t in fields.items()):
            return None  # none, or not one this version wrote: measured again
        return remembered

    def _too_short(self, left: float) -> str:
        return (
            f"about {left:.0f} s of training left: too little to pay back compiling (auto compiles with "
            f"{self.min_job_seconds:.0f} s or more)"
        )

    # -- the Trainer's hooks ---------------------------------------------------------------------------------

    def on_epoch_start(self, trainer: Trainer) -> None:
        if self.plan is None:
            self.plan = self._make_plan(trainer)
        wants = self.plan.get(trainer.epoch, "eager")
        self._full_steps = 0
        trainer.compiled_module = None
        if wants.startswith("measure"):  # device times, not launch times
            self._restore_sync, trainer.sync_timing = trainer.sync_timing, True
        if not wants.endswith("compiled") or "failed" in self.summary:
            return
        hooks = forward_hooks(trainer.train_module)
        if self.compiled is None or hooks != self._compiled_with:
            try:
                if self.compiled is not None:  # the graph was traced with hooks that are gone now
                    torch._dynamo.reset()
                self.compiled, self._compiled_with = self.compiler(trainer.train_module), hooks
            except Exception as exc:
                self.summary["failed"] = f"{type(exc).__name__}: {exc}"
                self._failed()
                return
        trainer.compiled_module = self.compiled
        self.summary["compiled"] = self.plan.get(trainer.epoch) == "compiled" or self.summary["compiled"]

    def on_batch_end(self, trainer: Trainer) -> None:
        wants = (self.plan or {}).get(trainer.epoch, "")
        if trainer.phase != "train" or not wants.startswith("measure") or trainer.inputs is None:
            return
        if trainer.inputs.shape[0] != self.full_batch:
            return
        self._full_steps += 1
        if wants == "measure-compiled" and self._full_steps <= COMPILE_STEPS:
            self.summary["compile_s"] = round(self.summary.get("compile_s", 0.0) + step_seconds(trainer), 3)
            return
        self.times["compiled" if wants == "measure-compiled" else "eager"].append(step_seconds(trainer))

    def on_phase_end(self, trainer: Trainer) -> None:
        if trainer.phase == "train":
            self._stop_syncing(trainer)

    def _stop_syncing(self, trainer: Trainer) -> None:
        if self._restore_sync is not None:
            trainer.sync_timing, self._restore_sync = self._restore_sync, None

    def on_epoch_end(self, trainer: Trainer) -> None:
        if trainer.compile_error is not None:
            if "failed" not in self.summary:
                self.summary["failed"] = trainer.compile_error
                self._failed()
            return
        measuring = (self.plan or {}).get(trainer.epoch)
        if measuring == "measure-eager":
            self._worth_compiling(trainer)
        elif measuring == "measure-compiled":
            self._decide()

    def on_fit_end(self, trainer: Trainer) -> None:
        trainer.compiled_module = None
        self._stop_syncing(trainer)
        if trainer.compile_error is not None and "failed" not in self.summary:  # failed in a stopped epoch
            self.summary["failed"] = trainer.compile_error
            self._failed()

    # -- deciding --------------------------------------------------------------------------------------------

    def _worth_compiling(self, trainer: Trainer) -> None:
        """After the measured eager epoch: is the training left long enough to pay back a compile? If not, eager
        on, and nothing recorded."""
        if not self.times["eager"]:
            return
        left = statistics.median(self.times["eager"]) * len(trainer.loaders["train"]) * (trainer.epochs - trainer.epoch)
        if left < self.min_job_seconds:
            assert self.plan is not None
            self.plan[trainer.epoch + 1] = "eager"
            self.summary.update(chosen_by="too short", reason=self._too_short(left))

    def _decide(self) -> None:
        eager, compiled = (statistics.median(self.times[k]) if self.times[k] else None for k in ("eager", "compiled"))
        if eager is None or compiled is None:
            self._settle(False, "no full steps to compare")
            return
        faster = compiled <= PAYS * eager
        self.summary.update(eager_step_s=round(eager, 4), compiled_step_s=round(compiled, 4))
        try:
            self.record.put(self.key, {"compiled": faster, "eager_step_s": eager, "compiled_step_s": compiled})
        except OSError as exc:
            self.log(f"the compile choice could not be remembered ({exc}): the next job measures again")
        self._settle(faster, f"median step {compiled:.3f} s compiled against {eager:.3f} s eager")

    def _settle(self, compiled: bool, why: str) -> None:
        assert self.plan is not None
        for epoch, what in self.plan.items():
            if not what.startswith("measure"):
                self.plan[epoch] = "compiled" if compiled else "eager"
        self.summary.update(compiled=compiled, reason=why)
        self.log(f"torch.compile {'pays' if compiled else 'does not pay'} here: {why}; the remaining epochs train "
                 f"{'compiled' if compiled else 'eager'}")  # fmt: skip

    def _failed(self) -> None:
        self.plan = dict.fromkeys(self.plan or {}, "eager")
        self.compiled = None
        self.summary.update(compiled=False, chosen_by="failure")
