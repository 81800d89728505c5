"""The debugger's capture: a Trainer callback that saves tensor reductions to the job's store.

Collections (names as SageMaker Debugger uses them):

* ``losses``: the batch loss of every step, in every mode (a scalar, always saved);
* ``metrics``: each epoch's train/valid loss and accuracy;
* ``weights``, ``biases``: trainable parameters; ``gradients``: their gradients (``gradient/NAME``);
* ``optimizer_variables``: the learning rate of each parameter group;
* ``activations`` (opt-in): inputs and outputs of modules matching a regex, named like
  ``head.1_relu_input`` so that SageMaker's rule regexes (``.*relu_input``) match;
* ``inputs`` (opt-in): statistics of the input batches, and per-channel means of image batches;
* ``predictions`` (opt-in): labels and predicted classes of saved batches (for ClassImbalance).

Steps: ``step`` is a global counter over all modes' batches (and each epoch's metrics, which take a step of
their own); ``mode_step`` counts the batches of one mode (train, eval = the valid phase, predict = the test
phase). A mode's SaveConfig decides which mode steps are saved; rules can ask for a dense window of early steps
(e.g. PoorWeightInitialization's first 10).
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from imgtune.config import DebuggerConfig
from imgtune.debugger.store import TensorWriter, reduce_tensor
from imgtune.training.callbacks import Callback

if TYPE_CHECKING:
    from imgtune.training.trainer import Trainer

MODE_OF_PHASE = {"train": "train", "valid": "eval", "test": "predict"}


@dataclass(frozen=True)
class Requirement:
    """What a rule needs captured: a collection (and for activations, a name regex) in train steps < until."""

    collection: str
    regex: str | None = None
    until_step: int | None = None  # dense capture of the first steps; None: the mode's SaveConfig
    activity: tuple[float, float] | None = None  # per-channel share of values inside these bounds


def channel_activity(tensor: torch.Tensor, low: float, high: float) -> list[int]:
    """Histogram (101 bins, 0-100 %) of the per-channel share of values strictly inside (low, high).

    Channels are dim 1 of [batch, channels, ...] (or the last dim of [batch, features]); a channel's share
    counts all its values over the batch and positions. DeadRelu and SaturatedActivation read this.
    """
    t = tensor.detach().float()
    per_channel = t.transpose(0, 1).reshape(t.shape[1], -1) if t.dim() >= 2 else t.reshape(1, -1)
    inside = ((per_channel > low) & (per_channel < high)).float().mean(dim=1) * 100
    return torch.bincount(inside.round().long().clamp(0, 100), minlength=101).tolist()


class DebuggerCallback(Callback):
    """Saves the configured collections as training goes (see the module docstring)."""

    order = 25  # before the Checkpointer (30), so a checkpoint counts the epoch's metrics record

    def __init__(
        self,
        directory: Path,
        config: DebuggerConfig,
        *,
        prefix: str = "",
        requirements: list[Requirement] | None = None,
    ):
        self.config = config
        self.prefix = prefix
        self.requirements = requirements or []
        self.writer = TensorWriter(directory)
        self.step = 0
        self.mode_steps = dict.fromkeys(("train", "eval", "predict"), 0)
        self.mode = "train"
        self._saving = False
        self._active = True  # until the first batch decides
        self._hooks: list[Any] = []
        self._pending: dict[str, torch.Tensor] = {}
        self._before_update: dict[str, torch.Tensor] = {}
        self._resumed = False
        self._calls: dict[str, int] = {}  # activation records per name in this step (modules called twice)
        collections = set(config.collections)
        self.collections = collections | {r.collection for r in self.requirements}

    @property
    def trial(self):
        return self.writer.trial

    # -- what to save -----------------------------------------------------------------------------------

    def _wants(self, collection: str, name: str | None = None) -> bool:
        """Is `collection` (tensor `name`) saved at the current step, by config or by a rule's requirement?"""
        if not self._active:  # most steps: nothing but the loss is saved
            return False
        if self._saving and collection in self.config.collections:
            return True
        return any(self._requirement_applies(r, collection, name) for r in self.requirements)

    def _step_is_active(self) -> bool:
        """Does anything beyond the loss get saved at this step (the SaveConfig, or a rule's dense window)?"""
        return self._saving or any(r.until_step is not None and self._in_dense_window(r) for r in self.requirements)

    def _in_dense_window(self, req: Requirement) -> bool:
        return self.mode == "train" and self.mode_steps["train"] < req.until_step

    def _requirement_applies(self, req: Requirement, collection: str, name: str | None) -> bool:
        if req.collection != collection or (req.regex and name and not re.fullmatch(req.regex, name)):
            return False
        if req.until_step is not None:
            return self._in_dense_window(req)
        return self._saving

    def _record(
        self, name: str, collection: str, tensor: torch.Tensor | None = None, value: float | None = None, **extra: Any
    ) -> None:
        record = {
            "mode": self.mode,
            "step": self.step,
            "mode_step": self.mode_steps[self.mode],
            "name": name,
            "collection": collection,
            **extra,
        }
        if tensor is None:
            record["v"] = float(value)  # a scalar is stored as its value; the reader derives its reductions
        else:
            record["r"], histogram = reduce_tensor(tensor, self.config.histogram_bins)
            if histogram:
                record["h"] = histogram
        self.writer.write(record)
        if self.config.save_raw and tensor is not None:
            self._pending[name] = tensor.detach().cpu().clone()

    # -- hooks ------------------------------------------------------------------------------------------

    def on_fit_start(self, trainer: Trainer) -> None:
        self._attach_activation_hooks(trainer.module)

    def _activations_done(self) -> bool:
        """Will no later step save activations? (They were only asked for by rules' dense windows, now past.)"""
        if "activations" in self.config.collections:
            return False
        windows = [r.until_step for r in self.requirements if r.collection == "activations"]
        return None not in windows and self.mode_steps["train"] >= max(windows, default=0)

    def _detach_activation_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def _attach_activation_hooks(self, module: nn.Module) -> None:
        if self._hooks or "activations" not in self.collections or self._activations_done():
            return
        regex = re.compile(self.config.activations_regex, re.IGNORECASE)
        required = [re.compile(r.regex) for r in self.requirements if r.collection == "activations" and r.regex]
        for name, sub in module.named_modules():
            kind = type(sub).__name__.lower()
            base = f"{self.prefix}{name}_{kind}"
            wanted = "activations" in self.config.collections and regex.fullmatch(f"{name}:{type(sub).__name__}")
            wanted = wanted or any(r.fullmatch(f"{base}_input") or r.fullmatch(f"{base}_output") for r in required)
            if name and wanted:
                self._hooks.append(sub.register_forward_hook(self._activation_hook(base)))

    def _activation_hook(self, base: str):
        @torch.compiler.disable  # recorded in Python, outside a compiled graph (train.compile)
        def hook(module: nn.Module, inputs: tuple, output: Any) -> None:
            if isinstance(inputs, tuple) and inputs and isinstance(inputs[0], torch.Tensor):
                self._record_activation(f"{base}_input", inputs[0])
            if isinstance(output, torch.Tensor):
                self._record_activation(f"{base}_output", output)

        return hook

    def _record_activation(self, name: str, tensor: torch.Tensor) -> None:
        if not self._wants("activations", name):
            return
        calls = self._calls.get(name, 0)
        self._calls[name] = calls + 1
        if calls:  # a module called again in the same step (ResNet's shared relu): its own record, still
            base, io = name.rsplit("_", 1)  # matching regexes like .*relu_input
            module, kind = base.rsplit("_", 1)
            name = f"{module}_call{calls}_{kind}_{io}"
        extra = {}
        for req in self.requirements:
            if req.activity and req.regex and re.fullmatch(req.regex, name):
                extra["activity"] = {"bounds": list(req.activity), "hist": channel_activity(tensor, *req.activity)}
                break
        self._record(name, "activations", tensor, **extra)

    def on_phase_start(self, trainer: Trainer) -> None:
        self.mode = MODE_OF_PHASE.get(trainer.phase, "eval")
        self._attach_activation_hooks(trainer.module)

    def on_batch_start(self, trainer: Trainer) -> None:
        self._calls.clear()
        save_config = getattr(self.config, self.mode)
        self._saving = save_config.should_save(self.mode_steps[self.mode])
        self._active = self._step_is_active()
        if self._wants("inputs", "inputs") and trainer.inputs is not None:
            self._record("inputs", "inputs", trainer.inputs, batch=int(trainer.inputs.shape[0]))
            if trainer.inputs.dim() == 4:
                for channel, mean in enumerate(trainer.inputs.float().mean(dim=(0, 2, 3)).tolist()):
                    self._record(f"inputs_channel{channel}_mean", "inputs", value=mean)

    def on_after_forward(self, trainer: Trainer) -> None:
        if "losses" in self.collections and trainer.loss is not None:
            extra = {"resumed": True} if self._resumed else {}
            self._resumed = False
            self._record("loss", "losses", value=float(trainer.loss.detach()), t=round(time.time(), 3), **extra)
        if self._wants("predictions") and trainer.targets is not None and trainer.outputs is not None:
            # For ClassImbalance: labels and predictions of the batch, raw (they are small).
            self._record_raw_ints("labels", trainer.targets)
            self._record_raw_ints("predictions", trainer.outputs.detach().argmax(dim=1))

    def _record_raw_ints(self, name: str, values: torch.Tensor) -> None:
        record = {
            "mode": self.mode,
            "step": self.step,
            "mode_step": self.mode_steps[self.mode],
            "name": name,
            "collection": "predictions",
            "v": float(values.float().mean()),
            "values": values.detach().cpu().tolist(),
        }
        self.writer.write(record)

    def on_after_backward(self, trainer: Trainer) -> None:
        self._before_update = {}
        if not self._active:  # most steps: not a look at the parameters (a cost that grows with the network)
            return
        if any(r.collection == "weight_updates" for r in self.requirements):
            for name, param in trainer.module.named_parameters():
                if param.requires_grad and not name.endswith("bias") and self._wants("weights", self.prefix + name):
                    self._before_update[name] = param.detach().clone()
        for name, param in trainer.module.named_parameters():
            full = f"gradient/{self.prefix}{name}"
            if param.grad is not None and self._wants("gradients", full):
                self._record(full, "gradients", param.grad)

    def on_after_step(self, trainer: Trainer) -> None:
        if not self._active:
            return
        for name, param in trainer.module.named_parameters():
            if not param.requires_grad:
                continue
            collection = "biases" if name.endswith("bias") else "weights"
            full = f"{self.prefix}{name}"
            if self._wants(collection, full):
                extra = {}
                before = self._before_update.get(name)
                if before is not None:  # WeightUpdateRatio: |w_after - w_before| / |w_before| (L2 norms)
                    extra["update"] = {"l2": float((param.detach() - before).norm()), "prev_l2": float(before.norm())}
                self._record(full, collection, param, **extra)
        self._before_update = {}
        if self._wants("optimizer_variables", "lr"):
            for i, group in enumerate(trainer.optimizer.param_groups):
                self._record(f"optimizer/lr_group{i}", "optimizer_variables", value=float(group["lr"]))

    def on_batch_end(self, trainer: Trainer) -> None:
        if self._pending:
            self.writer.write_raw(self.mode, self.step, self._pending)
            self._pending = {}
        self.step += 1
        self.mode_steps[self.mode] += 1
        if self._hooks and self._activations_done():  # past the rules' windows: no hook runs per module call
            self._detach_activation_hooks()

    def on_phase_end(self, trainer: Trainer) -> None:
        self.writer.flush()

    def on_epoch_end(self, trainer: Trainer) -> None:
        if "metrics" not in self.collections:
            return
        saved_mode, self.mode = self.mode, "train"
        for key in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy"):
            if key in trainer.epoch_record:
                self._record(key, "metrics", value=float(trainer.epoch_record[key]))
        self.mode = saved_mode
        self.writer.flush()
        # The metrics take a global step of their own: the rule runner evaluates each step once, right after
        # the epoch's metrics, so a next batch sharing their step would never be evaluated online.
        self.step += 1

    # -- resume -----------------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        return {"step": self.step, "mode_steps": dict(self.mode_steps)}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.mode_steps = state["step"], dict(state["mode_steps"])
        self.writer.truncate_after(self.step - 1)
        self._resumed = True  # the next loss record says so (StalledTraining ignores the gap before it)

    def close(self) -> None:
        self._detach_activation_hooks()
        self.writer.close()
