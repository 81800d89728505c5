"""A training job: config in, job directory (metrics, checkpoints, model bundle, report) out.

`run_training_job` is what `imgtune train` and `imgtune.train` call; tuning trials call it too.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from imgtune.config import JobConfig, build_config
from imgtune.config.job import recorded_config
from imgtune.core.errors import ConfigError, DataError
from imgtune.data.sources import is_remote
from imgtune.runs.lifecycle import JobLifecycle
from imgtune.runs.plugins import check_plugins, training_plugins
from imgtune.runs.trust import forget_untrusted_run, trusted_config
from imgtune.storage.jobs import Job
from imgtune.storage.record import JobRecord
from imgtune.training.callbacks import Callback
from imgtune.training.process import train_in_this_process
from imgtune.training.setup import trains_head_on_features, versions


def run_training_job(
    config: JobConfig | None = None,
    *,
    workspace: str | Path | None = None,
    resume: str | Path | None = None,
    callbacks: Iterable[Callback] = (),
    progress: bool = True,
    on_finding: Callable[[str, Any], None] | None = None,
    force: bool = False,
    must_push: bool = True,
    ray_address: str | None = None,
    ray_train: bool = False,
    rule_files: list[str] | None = None,
) -> Job:
    """Run a training job to the end and return its directory.

    Args:
        config: the job; ignored when resuming (the job's own config is used).
        workspace: where jobs live (default ./imgtune-runs or $IMGTUNE_WORKSPACE).
        resume: a job name or path to continue from its last checkpoint.
        callbacks: extra Trainer callbacks (tuning reporters, your own).
        progress: show progress bars.
        on_finding: called with (rule name, Finding) whenever a debugger rule finds an issue.
        force: resume a job recorded as running on another machine (that machine is gone).
        must_push: in an s3:// workspace, a job that succeeded but could not be pushed at its end raises
            (a tuning trial does not: its tuning job pushes it again at the end).
        ray_address: the Ray cluster a data-parallel job (train.workers > 1) runs on (default: an in-process
            Ray); never read from a job, so a resumed job runs where its resumer says.
        ray_train: run on Ray Train workers even when train.workers is 1 (what the distributed path costs at
            one worker: benchmarks/distributed.py); `imgtune train --workers 1` keeps the single process.
        rule_files: with `resume`, debugger rule files the resuming user trusts (added to a local job's own; for a
            job from a bucket, the only ones run: imgtune.runs.trust).
    """
    if resume is not None:
        with JobLifecycle.resume(resume, workspace, "training", force=force, must_push=must_push) as life:
            forget_untrusted_run(life.job)
            # a bucket's job runs no file of its own, only the resuming user's
            recorded = trusted_config(life.job, life.job.record().config or {}, rule_files)
            config = build_config(recorded_config(recorded), f"config of job {life.job.name}")
            return _train(life, config, callbacks, progress, on_finding, ray_address, ray_train)
    else:
        if config is None:
            raise ConfigError("run_training_job needs a config or a job to resume")
        if not is_remote(config.data.path) and not Path(config.data.path).expanduser().is_dir():
            raise DataError(f"dataset folder not found: {config.data.path}", "check the path given to --data")
        check_plugins(config)  # unknown rules or parameters: refused before a job directory exists
        record = JobRecord(name=config.name or "", kind="training", config=config.model_dump(mode="json"))
        with JobLifecycle.create(workspace, record, prefix=config.model.backbone, must_push=must_push) as life:
            return _train(life, config, callbacks, progress, on_finding, ray_address, ray_train)


def _train(
    life: JobLifecycle,
    config: JobConfig,
    callbacks: Iterable[Callback],
    progress: bool,
    on_finding: Callable[[str, Any], None] | None,
    ray_address: str | None,
    ray_train: bool = False,
) -> Job:
    life.use_plugins(training_plugins(config))
    on_workers = config.train.workers > 1 or ray_train
    if on_workers and not trains_head_on_features(config):
        from imgtune.runs.distributed import train_on_workers

        def train_data_parallel(life: JobLifecycle) -> dict[str, Any]:
            return train_on_workers(life, config, ray_address=ray_address, callbacks=list(callbacks), progress=progress)

        return life.run(train_data_parallel, versions=versions())

    def train(life: JobLifecycle) -> dict[str, Any]:
        feature_backend = None
        if on_workers:  # the workers build the feature cache; the head trains here, in one process
            from imgtune.runs.distributed import build_features_on_workers

            built = build_features_on_workers(life, config, ray_address=ray_address, progress=progress)
            feature_backend = built["feature_backend"]
            where = f"the job's own process (pid {os.getpid()} on {socket.gethostname()})"
            life.job.update(head_trained_on=where)
            life.job.log(
                f"{config.train.workers} workers computed {built['entries_computed']} feature cache entries "
                f"({feature_backend}); the head trains on them in {where}"
            )
        return train_in_this_process(
            life.job,
            config,
            life.plugins,
            resuming=life.resumed,
            callbacks=list(callbacks),
            progress=progress,
            timings=life.timings,
            started=life.started,
            on_finding=on_finding,
            feature_backend=feature_backend,
        )

    return life.run(train, versions=versions())
