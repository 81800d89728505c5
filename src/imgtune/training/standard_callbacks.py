"""The callbacks every training job uses: metrics file, early stopping, checkpoints, progress."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import torch

from imgtune.core.errors import JobError
from imgtune.core.io import atomic_output
from imgtune.core.progress import progress_bar
from imgtune.storage.jobs import Job, push_interval
from imgtune.training.callbacks import Callback

if TYPE_CHECKING:
    from imgtune.training.trainer import Trainer


def atomic_torch_save(obj: Any, path: Path) -> None:
    """torch.save into `path` atomically. A write that fails (a full disk) raises its own OSError, not torch's
    bare RuntimeError, and closes the file at once: the removed temp file's space is free again for the job to
    record its failure (torch's writer would keep it open while the error propagates)."""
    with atomic_output(path) as tmp, open(tmp, "wb") as handle:
        recorded = _KeepWriteErrors(handle)
        try:
            torch.save(obj, recorded)
        except RuntimeError:
            if recorded.error is not None:
                raise recorded.error from None
            raise


class _KeepWriteErrors:
    """A file for torch.save that keeps the OSError a write raised (torch turns it into a RuntimeError)."""

    def __init__(self, handle: Any):
        self.handle = handle
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self.handle.write(data)
        except OSError as exc:
            self.error = exc
            raise

    def flush(self) -> None:
        self.handle.flush()


class MetricsWriter(Callback):
    """Appends each finished epoch's record to the job's metrics.jsonl."""

    order = 10
    core = True

    def __init__(self, job: Job):
        self.job = job

    def on_epoch_end(self, trainer: Trainer) -> None:
        self.job.append_metrics(trainer.epoch_record)
        record = trainer.epoch_record
        valid = (
            f", valid loss {record['valid_loss']:.4f} acc {record['valid_accuracy']:.4f}"
            if "valid_loss" in record
            else ""
        )
        self.job.log(
            f"epoch {record['epoch']}: train loss {record['train_loss']:.4f} acc {record['train_accuracy']:.4f}{valid}"
        )


class EarlyStopping(Callback):
    """Stops when the monitored metric has not improved for `patience` epochs; keeps the best weights.

    The best weights are kept in memory and in `best_path` (for resumed jobs); `restore_best()` puts them
    back into the module at the end.
    """

    order = 20
    core = True

    def __init__(
        self,
        metric: str,
        patience: int,
        min_delta: float = 0.0,
        best_path: Path | None = None,
        enabled: bool = True,
        save_best: bool = True,
    ):
        self.metric = metric
        self.mode = "min" if metric.endswith("loss") else "max"
        self.patience = patience
        self.min_delta = min_delta
        self.best_path = best_path
        self.save_best = save_best  # off on data-parallel ranks but rank 0: they read the file rank 0 writes
        self.enabled = enabled
        self.best: float | None = None
        self.best_epoch: int | None = None
        self.wait = 0
        self._best_state: dict[str, torch.Tensor] | None = None

    def _improved(self, value: float) -> bool:
        if math.isnan(value):
            return False
        if self.best is None:
            return True
        return value < self.best - self.min_delta if self.mode == "min" else value > self.best + self.min_delta

    def on_epoch_end(self, trainer: Trainer) -> None:
        value = trainer.epoch_record.get(self.metric)
        if value is None:
            return
        if self._improved(value):
            self.best, self.best_epoch, self.wait = value, trainer.epoch, 0
            self._best_state = copy.deepcopy({k: v.detach().cpu() for k, v in trainer.module.state_dict().items()})
            if self.best_path and self.save_best:  # with its epoch: restore_best checks it against the checkpoint's
                atomic_torch_save({"epoch": self.best_epoch, "state": self._best_state}, self.best_path)
        else:
            self.wait += 1
            if self.enabled and self.wait >= self.patience:
                best = f"best {self.best:.4f} at epoch {self.best_epoch}" if self.best is not None else "never finite"
                trainer.request_stop(
                    f"early stopping: {self.metric} has not improved for {self.patience} epochs ({best})"
                )

    def restore_best(self, module: torch.nn.Module, log: Callable[[str], None] | None = None) -> bool:
        """Put the best epoch's weights back into `module`: those kept in memory, or (a resumed job) best.pt's,
        only when best.pt holds the epoch the checkpoint knows as the best (a job killed between writing best.pt
        and its checkpoint may leave a later one). Returns whether it did; `log` hears why not."""
        state = self._best_state
        if state is None and self.best_path and self.best_path.exists():
            saved = load_checkpoint(self.best_path)
            epoch, state = (saved["epoch"], saved["state"]) if set(saved) == {"epoch", "state"} else (None, saved)
            if epoch is not None and epoch != self.best_epoch:  # (a bare state dict: an older job's best.pt)
                if log is not None:
                    log(
                        f"best.pt holds epoch {epoch}, but the checkpoint's best is epoch {self.best_epoch}: "
                        "not restored, the model keeps its last epoch's weights"
                    )
                return False
        if state is None:
            return False
        module.load_state_dict(state)
        return True

    def state_dict(self) -> dict:
        return {"best": self.best, "best_epoch": self.best_epoch, "wait": self.wait}

    def load_state_dict(self, state: dict) -> None:
        self.best, self.best_epoch, self.wait = state["best"], state["best_epoch"], state["wait"]


class CheckpointStore(Protocol):
    """Where a job's training checkpoint goes: a file in the job (one process), or Ray Train's checkpoints
    (data-parallel workers: imgtune.runs.distributed)."""

    def save(self, state: dict[str, Any], epoch_record: dict[str, Any]) -> None:
        """Keep `state` as the latest checkpoint (called on every rank at each epoch's end)."""

    def load(self) -> dict[str, Any] | None:
        """The latest checkpoint's state, or None when there is none."""


class CheckpointFile:
    """The checkpoint of a job trained in one process: JOB/checkpoints/last.pt, written atomically."""

    def __init__(self, path: Path):
        self.path = path

    def save(self, state: dict[str, Any], epoch_record: dict[str, Any]) -> None:
        atomic_torch_save(state, self.path)

    def load(self) -> dict[str, Any] | None:
        return load_checkpoint(self.path) if self.path.exists() else None


def load_checkpoint(path: Path) -> dict[str, Any]:
    return torch.load(path, map_location="cpu", weights_only=True)


class Checkpointer(Callback):
    """Saves everything a resumed job needs after each epoch into its CheckpointStore."""

    order = 30
    core = True

    def __init__(self, store: CheckpointStore, class_ids: list[str]):
        self.store = store
        self.class_ids = class_ids

    def on_epoch_end(self, trainer: Trainer) -> None:
        self.store.save(
            {
                "class_ids": self.class_ids,
                "stop_reason": trainer.stop_reason,
                "epoch": trainer.epoch,
                "step": trainer.step,
                "module": trainer.module.state_dict(),
                "optimizer": trainer.optimizer.state_dict(),
                "scheduler": trainer.scheduler.state_dict() if trainer.scheduler else None,
                "scaler": trainer.scaler.state_dict(),
                "history": trainer.history,
                "callbacks": {cb.name: cb.state_dict() for cb in trainer.callbacks},
            },
            trainer.epoch_record,
        )


class RemotePush(Callback):
    """Pushes a job of a remote workspace after an epoch (at most every $IMGTUNE_PUSH_INTERVAL seconds), so that
    a job killed here can be resumed on another machine from a recent checkpoint."""

    order = 40  # after the Checkpointer

    def __init__(self, job: Job):
        self.job = job

    def on_epoch_end(self, trainer: Trainer) -> None:
        self.job.push(min_interval=push_interval(), strict=False)


def restore_checkpoint(trainer: Trainer, state: dict[str, Any], class_ids: list[str]) -> int:
    """Load a checkpoint's `state` into the trainer and its callbacks; returns the epoch to start from.

    Raises:
        JobError: the dataset's classes are not the ones the checkpoint was trained on.
    """
    if state.get("class_ids") != class_ids:
        raise JobError(
            "the dataset's classes changed since the job's checkpoint was written "
            f"({len(state.get('class_ids') or [])} then, {len(class_ids)} now)",
            "resume with the same data, or start a new job",
        )
    trainer.module.load_state_dict(state["module"])
    trainer.optimizer.load_state_dict(state["optimizer"])
    if trainer.scheduler is not None and state["scheduler"] is not None:
        trainer.scheduler.load_state_dict(state["scheduler"])
    if state.get("scaler"):
        trainer.scaler.load_state_dict(state["scaler"])
    trainer.step = state["step"]
    trainer.epoch = state["epoch"]
    trainer.history = list(state["history"])
    trainer.stop_reason = state.get("stop_reason")
    for cb in trainer.callbacks:
        if cb.name in state["callbacks"]:
            cb.load_state_dict(state["callbacks"][cb.name])
    return state["epoch"] + 1


class ProgressBar(Callback):
    """Rich progress: one bar for epochs, one for the batches of the current phase."""

    order = 90

    def __init__(self, enabled: bool = True):
        self.progress = progress_bar(enabled=enabled)
        self._epochs = None
        self._batches = None

    def on_fit_start(self, trainer: Trainer) -> None:
        self.progress.start()
        self._epochs = self.progress.add_task("epochs", total=trainer.epochs, completed=trainer.epoch, info="")

    def on_phase_start(self, trainer: Trainer) -> None:
        loader = trainer.loaders[trainer.phase]
        total = len(loader) if hasattr(loader, "__len__") else None
        if self._batches is None:
            self._batches = self.progress.add_task(trainer.phase, total=total, info="")
        self.progress.reset(self._batches, total=total, description=f"  {trainer.phase}", info="")

    def on_batch_end(self, trainer: Trainer) -> None:
        m = trainer.metrics
        self.progress.update(self._batches, advance=1, info=f"loss {m.loss:.4f} acc {m.accuracy:.3f}")

    def on_epoch_end(self, trainer: Trainer) -> None:
        r = trainer.epoch_record
        info = f"train acc {r['train_accuracy']:.3f}"
        if "valid_accuracy" in r:
            info += f" valid acc {r['valid_accuracy']:.3f} loss {r['valid_loss']:.4f}"
        if self._epochs is not None:
            self.progress.update(self._epochs, completed=trainer.epoch, info=info)

    def on_fit_end(self, trainer: Trainer) -> None:
        self.progress.stop()
