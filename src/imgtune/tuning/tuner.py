"""Ray Tune for tuning jobs: searchers and schedulers (bayesian: Optuna's TPE through OptunaSearch; random, grid;
hyperband: ASHA), the trial reporter, the Tuner and the trials' results. The tuning job's life and its layout are
imgtune.runs.tune's; every trial is a training job inside it, judged on a validation metric every epoch.

Ray's experiment state (JOB/ray: pickles) is the machine's that wrote it: it never crosses a bucket
(imgtune.storage.jobs.LOCAL_ONLY_DIRS). A tuning job resumed where that state is missing (another machine, a bucket)
or does not know every trial job (trials run elsewhere since) gets a new state rebuilt from its trial jobs' own
records (see `rebuild`): finished trials are kept and counted, unfinished ones continue their training jobs.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import random
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler, FIFOScheduler, MedianStoppingRule
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.optuna import OptunaSearch
from ray.tune.stopper import Stopper

from imgtune.config import TuneOptions, build_config
from imgtune.core.errors import JobError
from imgtune.core.io import atomic_write_json, now_iso
from imgtune.data.sources import is_remote
from imgtune.storage.jobs import JOB_FILE, RAY_STATE_DIR, Job, push_interval, remote_url
from imgtune.storage.record import JobRecord
from imgtune.training import memo
from imgtune.training.callbacks import Callback, StopTraining
from imgtune.tuning.space import SearchSpace, parse_space

optuna.logging.set_verbosity(optuna.logging.WARNING)  # trials' progress is imgtune's to show

TRIALS_DIR = "trials"
EXPERIMENT = "experiment"  # Ray's experiment folder in JOB/ray (imgtune.storage.jobs.RAY_STATE_DIR)
REBUILT_FILE = "rebuilt.json"  # in JOB/ray: the trial jobs a rebuilt Ray state started from (see rebuild)
CLAIMS_DIR = "continued"  # in JOB/ray: unfinished trial jobs a rebuilt state's trials took over (TrialNames)
FINISHED = ("completed", "failed")  # trial jobs a resumed tuning job never runs again (errored ones neither)
TRIAL_PREFIX = "trial-"
REPORTED = ("valid_accuracy", "valid_loss", "train_accuracy", "train_loss")
TUNER_STOP = "stopped early by the tuner's scheduler"  # a trial job's stop_reason
# How long a reused worker waits for a trial the scheduler stopped to wrap up (its training job ends: best weights,
# model bundle, job.json, push) before it takes the next trial. Ray's default, 2 s, is shorter than a push to a
# bucket; past it Ray gives up reusing the worker and fails the next trial.
TRIAL_WRAP_UP_SECONDS = 300
RECORD_WAIT_SECONDS = 60.0  # the longest a trial waits for Ray to record it (wait_until_recorded)
FIRST_ROUND_WAIT_SECONDS = 60.0  # the longest a new worker's first trial waits for the others (wait_for_first_round)


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


@contextlib.contextmanager
def trial_process(cpus: float) -> Iterator[None]:
    """A trial's view of its Ray worker process, which Ray reuses for trial after trial (reuse_actors): each
    trial starts as it would in a fresh worker, seeded the same way, so its results do not depend on what ran
    there before. The environment is put back as it was when the trial ends (a trial sets IMGTUNE_CACHE; a
    plugin may set more); torch's CPU threads are set from the trial's CPUs; the global random generators and
    torch's determinism switch are the training job's (seed_everything); Ray gives each trial its own working
    directory and log files. What a process can safely keep between trials (prepared data, the pristine model,
    features read from the cache) is kept by imgtune.training.memo, which checks that none of it went stale."""
    import torch

    # Read by Ray in this process when it resets the worker for the next trial (FunctionTrainable.reset_config).
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", str(TRIAL_WRAP_UP_SECONDS))
    memo.enable()
    saved = dict(os.environ)
    torch.set_num_threads(max(1, int(cpus)))
    try:
        yield
    finally:
        for name in set(os.environ) - set(saved):
            del os.environ[name]
        os.environ.update({name: value for name, value in saved.items() if os.environ.get(name) != value})


def first_round_size(options: TuneOptions, space: SearchSpace) -> int:
    """How many workers the tuning job's first trials start at once: max_parallel, unless fewer trials or fewer
    free CPUs (GPUs) on the cluster's nodes."""
    capacity = 0
    for node in (n for n in ray.nodes() if n.get("Alive")):
        resources = node.get("Resources", {})
        fits = math.floor(resources.get("CPU", 0) / options.cpus_per_trial)
        if options.gpus_per_trial:
            fits = min(fits, math.floor(resources.get("GPU", 0) / options.gpus_per_trial))
        capacity += fits
    return max(1, min(options.max_parallel, trial_count(options, space), capacity))


def wait_for_first_round(trials_dir: Path, workers: int) -> None:
    """In the first trial of a new worker process: wait until the tuning job's first `workers` workers are all up.

    Ray Tune, reusing workers, gives a waiting trial to whichever worker is free first: when a worker's first trial
    ends before another worker has started (a node slower to start a process, or busier), Ray hands that worker's
    trial to the free one and stops the starting worker, and with short trials it does so again for every trial:
    one node runs them all while the others stay idle. Waiting here until every worker of the first round has
    started its first trial (or FIRST_ROUND_WAIT_SECONDS passed) spreads the trials as far as max_parallel asks;
    from then on every worker stays in use. The workers sign in under JOB/ray/.workers/<Ray job>/."""
    global _first_round_done
    if _first_round_done:
        return
    _first_round_done = True
    if workers <= 1:
        return
    import socket

    roll = trials_dir.parent / RAY_STATE_DIR / ".workers" / ray.get_runtime_context().get_job_id()
    roll.mkdir(parents=True, exist_ok=True)
    (roll / f"{socket.gethostname()}-{ray.util.get_node_ip_address()}-{os.getpid()}").touch()
    deadline = time.monotonic() + FIRST_ROUND_WAIT_SECONDS
    while sum(1 for _ in roll.iterdir()) < workers and time.monotonic() < deadline:
        time.sleep(0.05)


_first_round_done = False


def trial_count(options: TuneOptions, space: SearchSpace) -> int:
    """The trials a tuning job runs at most: every combination of a grid, else max_trials."""
    if options.strategy == "grid":
        return math.prod(len(p.grid_values()) for p in space.parameters)
    return options.max_trials


def state_save_period(trials: int) -> float:
    """Seconds between saves of Ray Tune's experiment state (the trials it knows, the searcher): what a resumed
    tuning job restores. Ray's default is 10 s or more; a trial waits for the save that records it
    (wait_until_recorded), so the period is short, and grows with the state (about 16 KB a trial) to keep saving
    at a few percent of the driver's time, as Ray's own automatic period does."""
    return min(10.0, max(0.2, 0.005 * trials))


def wait_until_recorded(trials_dir: Path, trial_id: str) -> None:
    """In a trial, before it creates its training job: wait until Ray's saved experiment state lists the trial.

    Ray saves that state every state_save_period seconds, and a trial starts as soon as a worker is free (at
    once, on a worker Ray reuses). A trial that made its job before any save listed it, and whose driver then
    died, would be unknown to the resumed tuning job: Ray's searcher would suggest it again under another name,
    and its own job (perhaps finished) would be left over in JOB/trials. Waiting here rules that out: every
    trial job in JOB/trials is one the resumed job restores, continues or replays. Past RECORD_WAIT_SECONDS (no
    state where it should be: a Tuner run elsewhere, a format this code does not know), the trial goes on, and
    this process stops waiting for later ones."""
    global _record_wait
    state_dir = trials_dir.parent / RAY_STATE_DIR / EXPERIMENT
    deadline = time.monotonic() + RECORD_WAIT_SECONDS
    while _record_wait and not _recorded(state_dir, trial_id):
        if time.monotonic() > deadline:
            _record_wait = False
            return
        time.sleep(0.02)


_record_wait = True


def _recorded(state_dir: Path, trial_id: str) -> bool:
    """Does Ray's newest experiment state in `state_dir` (JSON: trial_data, a list of [trial state as JSON, run
    metadata]) list the trial?"""
    states = sorted(state_dir.glob("experiment_state-*.json"))
    if not states:
        return False
    try:
        text = states[-1].read_text()
        if trial_id not in text:
            return False
        trials = json.loads(text)["trial_data"]
        return any(json.loads(entry[0]).get("trial_id") == trial_id for entry in trials)
    except (OSError, ValueError, KeyError, IndexError, TypeError):  # being copied in; read it again
        return False


def shares_features(space: SearchSpace, base: dict[str, Any]) -> bool:
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


def validate(options: TuneOptions) -> SearchSpace:
    """The options' search space, checked against the job config every trial starts from."""
    space = parse_space(options.space)
    build_config(options.base, "base job config")
    space.check_against(options.base)
    return space


def _search_and_scheduler(
    options: TuneOptions, space: SearchSpace, warm: list[tuple[dict, float]], rebuilt: Rebuild | None = None
) -> tuple[Any, Any]:
    epochs = int(options.base.get("train", {}).get("epochs", 10))
    if options.strategy == "hyperband" or options.early_stopping == "asha":
        scheduler = ASHAScheduler(time_attr="epoch", max_t=epochs, grace_period=1, reduction_factor=3)
    elif options.early_stopping == "median":
        scheduler = MedianStoppingRule(time_attr="epoch", grace_period=1, min_samples_required=3)
    else:
        scheduler = FIFOScheduler()
    if rebuilt is not None:  # the unfinished trials (or the grid's rest) first; bayesian: told the finished ones
        if options.strategy == "bayesian":
            search = ResumedOptunaSearch(
                evaluated=rebuilt.evaluated,
                sampler=optuna.samplers.TPESampler(seed=rebuilt.seed),
                points_to_evaluate=rebuilt.points or None,
            )
            return search, scheduler
        search = BasicVariantGenerator(
            random_state=rebuilt.seed, points_to_evaluate=rebuilt.points or None, max_concurrent=options.max_parallel
        )
        return search, scheduler
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


class ResumedOptunaSearch(OptunaSearch):
    """OptunaSearch for a rebuilt Ray state: once the Tuner gives it the space, its study is told the trials the
    tuning job finished before (point, objective; an errored one as failed), which are not run again."""

    def __init__(self, evaluated: list[tuple[dict[str, Any], float | None]], **kwargs: Any):
        super().__init__(**kwargs)
        self.imgtune_evaluated = evaluated

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        if not super().set_search_properties(metric, mode, config, **spec):
            return False
        for point, value in self.imgtune_evaluated:
            with contextlib.suppress(ValueError):  # a point outside the space (it cannot be: the job's own space)
                self.add_evaluated_point(point, 0.0 if value is None else value, error=value is None)
        return True


@dataclass
class Rebuild:
    """What a new Ray state for a resumed tuning job starts from: its trial jobs' own records (see `rebuild`)."""

    reason: str
    finished: list[str] = field(default_factory=list)  # trial jobs completed or failed, in the order they ended
    unfinished: list[tuple[str, dict[str, Any]]] = field(default_factory=list)  # name, sampled point: continued
    points: list[dict[str, Any]] = field(default_factory=list)  # sampled points run first (unfinished, grid's rest)
    evaluated: list[tuple[dict[str, Any], float | None]] = field(default_factory=list)  # finished: point, objective
    objectives: list[float | None] = field(default_factory=list)  # the finished trials' objectives, in order
    samples: int = 0  # the trials the new Tuner runs, the unfinished ones among them
    seed: int | None = None


def _trial_jobs(job: Job) -> list[tuple[Job, JobRecord]]:
    """The tuning job's trial jobs that have a readable job.json, with it."""
    found = []
    for job_file in sorted((job.path / TRIALS_DIR).glob(f"{TRIAL_PREFIX}*/{JOB_FILE}")):
        trial = Job(job_file.parent)
        with contextlib.suppress(JobError):
            found.append((trial, trial.record()))
    return found


def _config_value(config: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        config = config.get(part) if isinstance(config, dict) else None  # type: ignore[assignment]
    return config


def _trial_values(record: JobRecord, space: SearchSpace) -> dict[str, Any] | None:
    """A trial job's hyperparameters (real types) from its recorded config; None when one is missing."""
    values = {key: _config_value(record.config or {}, key) for key in space.keys}
    return None if any(value is None for value in values.values()) else values


def _same_point(config: dict[str, Any], point: dict[str, Any]) -> bool:
    """Does a trial's (sampled) config hold `point`? Floats within rounding (a value taken back from a record)."""
    for key, wanted in point.items():
        have = config.get(key)
        numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (have, wanted))
        if not (have == wanted or (numbers and math.isclose(have, wanted, rel_tol=1e-9, abs_tol=1e-12))):
            return False
    return True


def _best(values: list[float], mode: str) -> float | None:
    return (max(values) if mode == "max" else min(values)) if values else None


def _trial_status(errored: bool, stop_reason: str | None, planned: int, epochs: int) -> str:
    if errored:
        return "errored"
    if stop_reason == TUNER_STOP or (planned and epochs < planned and not stop_reason):
        return "early-stopped"
    return "completed"


def trial_from_record(job: Job, trial: Job, options: TuneOptions, space: SearchSpace) -> dict[str, Any]:
    """A finished trial as the tuning job lists it, from its training job alone (a trial Ray's state does not know:
    it finished before the state was rebuilt)."""
    record = trial.record()
    metrics = trial.read_metrics()
    values = [float(m[options.objective]) for m in metrics if m.get(options.objective) is not None]
    epochs = max((int(m["epoch"]) for m in metrics), default=0)
    planned = int((record.config or {}).get("train", {}).get("epochs", 0) or 0)
    return {
        "trial": trial.name,
        "hyperparameters": _trial_values(record, space) or {},
        "objective": _best(values, options.mode),
        "objective_name": options.objective,
        "status": _trial_status(record.status == "failed", record.stop_reason, planned, epochs),
        "epochs": epochs,
        "stop_reason": record.stop_reason,
        "seconds": record.timings.get("total", record.seconds),
        "job": trial.path.relative_to(job.path).as_posix(),
        "node": None,
        "error": record.error,
    }


def resumed_seed(seed: int | None, finished: int) -> int | None:
    """The searcher's seed in a rebuilt state (a resumed study): not the job's own, whose first draws its finished
    trials had."""
    return None if seed is None else random.Random(f"imgtune resumed {seed} {finished}").randrange(2**31)


def _why_rebuild(job: Job, experiment: Path) -> str | None:
    """Why a resumed tuning job cannot restore Ray's state in `experiment`, or None when it can."""
    if not tune.Tuner.can_restore(str(experiment)):
        if job.remote is not None:
            return (
                f"the job came from {job.remote}, and Ray's state never crosses a bucket (it is pickles, which "
                "would run code here), so there is none on this machine"
            )
        return f"no Ray state was found in {experiment}"
    if not any(experiment.glob("experiment_state-*.json")):
        # Ray writes tuner.pkl as the Tuner starts, its searcher's state and trials only at its first save: a
        # driver killed in between leaves a Tuner whose searcher has no search space (Ray keeps none in tuner.pkl)
        return f"Ray's state in {experiment} was never saved (its driver was stopped before Ray's first save)"
    known = _state_trial_names(experiment)
    if known is None:  # not readable as JSON: Ray's restore says what is wrong
        return None
    known |= set(rebuilt_from(job))
    elsewhere = [trial.name for trial, _ in _trial_jobs(job) if trial.name not in known]
    if elsewhere:
        return f"the Ray state here does not know {len(elsewhere)} trial job(s) run since elsewhere"
    return None


def _state_trial_names(experiment: Path) -> set[str] | None:
    """The trial names Ray's newest saved state in `experiment` lists (read as JSON, nothing unpickled)."""
    states = sorted(experiment.glob("experiment_state-*.json"))
    if not states:
        return None
    try:
        trials = [json.loads(entry[0]) for entry in json.loads(states[-1].read_text())["trial_data"]]
        return {t.get("custom_trial_name") or TRIAL_PREFIX + t["trial_id"] for t in trials}
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def rebuilt_from(job: Job) -> list[str]:
    """The finished trial jobs a rebuilt Ray state of this machine started from (its results do not list them)."""
    try:
        return list(json.loads((job.path / RAY_STATE_DIR / REBUILT_FILE).read_text()).get("finished", []))
    except (OSError, ValueError, AttributeError):
        return []


def rebuild(job: Job, options: TuneOptions, space: SearchSpace, reason: str) -> Rebuild:
    """A new Ray state for a resumed tuning job from its trial jobs' records, replacing whatever JOB/ray held.

    Finished trial jobs (completed, or failed: errored) are not run again and count toward max_trials; bayesian
    tells the searcher their objectives, random and hyperband draw the remaining samples afresh (another seed:
    the job's own would draw the finished trials' points again), grid leaves out the combinations that finished.
    Unfinished trial jobs are tried first under their own names (TrialNames) and continue from their
    checkpoints. The job's log says what was done and why."""
    plan = Rebuild(reason)
    finished: list[tuple[Job, JobRecord]] = []
    for trial, record in _trial_jobs(job):
        if record.status in FINISHED:
            finished.append((trial, record))
        elif (values := _trial_values(record, space)) is not None:
            plan.unfinished.append((trial.name, space.samples(values)))
    finished.sort(key=lambda item: item[1].finished or item[1].updated or "")
    plan.finished = [trial.name for trial, _ in finished]
    summaries = [trial_from_record(job, trial, options, space) for trial, _ in finished]
    plan.objectives = [s["objective"] if s["status"] != "errored" else None for s in summaries]
    plan.seed = resumed_seed(options.seed, len(finished))
    notes = []
    if options.strategy == "grid":
        done = [space.samples(s["hyperparameters"]) for s in summaries if s["hyperparameters"]]
        combos = [
            dict(zip(space.keys, c, strict=True))
            for c in itertools.product(*(p.grid_values() for p in space.parameters))
        ]
        matched = [point for point in done if any(_same_point(combo, point) for combo in combos)]
        rest = [combo for combo in combos if not any(_same_point(combo, point) for point in matched)]
        plan.points, plan.samples = rest, len(rest)
        notes.append(f"the grid's {len(combos) - len(rest)} finished combination(s) are left out, {len(rest)} remain")
        if len(matched) < len(summaries):
            notes.append(
                f"{len(summaries) - len(matched)} finished trial(s) match no combination of the grid (their "
                "combinations, if any, run again)"
            )
    else:
        plan.points = [point for _, point in plan.unfinished]
        plan.samples = max(options.max_trials - len(finished), len(plan.unfinished))
        if options.strategy == "bayesian":
            plan.evaluated = [
                (space.samples(s["hyperparameters"]), objective)
                for s, objective in zip(summaries, plan.objectives, strict=True)
                if s["hyperparameters"]
            ]
            plan.evaluated += _warm_points_again(job, options, space)
            notes.append(f"the searcher is told their {len(plan.evaluated)} result(s)")
        else:
            notes.append("the remaining samples are drawn afresh")
    state = job.path / RAY_STATE_DIR
    shutil.rmtree(state, ignore_errors=True)  # a stale state of this machine, or nothing
    state.mkdir(parents=True)
    atomic_write_json(
        state / REBUILT_FILE,
        {"at": now_iso(), "reason": reason, "finished": plan.finished, "unfinished": [n for n, _ in plan.unfinished]},
    )
    job.log(
        f"Ray state rebuilt from {len(finished)} finished trial(s) ({reason}): they are not run again and count "
        f"toward the trials; {len(plan.unfinished)} unfinished trial job(s) continue from their checkpoints; "
        f"{'; '.join(notes)}; {max(plan.samples - len(plan.unfinished), 0)} new trial(s) to run"
    )
    return plan


def _warm_points_again(job: Job, options: TuneOptions, space: SearchSpace) -> list[tuple[dict[str, Any], float]]:
    """The warm-start jobs' results (read again: the lost state held them), or none, said in the log."""
    if not options.warm_start:
        return []
    try:
        warm = warm_start_points(
            options.warm_start, remote_url(job.path.parent) or job.path.parent, space, options.objective
        )
    except JobError as exc:
        job.log(f"the warm-start jobs could not be read again ({exc}); the searcher goes on without them")
        return []
    return [(space.samples(values), objective) for values, objective in warm]


class TrialNames:
    """Names Ray's trials, and their folders: trial-<Ray's trial id>, except in a rebuilt state, where a trial whose
    config is an unfinished trial job's takes that job's name, so that it continues the job (each job once: a
    claim folder in JOB/ray/continued, which a restore of this state on this machine finds again)."""

    def __init__(self, claims: Path, unfinished: list[tuple[str, dict[str, Any]]]):
        self.claims, self.unfinished = claims, unfinished

    def __call__(self, trial: Any) -> str:
        for name, point in self.unfinished:
            if _same_point(trial.config, point):
                try:
                    (self.claims / name).mkdir(parents=True)
                except FileExistsError:
                    continue
                return name
        return TRIAL_PREFIX + trial.trial_id


def trial_job_name(trial: Any) -> str:
    """A Ray trial's name (TrialNames): its training job's, and its folder's in Ray's experiment."""
    return trial.custom_trial_name or TRIAL_PREFIX + trial.trial_id


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

    def seed(self, objectives: list[float | None]) -> None:
        """Count trials that finished before (a rebuilt Ray state), in the order they finished."""
        for value in objectives:
            if value is not None and self._better(value, self.best):
                self.best, self.since = value, 0
            else:
                self.since += 1


def build_tuner(
    job: Job,
    trainable: Callable[..., None],
    context: dict[str, Any],
    options: TuneOptions,
    space: SearchSpace,
    warm: list[tuple[dict, float]],
    resuming: bool,
) -> tune.Tuner | None:
    """The Tuner of a tuning job: restored from JOB/ray when it resumes and Ray saved its state here, knowing every
    trial job; else new, and for a resumed job rebuilt from its trial jobs (`rebuild`). None: a rebuilt job has no
    trial left to run."""
    context = {**context, "first_round": first_round_size(options, space)}  # (see wait_for_first_round)
    # A data-parallel trial is a light driver: its Ray Train workers take the trial's CPUs and GPUs. Ray Tune
    # refuses a trial that reserves nothing, so it reserves one byte of memory; max_parallel bounds the trials.
    data_parallel = options.workers_per_trial > 1
    resources = {"cpu": options.cpus_per_trial, "gpu": options.gpus_per_trial}
    trainable = tune.with_resources(
        tune.with_parameters(trainable, context=context), {"cpu": 0, "memory": 1} if data_parallel else resources
    )
    storage = job.path / RAY_STATE_DIR
    rebuilt = None
    if resuming:
        reason = _why_rebuild(job, storage / EXPERIMENT)
        if reason is None:
            return tune.Tuner.restore(
                str(storage / EXPERIMENT), trainable, resume_unfinished=True, resume_errored=False
            )
        rebuilt = rebuild(job, options, space, reason)
        if rebuilt.samples <= 0:
            return None
    stopper = None
    if options.stop_after_no_improvement is not None:
        stopper = NoImprovementStopper(options.stop_after_no_improvement, options.mode, options.objective)
        stopper.seed(rebuilt.objectives if rebuilt else [])
    search, scheduler = _search_and_scheduler(options, space, warm, rebuilt)
    grid = options.strategy == "grid" and rebuilt is None  # a rebuilt grid gives its remaining points
    names = TrialNames(storage / CLAIMS_DIR, rebuilt.unfinished if rebuilt else [])
    return tune.Tuner(
        trainable,
        param_space=space.ray_space(grid=grid),
        tune_config=tune.TuneConfig(
            metric=options.objective,
            mode=options.mode,
            search_alg=search,
            scheduler=scheduler,
            num_samples=rebuilt.samples if rebuilt else 1 if grid else options.max_trials,
            # OptunaSearch is limited here; the variant generator of the other strategies limits itself
            max_concurrent_trials=options.max_parallel if options.strategy == "bayesian" else None,
            time_budget_s=options.time_budget_s,
            # One worker process runs trial after trial: a process start (Ray, torch, imports) costs seconds,
            # more than a trial on cached features (see trial_process and imgtune.training.memo).
            reuse_actors=True,
            trial_name_creator=names,
            trial_dirname_creator=trial_job_name,
        ),
        run_config=tune.RunConfig(
            storage_path=str(storage),
            name=EXPERIMENT,
            stop=stopper,
            failure_config=tune.FailureConfig(max_failures=0, fail_fast=False),
            callbacks=[TrialProgress()],
            verbose=0,
        ),
    )


def fit(
    tuner: tune.Tuner | None,
    job: Job,
    options: TuneOptions,
    space: SearchSpace,
    progress: bool,
    on_trial: Callable[[dict[str, Any]], None] | None,
) -> dict[str, Any]:
    """Run the trials (none: `tuner` is None); returns the tuning job's results for job.json (trials best first, the
    best)."""
    _driver.update(job=job, options=options, progress=progress, on_trial=on_trial)
    period = state_save_period(trial_count(options, space))
    grid_results: Any = []
    try:
        # Ray reads the period when fit() makes its controller; one the user set stands
        with contextlib.redirect_stdout(sys.stderr), _env_default("TUNE_GLOBAL_CHECKPOINT_S", f"{period:g}"):
            if tuner is not None:
                grid_results = tuner.fit()  # (Ray's own tables would spoil --json on stdout)
    finally:
        _driver.clear()
    trials = collect_trials(job, options, space, grid_results)
    return {"trials": trials, "trials_count": len(trials), "best": best_of(trials)}


@contextlib.contextmanager
def _env_default(name: str, value: str) -> Iterator[None]:
    """Environment variable `name` set to `value` inside the block, unless it is set already."""
    if name in os.environ:
        yield
        return
    os.environ[name] = value
    try:
        yield
    finally:
        os.environ.pop(name, None)


def warm_start_points(jobs: list[str], workspace: str | Path | None, space: SearchSpace, objective: str) -> list:
    """(values, objective) of earlier tuning jobs' finished trials whose keys match this space."""
    points = []
    for name in jobs:
        record = Job.open(name, workspace).record()
        if record.kind != "tuning":
            raise JobError(f"{name} is not a tuning job", "warm starts read earlier `imgtune tune` jobs")
        for trial in record.trials or []:
            value = trial.get("objective")
            matches = set(trial.get("hyperparameters", {})) == set(space.keys)
            if matches and value is not None and math.isfinite(value) and trial.get("objective_name") == objective:
                points.append((trial["hyperparameters"], value))
    return points


def collect_trials(job: Job, options: TuneOptions, space: SearchSpace, results: Any) -> list[dict[str, Any]]:
    """Each trial: hyperparameters (real types), objective (its best epoch), status, epochs, duration, job; Ray's
    results and the trials a rebuilt Ray state started from (which Ray's results do not list)."""
    trials = []
    for result in results:
        config = result.config or {}
        history = result.metrics_dataframe
        name = (result.metrics or {}).get("job") or Path(result.path).name  # (trial_job_name)
        trial_job = job.path / TRIALS_DIR / name
        record = Job(trial_job).record() if (trial_job / JOB_FILE).exists() else None
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
        objective = _best(values, options.mode)
        has_times = history is not None and "time_total_s" in history and len(history)
        ray_seconds = float(history["time_total_s"].max()) if has_times else None
        planned = int(((record.config or {}) if record else {}).get("train", {}).get("epochs", 0) or 0)
        stop_reason = record.stop_reason if record else None
        own_seconds = record.timings.get("total") if record else None
        status = _trial_status(result.error is not None, stop_reason, planned, epochs)
        trials.append(
            {
                "trial": name,
                "hyperparameters": space.values({k: v for k, v in config.items() if k in space.keys}),
                "objective": objective,
                "objective_name": options.objective,
                "status": status,
                "epochs": epochs,
                "stop_reason": stop_reason,
                "seconds": ray_seconds if ray_seconds is not None else own_seconds,
                "job": str(trial_job.relative_to(job.path)) if trial_job.exists() else None,
                "node": (result.metrics or {}).get("node_ip"),
                "error": _error_text(result.error),
            }
        )
    listed = {trial["trial"] for trial in trials}
    for name in rebuilt_from(job):
        trial = Job(job.path / TRIALS_DIR / name)
        if name not in listed and trial.job_file.is_file():
            trials.append(trial_from_record(job, trial, options, space))
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
        job.log(f"trial {trial_job_name(trial)} {status}: {objective} {shown}")
        if job.remote is not None:
            job.push(min_interval=push_interval(), strict=False)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=f"last {objective} {shown}")
        if on_trial is not None:
            on_trial({"trial": trial_job_name(trial), "status": status, "objective": value})

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._done(trial, "finished")

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._done(trial, "errored")

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        if self.bar is not None:
            self.bar.stop()
