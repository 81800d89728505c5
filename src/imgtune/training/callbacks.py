"""The Trainer's events and the Callback base class.

The loop emits events; callbacks observe them through methods named ``on_<event>``. None of them edits the
loop. An optional callback that raises is reported and switched off, and training goes on; a `core` callback
that raises (the metrics file, checkpoints, early stopping: a job must not end "completed" without them) fails
the job. A callback that wants training to end raises `StopTraining` (fastai's CancelFitException), which the
loop honours cleanly.

Order of events in one fit::

    fit_start
      epoch_start
        phase_start(train)
          batch_start -> after_forward -> after_backward -> after_step -> batch_end   (per batch)
        phase_end(train)
        phase_start(valid) -> batch_start -> after_forward -> batch_end ... -> phase_end(valid)
      epoch_end
    fit_end
    phase_start(test) ... phase_end(test)    (when the job evaluates its test split)
"""

from __future__ import annotations

import traceback
from enum import StrEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from imgtune.training.trainer import Trainer


class Event(StrEnum):
    FIT_START = "fit_start"
    EPOCH_START = "epoch_start"
    PHASE_START = "phase_start"
    BATCH_START = "batch_start"
    AFTER_FORWARD = "after_forward"
    AFTER_BACKWARD = "after_backward"
    AFTER_STEP = "after_step"
    BATCH_END = "batch_end"
    PHASE_END = "phase_end"
    EPOCH_END = "epoch_end"
    FIT_END = "fit_end"


class StopTraining(Exception):  # noqa: N818 - a signal, not an error
    """Raised by a callback to end training after the current batch, with a reason for the record."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class Callback:
    """Base class: override the `on_<event>` methods you need. Lower `order` runs first; a `core` callback's
    failure fails the job (an optional one's is reported and switches it off)."""

    order: int = 0
    core: bool = False

    @property
    def name(self) -> str:
        return type(self).__name__

    def state_dict(self) -> dict:
        """State to keep in checkpoints, so a resumed job continues where it was."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class CallbackRunner:
    """Dispatches events to callbacks in order; isolates optional callbacks' failures."""

    def __init__(self, callbacks: list[Callback]):
        self.callbacks = sorted(callbacks, key=lambda cb: cb.order)
        self.failures: list[dict[str, str]] = []
        self._disabled: set[int] = set()

    def emit(self, event: Event, trainer: Trainer) -> None:
        """Call every callback's handler; a StopTraining is raised after all of them have run."""
        stop: StopTraining | None = None
        for cb in self.callbacks:
            if id(cb) in self._disabled:
                continue
            handler = getattr(cb, f"on_{event.value}", None)
            if handler is None:
                continue
            try:
                handler(trainer)
            except StopTraining as exc:
                stop = stop or exc
            except Exception as exc:
                if cb.core:
                    raise
                self._disabled.add(id(cb))
                self.failures.append(
                    {
                        "callback": cb.name,
                        "event": event.value,
                        "error": f"{type(exc).__name__}: {exc}",
                        "traceback": traceback.format_exc(),
                    }
                )
                trainer.log(f"callback {cb.name} failed on {event.value} and was switched off: {exc!r}")
        if stop is not None:
            raise stop
