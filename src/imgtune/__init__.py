"""imgtune: train, tune, debug, profile and serve image classifiers on your own machine.

The public API (what the CLI calls too)::

    import imgtune

    job = imgtune.train("photos/", backbone="mobilenet_v2", epochs=5)   # a training job (debugger, profiler on)
    tuning = imgtune.tune("photos/", max_trials=8)                        # trials on Ray Tune
    final = imgtune.train_best(tuning)                                    # the best hyperparameters, tested
    imgtune.evaluate(final, "photos/", split="test")
    with imgtune.deploy(final, port=0, background=True) as endpoint:      # an HTTP endpoint in this process
        print(imgtune.predict(["dog.jpg"], endpoint=endpoint.url))

Names load on first use, so `import imgtune` stays cheap.
"""

from __future__ import annotations

import importlib
from typing import Any

from imgtune.core.version import __version__

_EXPORTS = {
    # running jobs
    "train": "imgtune.runs.api",
    "tune": "imgtune.runs.api",
    "train_best": "imgtune.runs.api",
    "evaluate": "imgtune.runs.api",
    "pipeline": "imgtune.runs.api",
    "demo": "imgtune.runs.api",
    "deploy": "imgtune.runs.api",
    "load_predictor": "imgtune.runs.api",
    "predict": "imgtune.runs.api",
    "batch_transform": "imgtune.runs.api",
    "export": "imgtune.runs.api",
    "write_report": "imgtune.runs.api",
    "export_tensorboard": "imgtune.runs.api",
    "job_config": "imgtune.runs.api",
    # reading jobs and data
    "open_job": "imgtune.runs.api",
    "list_jobs": "imgtune.runs.api",
    "open_tuning_job": "imgtune.runs.api",
    "workspace_label": "imgtune.runs.api",
    "job_summary": "imgtune.runs.inspect",
    "job_details": "imgtune.runs.inspect",
    "jobs_overview": "imgtune.runs.inspect",
    "tuning_summary": "imgtune.runs.inspect",
    "pipeline_summary": "imgtune.runs.inspect",
    "check_data": "imgtune.runs.inspect",
    "download_dataset": "imgtune.runs.inspect",
    "debug_rules": "imgtune.runs.inspect",
    "debug_results": "imgtune.runs.inspect",
    "plot_tensor": "imgtune.runs.inspect",
    "open_trial": "imgtune.debugger.store",
    # types
    "JobConfig": "imgtune.config",
    "TuneOptions": "imgtune.config",
    "ServeOptions": "imgtune.config",
    "PipelineOptions": "imgtune.config",
    "Job": "imgtune.storage.jobs",
    "JobRecord": "imgtune.storage.record",
    "Callback": "imgtune.training.callbacks",
    "StopTraining": "imgtune.training.callbacks",
    "JobPlugin": "imgtune.training.plugin",
    "ImgtuneError": "imgtune.core.errors",
    "ConfigError": "imgtune.core.errors",
    "DataError": "imgtune.core.errors",
    "JobError": "imgtune.core.errors",
    "WeightsError": "imgtune.core.errors",
    "DownloadError": "imgtune.core.errors",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'imgtune' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
