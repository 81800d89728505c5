"""Trackers a job also reports to, as job plugins: MLflow (`mlflow_run`: runs, nested tuning trials, the model as
a pyfunc model, the registry) and TensorBoard (`tensorboard`: event files from what the job directory holds).

The job directory stays the record; a tracker reads what the job wrote (metrics.jsonl, the profiler's samples,
the debugger's tensors and rule results, report.html, the model bundle) and sends it on. A tracker that fails
never fails the job: what it could not log goes to the job's log and `tracking_gaps` in job.json.
"""

from __future__ import annotations

import math
from typing import Any

from imgtune.core.errors import ConfigError

# what a tracker sends of each epoch's record (metrics.jsonl), step = epoch
EPOCH_METRICS = ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "valid_top5_accuracy", "lr")
EPOCH_METRICS += ("epoch_time",)


def finite_number(value: Any) -> bool:
    """A real, finite number (trackers refuse NaN and infinities; booleans are not metrics)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def require(module: str, extra: str) -> None:
    """Refuse a tracker whose library is not installed, with the install command."""
    import importlib.util

    if importlib.util.find_spec(module) is None:
        raise ConfigError(
            f"{module} is not installed, and this job asks for it",
            f"pip install 'imgtune[{extra}]' (or leave out the option that turns it on)",
        )
