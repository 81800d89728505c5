"""A tuning job: many training jobs (trials) on Ray Tune, inside one job directory.

Layout of a tuning job::

    JOB/
      job.json      kind "tuning": options, search space, status, trials (best first), best hyperparameters
      trials/       one training job per trial (trial-<id>), with its own metrics, checkpoints and model
      ray/          Ray Tune's experiment state: what `--resume` restores on this machine (it never leaves it; a
                    resume elsewhere rebuilds the search from the trials' own records: tuning.tuner.rebuild)
      logs.txt

The objective is a validation metric reported every epoch (never the test split: trials do not evaluate
it). With a frozen backbone, the feature cache is computed once before trials start, so a trial costs only
head training. Strategies: bayesian (Optuna's TPE through OptunaSearch), random, grid, hyperband (ASHA).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from imgtune.config import TuneOptions, build_config
from imgtune.config.job import recorded_config
from imgtune.core.errors import ConfigError, JobError
from imgtune.core.io import cache_dir
from imgtune.report.plugin import TuningReportPlugin
from imgtune.runs.lifecycle import JobLifecycle, amend_job
from imgtune.runs.train import run_training_job
from imgtune.runs.trial_batches import TrialBatchWorker
from imgtune.runs.trust import forget_untrusted_run, trusted_config, trusted_ray_address
from imgtune.storage.jobs import JOB_FILE, RAY_STATE_DIR, Job
from imgtune.storage.record import JobRecord
from imgtune.training.plugin import JobPlugin
from imgtune.training.setup import warm_feature_cache
from imgtune.tuning import connect
from imgtune.tuning.batched import BatchedTuning, can_batch
from imgtune.tuning.space import SearchSpace, apply_values, parse_space
from imgtune.tuning.tuner import (
    TRIALS_DIR,
    TuneReporter,
    build_tuner,
    fit,
    reported_metrics,
    require_shared_paths,
    shares_features,
    validate,
    warm_start_points,
    with_absolute_paths,
)


class TrialsPush(JobPlugin):
    """At the end of a completed tuning job in an s3:// workspace: every trial pushed again (a trial's own push
    may have failed; the lifecycle then pushes the tuning job itself)."""

    name = "trials push"
    core = True

    def on_job_end(self, job: Job, status: str) -> None:
        if status == "completed" and job.remote is not None:
            for trial_job in sorted((job.path / TRIALS_DIR).glob(f"*/{JOB_FILE}")):
                Job(trial_job.parent).push()


def run_tuning_job(
    options: TuneOptions | None = None,
    *,
    workspace: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    force: bool = False,
    ray_address: str | None = None,
) -> Job:
    """Run (or, with `resume`, continue) a tuning job to the end and return its directory. `force` resumes a
    job recorded as running on another machine (that machine is gone); its unfinished trials continue too.
    `ray_address`: the cluster a resumed job runs on (else its own, unless it comes from a bucket:
    imgtune.runs.trust)."""
    if resume is not None:
        life = JobLifecycle.resume(resume, workspace, "tuning", force=force)
    elif options is None:
        raise ConfigError("run_tuning_job needs options or a job to resume")
    else:
        options = options.model_copy(update={"base": with_trial_workers(with_absolute_paths(options.base), options)})
        space = validate(options)
        warm = warm_start_points(options.warm_start, workspace, space, options.objective)
        tuning_tracking_plugins(options)  # a tracker that is not installed: refused before the job exists
        record = JobRecord(
            name=options.name or "", kind="tuning", options=options.model_dump(mode="json"), warm_start_points=len(warm)
        )
        life = JobLifecycle.create(workspace, record, prefix="tune")
    with life:
        if life.resumed:
            forget_untrusted_run(life.job)
            recorded = life.job.record().options or {}
            options = TuneOptions(
                **{
                    **recorded,
                    "base": recorded_config(trusted_config(life.job, recorded.get("base") or {})),
                    "ray_address": trusted_ray_address(life.job, recorded.get("ray_address"), ray_address),
                }
            )
            space, warm = validate(options), []
        life.use_plugins([TuningReportPlugin(), TrialsPush(), *tuning_tracking_plugins(options)])
        return life.run(lambda life: _tune(life, options, space, warm, progress, on_trial))


def _tune(
    life: JobLifecycle,
    options: TuneOptions,
    space: SearchSpace,
    warm: list[tuple[dict, float]],
    progress: bool,
    on_trial: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    job = life.job
    options = options.model_copy(update={"base": with_parent_run(options.base, job)})  # trials nest in its run
    trials_dir = job.path / TRIALS_DIR
    trials_dir.mkdir(exist_ok=True)
    nodes = connect(options.ray_address)  # first: a wrong address or a missing token fails before any work
    features_shared = shares_features(space, options.base)
    if features_shared:
        started = time.perf_counter()
        warm_feature_cache(build_config(options.base), progress=progress)
        job.update(feature_cache_seconds=time.perf_counter() - started)
        job.log(f"feature cache ready in {time.perf_counter() - started:.1f} s, shared by every trial")
    job.update(ray={"address": options.ray_address or "in-process", "nodes": nodes})
    job.log(f"Ray: {options.ray_address or 'in-process'}, nodes {', '.join(n['address'] for n in nodes)}")
    context = {
        "base": options.base,
        "space": options.space,
        "trials_dir": str(trials_dir),
        "objective": options.objective,
        "cpus_per_trial": options.cpus_per_trial,
        "cache": str(cache_dir()),
        "features_shared": features_shared,
    }
    if _trains_batches(job, options, features_shared, life.resumed):
        job.update(trials_batched=True)
        job.log(f"trials train as batches of up to {options.heads_per_worker} heads, {options.max_parallel} at once")
        tuning = BatchedTuning(
            job,
            options,
            space,
            warm,
            resumed=life.resumed,
            worker=TrialBatchWorker,
            context=context,
            make_config=lambda values, name: trial_config(options.base, values, name),
            progress=progress,
            on_trial=on_trial,
        )
        return tuning.run()
    tuner = build_tuner(job, _trial, context, options, space, warm, life.resumed)
    return fit(tuner, job, options, space, progress, on_trial)


def tuning_tracking_plugins(options: TuneOptions) -> list[JobPlugin]:
    """A tuning job's own trackers: with `tracking.mlflow` in its trials' config, a parent run for the trials."""
    base = build_config(options.base, "the trials' config")
    if not base.tracking.mlflow:
        return []
    from imgtune.tracking.mlflow_run import MlflowTuningPlugin

    return [MlflowTuningPlugin(base, options.model_dump(mode="json"))]


def with_parent_run(base: dict[str, Any], job: Job) -> dict[str, Any]:
    """The trials' config: never registering a model (the final training job does), and nested in the tuning
    job's MLflow run once that run exists."""
    tracking = {**base.get("tracking", {}), "registered_model": None, "alias": None}
    known = job.record().mlflow or {}
    if known.get("run_id"):
        tracking.update(parent_run_id=known["run_id"], mlflow_uri=known["tracking_uri"])
    return {**base, "tracking": tracking}


def with_trial_workers(base: dict[str, Any], options: TuneOptions) -> dict[str, Any]:
    """The trials' config with `workers_per_trial` data-parallel workers, each taking the trial's resources."""
    if options.workers_per_trial == 1:
        return base
    train = {
        **base.get("train", {}),
        "workers": options.workers_per_trial,
        "cpus_per_worker": options.cpus_per_trial,
        "gpus_per_worker": options.gpus_per_trial,
    }
    return {**base, "train": train}


def _trains_batches(job: Job, options: TuneOptions, features_shared: bool, resumed: bool) -> bool:
    """Trials on shared features train as batches of heads; a resumed job keeps the way it started."""
    if resumed:  # (a job killed before it chose, with no trial and no Ray state yet, chooses as a new one)
        recorded = job.record().trials_batched
        trials = job.path / TRIALS_DIR
        started = (job.path / RAY_STATE_DIR).exists() or (trials.is_dir() and any(trials.iterdir()))
        if recorded is not None or started:
            return bool(recorded)
    return features_shared and can_batch(options.base)


def trial_config(base: dict[str, Any], values: dict[str, Any], name: str) -> dict[str, Any]:
    """A trial's raw job config: the tuning job's base with the trial's values, never evaluating test."""
    raw = apply_values(base, values)
    raw["name"] = name
    raw.setdefault("train", {})["evaluate_test"] = False
    return raw


def _trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One trial, in a Ray worker: a training job with the trial's hyperparameters, reporting every epoch.

    (Ray saves this function's name with the experiment and refuses to restore it under another: keep it.)"""
    from ray import tune

    from imgtune.tuning.tuner import trial_process, wait_for_first_round, wait_until_recorded

    space = parse_space(context["space"])
    values = space.values(config)
    trial_id = tune.get_context().get_trial_id()
    trial_name = tune.get_context().get_trial_name()  # trial-<id>, or the trial job it continues (TrialNames)
    require_shared_paths(context)
    trials_dir = Path(context["trials_dir"])
    wait_for_first_round(trials_dir, context.get("first_round", 1))  # trials spread over the workers Ray starts
    wait_until_recorded(trials_dir, trial_id)  # before its job exists: a resumed tuning job knows every trial job
    with trial_process(context["cpus_per_trial"]):  # Ray reuses its worker for trial after trial: start clean
        if context.get("cache"):
            os.environ["IMGTUNE_CACHE"] = context["cache"]  # (trial_process puts the environment back)
        reporter = TuneReporter(context["objective"], trial_name)
        existing = trials_dir / trial_name
        if existing.exists():  # a trial Ray restarts (its driver was killed): continue its training job
            job = Job(existing)
            if job.status() != "completed":
                # force: its tuning job was found resumable, so the trial runs nowhere else, whatever host it names
                run_training_job(
                    resume=existing, workspace=trials_dir, callbacks=[reporter], progress=False, force=True,
                    must_push=False,
                )  # fmt: skip
                return
            for record in job.read_metrics():  # finished before the kill: tell Ray again what it reported
                tune.report(reported_metrics(record, trial_name))
            return
        raw = trial_config(context["base"], values, trial_name)
        run_training_job(build_config(raw), workspace=trials_dir, callbacks=[reporter], progress=False, must_push=False)


def train_best(job: Job, *, name: str | None = None, progress: bool = True) -> Job:
    """Train the final model with a tuning job's best hyperparameters, debugger and profiler on, evaluated on
    the test split (as the original notebook did next); the tuning job records it as `final_job`."""
    record = job.record()
    if not record.best:
        raise JobError(f"tuning job {job.name} has no finished trial", "see `imgtune tune show`")
    base = recorded_config(trusted_config(job, (record.options or {})["base"]))  # a bucket's job runs no file here
    raw = apply_values(base, record.best["hyperparameters"])
    raw["name"] = name or f"{job.name}-best"
    raw["debugger"] = {k: v for k, v in raw.get("debugger", {}).items() if k != "enabled"}
    raw["profiler"] = {k: v for k, v in raw.get("profiler", {}).items() if k not in ("enabled", "report")}
    raw.setdefault("train", {})["evaluate_test"] = True
    final = run_training_job(build_config(raw), workspace=job.path.parent, progress=progress)
    amend_job(job, {"final_job": final.name})
    return final
