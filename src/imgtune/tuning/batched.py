"""Tuning on cached features: Optuna's ask-and-tell over batches of trials, each batch trained as one batch of
heads by a long-lived Ray worker.

When every trial shares one feature cache (a frozen backbone), a trial is seconds of head training; starting a
process per trial, as Ray Tune does, would cost more than the trial. Here the driver holds an Optuna study and
`max_parallel` Ray actors (the worker class, imgtune.runs.trial_batches.TrialBatchWorker, is given by the
caller). It asks the study for a batch of trials per idle worker (at most `heads_per_worker`), the worker trains
them together one epoch per call, and the driver reports each trial's objective every epoch, so that the
study's pruner (ASHA: successive halving; median) stops poor trials between epochs, and tells the study each
trial's result when it ends.

Strategies: bayesian (TPE), random, grid (every combination, enqueued), hyperband (random with successive
halving). Warm starts: bayesian learns from earlier trials' results; random evaluates their points first. The
study lives in JOB/optuna.journal (an append-only file), so a tuning job whose driver was killed resumes: trials
that had finished stay finished, trials that were running are trained again from their start.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import shutil
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import optuna
import ray
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.storages import JournalStorage
from optuna.storages.journal import BaseJournalBackend
from optuna.trial import TrialState

from imgtune.config import TuneOptions
from imgtune.core.io import read_jsonl
from imgtune.storage.jobs import Job, push_interval
from imgtune.tuning.space import SearchSpace
from imgtune.tuning.tuner import TRIAL_PREFIX, TRIALS_DIR, TUNER_STOP, best_of, resumed_seed, sort_trials

STUDY_FILE = "optuna.journal"
STUDY_NAME = "imgtune"
_SUMMARY = "imgtune_summary"  # the user attribute holding a finished trial's summary
_WARM = "imgtune_warm_start"  # the user attribute of an earlier job's trial the searcher learns from
_NAME = "imgtune_trial"  # the user attribute holding a trial's name (its training job's directory)


def can_batch(base: dict[str, Any]) -> bool:
    """Trials on shared features can train as batches of heads unless they capture tensors or profile (per
    trial hooks on a model that is not there alone), each trial is a data-parallel job, or they warm up per
    step or keep a weight EMA (a batch of heads does neither)."""
    train = base.get("train", {})
    if train.get("workers", 1) > 1 or train.get("warmup_epochs", 0) > 0 or train.get("ema_decay", 0) > 0:
        return False  # (batched heads have no per-step warmup and no weight EMA: those trials train alone)
    return not base.get("debugger", {}).get("enabled", True) and not base.get("profiler", {}).get("enabled", True)


def trial_name(number: int) -> str:
    return f"{TRIAL_PREFIX}{number:05d}"


def distributions(space: SearchSpace) -> dict[str, BaseDistribution]:
    """Optuna distributions of the space's sampled values (reverse_log samples 1 - value on a log scale)."""
    out: dict[str, BaseDistribution] = {}
    for p in space.parameters:
        if p.type == "categorical":
            out[p.key] = CategoricalDistribution(list(p.values))
            continue
        low, high = p._sampled_bounds()
        if p.type == "int" and p.scale == "linear":
            out[p.key] = IntDistribution(int(low), int(high))
        else:
            out[p.key] = FloatDistribution(low, high, log=p.scale != "linear")
    return out


def _dotted(raw: dict[str, Any], key: str) -> Any:
    for part in key.split("."):
        raw = raw.get(part, {}) if isinstance(raw, dict) else {}
    return raw


def grid_points(space: SearchSpace) -> list[dict[str, Any]]:
    combos = itertools.product(*(p.grid_values() for p in space.parameters))
    return [dict(zip(space.keys, combo, strict=True)) for combo in combos]


def _sampler(options: TuneOptions, seed: int | None) -> optuna.samplers.BaseSampler:
    if options.strategy == "bayesian":
        return optuna.samplers.TPESampler(seed=seed)
    return optuna.samplers.RandomSampler(seed=seed)  # grid: every point is enqueued, none sampled


def _pruner(options: TuneOptions) -> optuna.pruners.BasePruner:
    if options.strategy == "hyperband" or options.early_stopping == "asha":
        return optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=3)
    if options.early_stopping == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0)
    return optuna.pruners.NopPruner()


class JournalFile(BaseJournalBackend):
    """Optuna's journal (its study as a log of operations) in an append-only JSON-lines file, kept in memory too.

    Only the tuning job's driver writes it (the job's lock says so), so unlike Optuna's JournalFileBackend it
    takes no file lock, never reads the file back, and does not sync every line to disk: its thousands of
    small writes cost microseconds. A kill leaves at most a cut-short last line, which is skipped; a power cut
    can lose the last lines, and the trials they told of are trained again on resume."""

    def __init__(self, path: Path):
        self.path = path
        self.logs: list[dict[str, Any]] = list(read_jsonl(path))

    def read_logs(self, log_number_from: int) -> list[dict[str, Any]]:
        return self.logs[log_number_from:]

    def append_logs(self, logs: list[dict[str, Any]]) -> None:
        with self.path.open("a") as f:
            f.write("".join(json.dumps(log, separators=(",", ":")) + "\n" for log in logs))
        self.logs.extend(logs)


def open_study(
    job: Job, options: TuneOptions, space: SearchSpace, warm: list[tuple[dict, float]], resumed: bool
) -> optuna.Study:
    """The tuning job's study: created (with warm-start points, or the grid) or, when resuming, loaded."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = JournalStorage(JournalFile(job.path / STUDY_FILE))
    direction = "maximize" if options.mode == "max" else "minimize"
    study = optuna.create_study(
        storage=storage,
        study_name=STUDY_NAME,
        direction=direction,
        sampler=_sampler(options, options.seed),
        pruner=_pruner(options),
        load_if_exists=resumed,
    )
    if resumed and study.trials:
        # The job's own seed would draw the points of its first trials again (a sampler's draws depend on its
        # seed, not on the trials the study holds): each resume samples with a seed of its own.
        study.sampler = _sampler(options, resumed_seed(options.seed, len(study.trials)))
        return study
    dists = distributions(space)
    if options.strategy == "grid":
        for point in grid_points(space):
            study.enqueue_trial(point)
    elif options.strategy == "bayesian":  # learn from earlier results without training them again
        for values, objective in warm:
            study.add_trial(
                optuna.trial.create_trial(
                    params=space.samples(values), distributions=dists, value=objective, user_attrs={_WARM: True}
                )
            )
    else:  # random, hyperband: evaluate the earlier points first
        for values, _ in warm:
            study.enqueue_trial(space.samples(values))
    return study


@dataclass(eq=False)
class _Running:
    """A trial on a worker, as the driver follows it."""

    trial: optuna.Trial
    name: str
    values: dict[str, Any]
    objectives: list[float] = field(default_factory=list)
    epochs: int = 0


@dataclass(eq=False)
class _Slot:
    """A worker and the trials it trains."""

    actor: Any
    node: str
    running: dict[str, _Running] = field(default_factory=dict)
    stops: list[str] = field(default_factory=list)


class BatchedTuning:
    """One tuning job's trials on batches of heads. `run()` returns the job's results for job.json."""

    def __init__(
        self,
        job: Job,
        options: TuneOptions,
        space: SearchSpace,
        warm: list[tuple[dict, float]],
        *,
        resumed: bool,
        worker: type,
        context: dict[str, Any],
        make_config: Callable[[dict[str, Any], str], dict[str, Any]],
        progress: bool,
        on_trial: Callable[[dict[str, Any]], None] | None,
    ):
        self.job, self.options, self.space = job, options, space
        self.study = open_study(job, options, space, warm, resumed)
        self.dists = distributions(space)
        self.worker, self.context, self.make_config = worker, context, make_config
        self.progress, self.on_trial = progress, on_trial
        self.total = len(grid_points(space)) if options.strategy == "grid" else options.max_trials
        self.best: float | None = None
        self.since_best = 0
        self.bar: Any = None
        self.next_number = 0  # the next trial's name (see _first_free_number)

    # -- the study's trials -------------------------------------------------------------------------------------

    def _own_trials(self) -> list[optuna.trial.FrozenTrial]:
        return [t for t in self.study.get_trials(deepcopy=False) if not t.user_attrs.get(_WARM)]

    def _reruns(self) -> list[_Running]:
        """After a killed driver: trials it left running whose job completed are told, the others train again
        from the start in a clean directory; a trial directory the study does not know (the kill came between
        the trial's end and the journal's push to a bucket) is added to the study when it completed, else
        removed. Returns the trials to train again."""
        reruns, known = [], set()
        for frozen in self._own_trials():
            name = frozen.user_attrs.get(_NAME, trial_name(frozen.number))
            known.add(name)
            if frozen.state != TrialState.RUNNING:
                continue
            running = _Running(optuna.Trial(self.study, frozen._trial_id), name, self.space.values(frozen.params))
            trial_job = Job(self.job.path / TRIALS_DIR / name)
            if self._completed(trial_job, running):
                record = trial_job.record()
                outcome = {"status": "completed", "stop_reason": record.stop_reason, "seconds": record.seconds}
                self._finish(running, outcome, node=None)
            else:
                shutil.rmtree(trial_job.path, ignore_errors=True)
                reruns.append(running)
        trials_dir = self.job.path / TRIALS_DIR
        for path in sorted(trials_dir.iterdir()) if trials_dir.is_dir() else []:
            if path.name not in known:
                self._adopt(Job(path))
        return reruns

    def _completed(self, trial_job: Job, running: _Running) -> bool:
        """Did the trial's job complete? Then `running` gets its objectives and epochs from its metrics."""
        if not trial_job.job_file.exists() or trial_job.record().status != "completed":
            return False
        objective = self.options.objective
        metrics = trial_job.read_metrics()
        running.objectives = [float(m[objective]) for m in metrics if m.get(objective) is not None]
        running.epochs = len(metrics)
        return True

    def _adopt(self, trial_job: Job) -> None:
        """A completed trial directory the study does not know joins it as a finished trial; anything else
        there is removed (its trial is asked again)."""
        config = trial_job.record().config if trial_job.job_file.exists() else None
        running = _Running(None, trial_job.name, {})  # type: ignore[arg-type]  (no live trial: added below)
        if config is None or not self._completed(trial_job, running):
            shutil.rmtree(trial_job.path, ignore_errors=True)
            return
        running.values = {key: _dotted(config, key) for key in self.space.keys}
        record = trial_job.record()
        outcome = {"status": "completed", "stop_reason": record.stop_reason, "seconds": record.seconds}
        summary = self._summary(running, outcome, node=None)
        state, value = self._state(summary)
        self.study.add_trial(
            optuna.trial.create_trial(
                params=self.space.samples(running.values),
                distributions=self.dists,
                state=state,
                value=value,
                intermediate_values=dict(enumerate(running.objectives, start=1)),
                user_attrs={_NAME: trial_job.name, _SUMMARY: summary},
            )
        )

    def _ask(self, count: int) -> list[_Running]:
        asked = []
        for _ in range(count):
            trial = self.study.ask(self.dists)
            name = trial_name(self.next_number)
            self.next_number += 1
            trial.set_user_attr(_NAME, name)
            asked.append(_Running(trial, name, self.space.values(trial.params)))
        return asked

    def _first_free_number(self) -> int:
        """Trial names count on from the highest one in the study or on disk (never Optuna's numbers, which
        a journal that lost its last lines would give again)."""
        names = [t.user_attrs.get(_NAME, "") for t in self._own_trials()]
        trials_dir = self.job.path / TRIALS_DIR
        names += [p.name for p in trials_dir.iterdir()] if trials_dir.is_dir() else []
        numbers = [int(n.removeprefix(TRIAL_PREFIX)) for n in names if n.removeprefix(TRIAL_PREFIX).isdigit()]
        return max(numbers, default=-1) + 1

    # -- the loop -----------------------------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        started = time.monotonic()
        self.next_number = self._first_free_number()
        reruns = self._reruns()
        asked = len([t for t in self._own_trials() if t.state != TrialState.WAITING])  # (enqueued: not yet asked)
        slots = self._start_workers(min(self.options.max_parallel, max(1, self.total - asked + len(reruns))))
        self._start_progress(done=len([t for t in self._own_trials() if t.state.is_finished()]))
        inflight: dict[Any, _Slot] = {}
        try:
            while True:
                for slot in slots:
                    if slot.running or slot in inflight.values():
                        continue
                    batch = reruns[: self._batch_size(len(reruns), len(slots))]
                    reruns = reruns[len(batch) :]
                    budget = self.options.time_budget_s
                    budget_left = budget is None or time.monotonic() - started < budget
                    if not batch and asked < self.total and budget_left and not self._no_improvement():
                        batch = self._ask(self._batch_size(self.total - asked, len(slots)))
                        asked += len(batch)
                    if batch:
                        slot.running = {r.name: r for r in batch}
                        slot.actor.start.remote([(r.name, self.make_config(r.values, r.name)) for r in batch])
                        inflight[slot.actor.epoch.remote([])] = slot
                if not inflight:
                    break
                ready, _ = ray.wait(list(inflight), num_returns=1)
                slot = inflight.pop(ready[0])
                try:
                    reports = ray.get(ready[0])
                except ray.exceptions.RayError as exc:  # the worker died (its node went away, out of memory)
                    self._worker_lost(slot, exc)
                    slots[slots.index(slot)] = self._start_workers(1)[0]
                    continue
                self._take(slot, reports)
                if slot.running and not reports:  # nothing moved: the worker no longer knows these trials
                    self._worker_lost(slot, RuntimeError("it returned no news of them"))
                if slot.running:
                    stops, slot.stops = slot.stops, []
                    inflight[slot.actor.epoch.remote(stops)] = slot
        finally:
            if self.bar is not None:
                self.bar.stop()
            for slot in slots:
                with contextlib.suppress(Exception):
                    ray.kill(slot.actor)
        summaries = [t.user_attrs[_SUMMARY] for t in self._own_trials() if _SUMMARY in t.user_attrs]
        trials = sort_trials(summaries, self.options.mode)
        return {"trials": trials, "trials_count": len(trials), "best": best_of(trials), "trials_batched": True}

    def _batch_size(self, remaining: int, workers: int) -> int:
        """Trials per batch: the remaining ones shared by the workers, at most heads_per_worker."""
        return max(1, min(self.options.heads_per_worker, math.ceil(remaining / workers))) if remaining else 0

    def _start_workers(self, count: int) -> list[_Slot]:
        remote = ray.remote(
            num_cpus=self.options.cpus_per_trial,
            num_gpus=self.options.gpus_per_trial,
            scheduling_strategy="SPREAD",  # on a cluster, workers on every node
            max_restarts=0,
        )(self.worker)
        actors = [remote.remote(self.context) for _ in range(count)]
        nodes = ray.get([actor.node.remote() for actor in actors])
        return [_Slot(actor, node) for actor, node in zip(actors, nodes, strict=True)]

    def _take(self, slot: _Slot, reports: dict[str, dict[str, Any]]) -> None:
        for name, report in reports.items():
            running = slot.running.get(name)
            if running is None:
                continue
            record = report.get("record")
            if record is not None:
                running.epochs = int(record["epoch"])
                value = record.get(self.options.objective)
                if value is not None and math.isfinite(value):
                    running.objectives.append(float(value))
                    with warnings.catch_warnings():  # a trial trained again reports its epochs again
                        warnings.simplefilter("ignore")
                        running.trial.report(float(value), running.epochs)
                if "outcome" not in report and running.trial.should_prune():
                    slot.stops.append(name)
            if "outcome" in report:
                del slot.running[name]
                self._finish(running, report["outcome"], slot.node)

    def _summary(self, running: _Running, outcome: dict[str, Any], node: str | None) -> dict[str, Any]:
        """A finished trial as the tuning job lists it."""
        status = outcome["status"]
        if status == "completed" and outcome.get("stop_reason") == TUNER_STOP:
            status = "early-stopped"
        values = running.objectives
        objective = (max(values) if self.options.mode == "max" else min(values)) if values else None
        return {
            "trial": running.name,
            "hyperparameters": running.values,
            "objective": objective,
            "objective_name": self.options.objective,
            "status": status,
            "epochs": running.epochs if status != "errored" else outcome.get("epochs", 0),
            "stop_reason": outcome.get("stop_reason"),
            "seconds": outcome.get("seconds"),
            "own_seconds": outcome.get("own_seconds"),
            "job": f"{TRIALS_DIR}/{running.name}",
            "node": node,
            "error": (outcome.get("error") or "")[-20_000:] or None,
        }

    @staticmethod
    def _state(summary: dict[str, Any]) -> tuple[TrialState, float | None]:
        """The study's state and value of a finished trial."""
        if summary["status"] == "errored" or summary["objective"] is None:
            return TrialState.FAIL, None
        if summary["status"] == "early-stopped":
            return TrialState.PRUNED, None
        return TrialState.COMPLETE, summary["objective"]

    def _finish(self, running: _Running, outcome: dict[str, Any], node: str | None) -> None:
        """Tell the study a trial's result, record its summary, show it."""
        summary = self._summary(running, outcome, node)
        running.trial.set_user_attr(_SUMMARY, summary)
        state, value = self._state(summary)
        if state == TrialState.COMPLETE:
            self.study.tell(running.trial, value)
        else:
            self.study.tell(running.trial, state=state)
        objective = summary["objective"]
        if summary["status"] != "errored" and objective is not None:
            maximize = self.options.mode == "max"
            better = self.best is None or (objective > self.best if maximize else objective < self.best)
            self.best, self.since_best = (objective, 0) if better else (self.best, self.since_best + 1)
        self._announce(summary)

    def _worker_lost(self, slot: _Slot, exc: BaseException) -> None:
        for running in list(slot.running.values()):
            self._finish(running, {"status": "errored", "error": f"lost by its worker: {exc}"}, slot.node)
        slot.running.clear()

    def _no_improvement(self) -> bool:
        patience = self.options.stop_after_no_improvement
        return patience is not None and self.since_best >= patience

    # -- what the user sees -------------------------------------------------------------------------------------

    def _start_progress(self, done: int) -> None:
        if not self.progress:
            return
        from imgtune.core.progress import progress_bar

        self.bar = progress_bar()
        self.bar.start()
        self.task = self.bar.add_task("trials", total=self.total, completed=done, info="")

    def _announce(self, summary: dict[str, Any]) -> None:
        objective, value, status = self.options.objective, summary["objective"], summary["status"]
        shown = "-" if value is None else f"{value:.4f}"
        word = "errored" if status == "errored" else "finished"
        self.job.log(f"trial {summary['trial']} {word}: {objective} {shown}")
        if self.job.remote is not None:
            self.job.push(min_interval=push_interval(), strict=False)
        if self.bar is not None:
            self.bar.update(self.task, advance=1, info=f"last {objective} {shown}")
        if self.on_trial is not None:
            self.on_trial({"trial": summary["trial"], "status": word, "objective": value})
