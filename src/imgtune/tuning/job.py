"""Tuning jobs on Ray Tune: every trial is a training job (the same code path) inside the tuning job.

Layout of a tuning job::

    JOB/
      job.json      kind "tuning": options, search space, status, trials (best first), best hyperparameters
      trials/       one training job per trial (trial-<id>), with its own metrics, checkpoints and model
      ray/          Ray Tune's experiment state (what `--resume` restores)
      logs.txt

The objective is a validation metric reported every epoch (never the test split: trials do not evaluate
it). With a frozen backbone, the feature cache is computed once before trials start, so a trial costs only
head training. Strategies: bayesian (Optuna's TPE through OptunaSearch), random, grid, hyperband (ASHA).
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import re
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from imgtune.config import build_config
from imgtune.core.errors import ConfigError, JobError
from imgtune.core.io import now_iso
from imgtune.data.sources import is_remote
from imgtune.storage.jobs import JOB_FILE, Job, push_interval
from imgtune.training.callbacks import Callback, StopTraining
from imgtune.tuning import RAY_CLUSTERS_ENV, is_loopback
from imgtune.tuning.space import SearchSpace, apply_values, parse_space

STRATEGIES = ("bayesian", "random", "grid", "hyperband")
OBJECTIVES = {"valid_accuracy": "max", "valid_loss": "min"}
EARLY_STOPPING = ("none", "median", "asha")
TRIALS_DIR = "trials"
RAY_DIR = "ray"
EXPERIMENT = "experiment"
TRIAL_PREFIX = "trial-"
REPORTED = ("valid_accuracy", "valid_loss", "train_accuracy", "train_loss")
TUNER_STOP = "stopped early by the tuner's scheduler"  # a trial job's stop_reason


@dataclass
class TuneOptions:
    """What a tuning job does; stored in its job.json (a resumed job reads it back)."""

    base: dict[str, Any]  # the raw job config every trial starts from
    space: dict[str, dict[str, Any]]
    strategy: str = "bayesian"
    max_trials: int = 8
    max_parallel: int = 2
    objective: str = "valid_accuracy"
    early_stopping: str = "none"  # median stopping rule or ASHA for poor trials; hyperband implies asha
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    time_budget_s: float | None = None
    stop_after_no_improvement: int | None = None
    seed: int = 0
    ray_address: str | None = None
    warm_start: list[str] = field(default_factory=list)  # earlier tuning jobs whose results seed the searcher
    name: str | None = None

    def validate(self) -> SearchSpace:
        if self.strategy not in STRATEGIES:
            raise ConfigError(f"unknown strategy {self.strategy!r}", f"use one of {', '.join(STRATEGIES)}")
        if self.objective not in OBJECTIVES:
            raise ConfigError(f"unknown objective {self.objective!r}", f"use one of {', '.join(OBJECTIVES)}")
        if self.early_stopping not in EARLY_STOPPING:
            raise ConfigError(
                f"unknown early stopping {self.early_stopping!r}", f"use one of {', '.join(EARLY_STOPPING)}"
            )
        for name, value in (("max_trials", self.max_trials), ("max_parallel", self.max_parallel)):
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, not {value}")
        if self.cpus_per_trial <= 0 or self.gpus_per_trial < 0:
            raise ConfigError("cpus_per_trial must be above 0 and gpus_per_trial at least 0")
        if self.stop_after_no_improvement is not None and self.stop_after_no_improvement < 1:
            raise ConfigError("stop_after_no_improvement must be at least 1")
        space = parse_space(self.space)
        build_config(self.base, "base job config")
        space.check_against(self.base)
        return space

    @property
    def mode(self) -> str:
        return OBJECTIVES[self.objective]


def reported_metrics(epoch_record: dict[str, Any], trial_name: str) -> dict[str, Any]:
    """What a trial reports to Ray Tune for one epoch."""
    metrics: dict[str, Any] = {k: float(epoch_record[k]) for k in REPORTED if k in epoch_record}
    return {**metrics, "epoch": int(epoch_record["epoch"]), "job": trial_name}


class TuneReporter(Callback):
    """Reports a trial's epoch metrics to Ray Tune; a stop from the tuner's scheduler ends training cleanly."""

    order = 80

    def __init__(self, objective: str, trial_name: str):
        self.objective = objective
        self.trial_name = trial_name

    def on_epoch_end(self, trainer: Any) -> None:
        record = trainer.epoch_record
        if self.objective not in record:
            raise JobError(f"the objective {self.objective} was not measured", "tuning needs a validation split")
        try:
            tune.report(reported_metrics(record, self.trial_name))
        except SystemExit:  # Ray ends a trial its scheduler stopped by raising SystemExit in report()
            if trainer.epoch < trainer.epochs:
                raise StopTraining(TUNER_STOP) from None


def _shares_features(space: SearchSpace, base: dict[str, Any]) -> bool:
    """Can one feature cache serve every trial? Not if the space varies what the features depend on."""
    varies_features = ("data.", "model.backbone", "model.weights", "model.pretrained", "model.freeze")
    varies_features += ("train.augment_views", "train.feature_cache")  # (not the device: same features)
    if any(key.startswith(varies_features) for key in space.keys):
        return False
    model = base.get("model", {})
    return model.get("freeze", "backbone") == "backbone" and base.get("train", {}).get("feature_cache", True)


def with_absolute_paths(base: dict[str, Any]) -> dict[str, Any]:
    """The job config with local paths made absolute: trials run in Ray workers elsewhere (another working
    directory, or another node that mounts the same paths)."""
    base = {section: dict(values) if isinstance(values, dict) else values for section, values in base.items()}

    def absolute(path: str) -> str:
        return path if is_remote(path) else str(Path(path).expanduser().absolute())

    for section, key in (("data", "path"), ("model", "weights")):
        if isinstance(base.get(section), dict) and base[section].get(key):
            base[section][key] = absolute(base[section][key])
    if isinstance(base.get("debugger"), dict) and base["debugger"].get("rule_files"):
        base["debugger"]["rule_files"] = [absolute(path) for path in base["debugger"]["rule_files"]]
    return base


def require_shared_paths(context: dict[str, Any]) -> None:
    """A trial on a cluster node writes into the tuning job and reads its data and feature cache: those
    paths must be mounted on every node. Say so plainly rather than fail somewhere inside training."""
    needed = [context["trials_dir"]]
    if context.get("features_shared"):
        needed.append(context["cache"])
    data_path = context["base"].get("data", {}).get("path")
    if data_path and not is_remote(data_path):
        needed.append(data_path)
    missing = [path for path in needed if not Path(path).is_dir()]
    if missing:
        node = ray.util.get_node_ip_address() if ray.is_initialized() else "this node"
        raise JobError(
            f"{', '.join(missing)} not found on {node}",
            "trials on a Ray cluster use the tuning job's directory, the dataset and the feature cache where the "
            "driver has them: put the workspace, the data and IMGTUNE_CACHE on a path every node mounts (NFS, a "
            "shared volume), or the data on s3://",
        )


def _trial(config: dict[str, Any], context: dict[str, Any]) -> None:
    """One trial: a training job with the trial's hyperparameters, reporting every epoch."""
    import torch

    from imgtune.training.job import run_training_job

    space = parse_space(context["space"])
    values = space.values(config)
    trial_name = TRIAL_PREFIX + tune.get_context().get_trial_id()
    require_shared_paths(context)
    trials_dir = Path(context["trials_dir"])
    torch.set_num_threads(max(1, int(context["cpus_per_trial"])))
    if context.get("cache"):
        os.environ["IMGTUNE_CACHE"] = context["cache"]
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
    raw = apply_values(context["base"], values)
    raw["name"] = trial_name
    raw.setdefault("train", {})["evaluate_test"] = False
    run_training_job(build_config(raw), workspace=trials_dir, callbacks=[reporter], progress=False, must_push=False)


def _search_and_scheduler(options: TuneOptions, space: SearchSpace, warm: list[tuple[dict, float]]) -> tuple[Any, Any]:
    epochs = int(options.base.get("train", {}).get("epochs", 10))
    if options.strategy == "hyperband" or options.early_stopping == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=3)
    elif options.early_stopping == "median":
        scheduler = MedianStoppingRule(time_attr="epoch", grace_period=1, min_samples_required=3)
    else:
        scheduler = FIFOScheduler()
    if options.strategy == "bayesian":
        points = [space.samples(values) for values, _ in warm] or None
        rewards = [objective for _, objective in warm] or None
        search = OptunaSearch(
            sampler=optuna.samplers.TPESampler(seed=options.seed),
            points_to_evaluate=points,
            evaluated_rewards=rewards,
        )
        return search, scheduler  # TuneConfig.max_concurrent_trials limits it
    points = [space.samples(values) for values, _ in warm] if options.strategy != "grid" else None
    search = BasicVariantGenerator(
        random_state=options.seed, points_to_evaluate=points or None, max_concurrent=options.max_parallel
    )
    return search, scheduler


class NoImprovementStopper(Stopper):
    """Stops the whole tuning job after N finished trials without a better objective."""

    def __init__(self, patience: int, mode: str, objective: str):
        self.patience, self.mode, self.objective = patience, mode, objective
        self.best: float | None = None
        self.since = 0
        self.seen: set[str] = set()
        self.last: dict[str, float] = {}

    def _better(self, value: float, than: float | None) -> bool:
        return than is None or (value > than if self.mode == "max" else value < than)

    def __call__(self, trial_id: str, result: dict[str, Any]) -> bool:
        value = result.get(self.objective)
        if value is not None and self._better(value, self.last.get(trial_id)):
            self.last[trial_id] = value
        if result.get("done") and trial_id not in self.seen:
            self.seen.add(trial_id)
            value = self.last.get(trial_id)
            if value is not None and self._better(value, self.best):
                self.best, self.since = value, 0
            else:
                self.since += 1
        return False

    def stop_all(self) -> bool:
        return self.since >= self.patience


def _ray_init(address: str | None) -> None:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no experiment tables: imgtune shows its own progress
    for name in ("ray", "ray.tune", "ray.train"):  # where results are, TensorBoard hints: imgtune says its own
        logging.getLogger(name).setLevel(logging.WARNING)
    if ray.is_initialized():
        return
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": False, "configure_logging": False}
    if address:
        from ray._private import ray_constants

        if not is_loopback(address) and not ray_constants.ENABLE_RAY_CLUSTER:
            raise ConfigError(
                f"Ray was imported for loopback use only, so it cannot join the cluster at {address}",
                f"call imgtune.tuning.use_ray_address({address!r}) before importing Ray (the CLI does), or set "
                f"{RAY_CLUSTERS_ENV}=1",
            )
        try:
            ray.init(address=address, **kwargs)
        except ConnectionError as exc:
            raise JobError(
                f"could not connect to the Ray cluster at {address}: {_connection_failure(exc)}",
                f"check it is up (`ray status --address {address}`); a cluster with token authentication needs its "
                "token here too: RAY_AUTH_MODE=token with RAY_AUTH_TOKEN or RAY_AUTH_TOKEN_PATH (or ~/.ray/auth_token)",
            ) from exc
    else:
        ray.init(num_cpus=os.cpu_count(), num_gpus=None, **kwargs)


def _connection_failure(exc: BaseException) -> str:
    """Why ray.init could not connect, in a line (Ray wraps the reason, as text, in two other exceptions)."""
    chain = []
    while exc is not None and len(chain) < 10:
        chain.append(exc)
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    text = "\n".join(str(e) for e in chain)
    if "InvalidAuthToken" in text or "AuthenticationError" in text:
        return "it refused this driver's authentication token (missing or not the cluster's)"
    return (str(chain[-1]).strip() or type(chain[-1]).__name__).splitlines()[0]


def warm_start_points(jobs: list[str], workspace: str | Path | None, space: SearchSpace, objective: str) -> list:
    """(values, objective) of earlier tuning jobs' finished trials whose keys match this space."""
    points = []
    for name in jobs:
        record = Job.open(name, workspace).read()
        if record.get("kind") != "tuning":
            raise JobError(f"{name} is not a tuning job", "warm starts read earlier `imgtune tune` jobs")
        for trial in record.get("trials", []):
            value = trial.get("objective")
            matches = set(trial.get("hyperparameters", {})) == set(space.keys)
            if matches and value is not None and math.isfinite(value) and trial.get("objective_name") == objective:
                points.append((trial["hyperparameters"], value))
    return points


def run_tuning_job(
    options: TuneOptions | None = None,
    *,
    workspace: str | Path | None = None,
    resume: str | Path | None = None,
    progress: bool = True,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    force: bool = False,
) -> Job:
    """Run (or, with `resume`, continue) a tuning job to the end and return its directory. `force` resumes a
    job recorded as running on another machine (that machine is gone); its unfinished trials continue too."""
    from imgtune.training.job import check_resumable

    if resume is not None:
        job = Job.open(resume, workspace)
        record = job.read()
        if record.get("kind") != "tuning":
            raise JobError(f"{job.name} is not a tuning job")
        if job.status() == "completed":
            raise JobError(f"tuning job {job.name} has already completed", "start a new one")
        check_resumable(job, force)
        options = TuneOptions(**record["options"])
    elif options is None:
        raise ConfigError("run_tuning_job needs options or a job to resume")
    else:
        options = replace(options, base=with_absolute_paths(options.base))
    space = options.validate()
    if resume is None:
        warm = warm_start_points(options.warm_start, workspace, space, options.objective)
        job = Job.create(workspace, options.name, prefix="tune")
        job.write(
            {
                "name": job.name,
                "kind": "tuning",
                "created": now_iso(),
                "options": asdict(options),
                "warm_start_points": len(warm),
            }
        )
    else:
        warm = []
        job.log("resuming")
    started = time.perf_counter()
    job.update(status="running", started=now_iso(), error=None)
    job.mark_running()
    try:
        summary = _run(job, options, space, warm, resume is not None, progress, on_trial)
    except KeyboardInterrupt:
        job.update(status="stopped", error="interrupted by the user")
        raise
    except Exception as exc:
        job.update(status="failed", error=f"{type(exc).__name__}: {exc}")
        job.log(f"failed: {type(exc).__name__}: {exc}\n{traceback.format_exc()}")
        job.push(strict=False)
        raise
    job.update(status="completed", finished=now_iso(), seconds=time.perf_counter() - started, **summary)
    job.log("completed")
    try:
        from imgtune.report.tuning import write_tuning_report

        job.log(f"report written to {write_tuning_report(job)}")
    except Exception as exc:  # the results stand; `imgtune report JOB` can make it again
        job.log(f"report failed: {type(exc).__name__}: {exc}")
    for trial_job in sorted((job.path / TRIALS_DIR).glob(f"*/{JOB_FILE}")):  # a trial's own push may have failed
        Job(trial_job.parent).push()
    job.push()
    return job


def _run(
    job: Job,
    options: TuneOptions,
    space: SearchSpace,
    warm: list[tuple[dict, float]],
    resuming: bool,
    progress: bool,
    on_trial: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    from imgtune.core.io import cache_dir
    from imgtune.training.job import warm_feature_cache

    trials_dir = job.path / TRIALS_DIR
    trials_dir.mkdir(exist_ok=True)
    _ray_init(options.ray_address)  # first: a wrong address or a missing token fails before any work
    features_shared = _shares_features(space, options.base)
    if features_shared:
        started = time.perf_counter()
        warm_feature_cache(build_config(options.base), progress=progress)
        job.update(feature_cache_seconds=time.perf_counter() - started)
        job.log(f"feature cache ready in {time.perf_counter() - started:.1f} s, shared by every trial")
    nodes = [
        {
            "address": n["NodeManagerAddress"],
            "cpus": n.get("Resources", {}).get("CPU", 0),
            "gpus": n.get("Resources", {}).get("GPU", 0),
        }
        for n in ray.nodes()
        if n.get("Alive")
    ]
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
    trainable = tune.with_resources(
        tune.with_parameters(_trial, context=context),
        {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial},
    )
    storage = str(job.path / RAY_DIR)
    stopper = None
    if options.stop_after_no_improvement is not None:
        stopper = NoImprovementStopper(options.stop_after_no_improvement, options.mode, options.objective)
    callbacks = [TrialProgress()]
    if resuming and tune.Tuner.can_restore(os.path.join(storage, EXPERIMENT)):
        tuner = tune.Tuner.restore(
            os.path.join(storage, EXPERIMENT), trainable, resume_unfinished=True, resume_errored=False
        )
    else:
        search, scheduler = _search_and_scheduler(options, space, warm)
        grid = options.strategy == "grid"
        tuner = tune.Tuner(
            trainable,
            param_space=space.ray_space(grid=grid),
            tune_config=tune.TuneConfig(
                metric=options.objective,
                mode=options.mode,
                search_alg=search,
                scheduler=scheduler,
                num_samples=1 if grid else options.max_trials,
                # OptunaSearch is limited here; the variant generator of the other strategies limits itself
                max_concurrent_trials=options.max_parallel if options.strategy == "bayesian" else None,
                time_budget_s=options.time_budget_s,
                trial_name_creator=lambda trial: TRIAL_PREFIX + trial.trial_id,
                trial_dirname_creator=lambda trial: TRIAL_PREFIX + trial.trial_id,
            ),
            run_config=tune.RunConfig(
                storage_path=storage,
                name=EXPERIMENT,
                stop=stopper,
                failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
                callbacks=callbacks,
                verbose=0,
            ),
        )
    _driver.update(job=job, options=options, progress=progress, on_trial=on_trial)
    try:
        with contextlib.redirect_stdout(sys.stderr):  # Ray's own tables would spoil --json on stdout
            grid_results = tuner.fit()
    finally:
        _driver.clear()
    trials = collect_trials(job, options, space, grid_results)
    return {"trials": trials, "trials_count": len(trials), "best": best_of(trials)}


def collect_trials(job: Job, options: TuneOptions, space: SearchSpace, results: Any) -> list[dict[str, Any]]:
    """Each trial: hyperparameters (real types), objective (its best epoch), status, epochs, duration, job."""
    trials = []
    for result in results:
        config = result.config or {}
        history = result.metrics_dataframe
        trial_id = (result.metrics or {}).get("trial_id") or Path(result.path).name.removeprefix(TRIAL_PREFIX)
        name = TRIAL_PREFIX + str(trial_id)
        trial_job = job.path / TRIALS_DIR / name
        record = Job(trial_job).read() if (trial_job / "job.json").exists() else {}
        # The trial's own training job is the truth: Ray's copy of the results can be elsewhere (a tuning job
        # resumed from a bucket on another machine keeps Ray's first storage path in its run config).
        epoch_records = Job(trial_job).read_metrics() if record else []
        if epoch_records:
            epochs = max(int(m["epoch"]) for m in epoch_records)
            values = [float(m[options.objective]) for m in epoch_records if m.get(options.objective) is not None]
        else:
            epochs = int(history["epoch"].max()) if history is not None and "epoch" in history else 0
            has_values = history is not None and options.objective in history
            values = [float(v) for v in history[options.objective].dropna()] if has_values else []
        objective = (max(values) if options.mode == "max" else min(values)) if values else None
        has_times = history is not None and "time_total_s" in history and len(history)
        ray_seconds = float(history["time_total_s"].max()) if has_times else None
        planned = int(record.get("config", {}).get("train", {}).get("epochs", 0) or 0)
        if result.error is not None:
            status = "errored"
        elif record.get("stop_reason") == TUNER_STOP or (
            planned and epochs < planned and not record.get("stop_reason")
        ):
            status = "early-stopped"
        else:
            status = "completed"
        trials.append(
            {
                "trial": name,
                "hyperparameters": space.values({k: v for k, v in config.items() if k in space.keys}),
                "objective": objective,
                "objective_name": options.objective,
                "status": status,
                "epochs": epochs,
                "stop_reason": record.get("stop_reason"),
                "seconds": ray_seconds if ray_seconds is not None else record.get("timings", {}).get("total"),
                "job": str(trial_job.relative_to(job.path)) if trial_job.exists() else None,
                "node": (result.metrics or {}).get("node_ip"),
                "error": _error_text(result.error),
            }
        )
    return sort_trials(trials, options.mode)


def _error_text(error: Any) -> str | None:
    if error is None:
        return None
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))  # Ray colours its task errors for terminals
    return text[-20_000:]  # a deep traceback's end says what failed


def sort_trials(trials: list[dict[str, Any]], mode: str) -> list[dict[str, Any]]:
    def key(trial: dict[str, Any]) -> tuple[int, float]:
        value = trial.get("objective")
        if value is None:
            return (1, 0.0)
        return (0, -value if mode == "max" else value)

    return sorted(trials, key=key)


def best_of(trials: list[dict[str, Any]]) -> dict[str, Any] | None:
    for trial in trials:
        if trial.get("objective") is not None:
            return {k: trial[k] for k in ("trial", "hyperparameters", "objective", "objective_name", "job")}
    return None


_driver: dict[str, Any] = {}
"""The job, options, progress flag and on_trial of the tuning run in this driver process. TrialProgress reads
them here, never from its own state: Tuner.restore unpickles the callbacks saved with the experiment, whose
job path may be another machine's (a tuning job resumed from a bucket)."""


class TrialProgress(tune.Callback):
    """Shows trials finishing (Rich, on stderr), logs each, pushes the tuning job (in an s3:// workspace, so
    that Ray's experiment state reaches the bucket as trials end), and calls the user's on_trial."""

    def __init__(self) -> None:
        self.bar: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.bar = None

    def setup(self, **info: Any) -> None:
        if _driver.get("progress"):
            from imgtune.core.progress import progress_bar

            self.bar = progress_bar()
            self.bar.start()
            options = _driver["options"]
            total = None if options.strategy == "grid" else options.max_trials
            self.task = self.bar.add_task("trials", total=total, info="")

    def _done(self, trial: Any, status: str) -> None:
        if not _driver:  # the Tuner runs elsewhere (a ray:// client): the driver's job is not here
            return
        job, objective, on_trial = _driver["job"], _driver["options"].objective, _driver.get("on_trial")
        value = (trial.last_result or {}).get(objective)
        shown = "-" if value is None else f"{value:.4f}"
        job.log(f"trial {TRIAL_PREFIX}{trial.trial_id} {status}: {objective} {shown}")
        if job.remote is not None:
            job.push(min_interval=push_interval(), strict=False)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=f"last {objective} {shown}")
        if on_trial is not None:
            on_trial({"trial": TRIAL_PREFIX + trial.trial_id, "status": status, "objective": value})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._done(trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._done(trial, "errored")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.bar is not None:
            self.bar.stop()


def train_best(job: Job, *, name: str | None = None, progress: bool = True) -> Job:
    """Train the final model with a tuning job's best hyperparameters, debugger and profiler on, evaluated on
    the test split (as the original notebook did next); the tuning job records it as `final_job`."""
    from imgtune.training.job import run_training_job

    record = job.read()
    best = record.get("best")
    if not best:
        raise JobError(f"tuning job {job.name} has no finished trial", "see `imgtune tune show`")
    raw = apply_values(record["options"]["base"], best["hyperparameters"])
    raw["name"] = name or f"{job.name}-best"
    raw["debugger"] = {k: v for k, v in raw.get("debugger", {}).items() if k != "enabled"}
    raw["profiler"] = {k: v for k, v in raw.get("profiler", {}).items() if k not in ("enabled", "report")}
    raw.setdefault("train", {})["evaluate_test"] = True
    final = run_training_job(build_config(raw), workspace=job.path.parent, progress=progress)
    job.update(final_job=final.name)
    job.push()
    return final
