"""Tuning trials trained as batches of heads, in a Ray worker that lives as long as the tuning job.

With a frozen backbone and the feature cache, a trial is a head trained on cached features. A
`TrialBatchWorker` (one per parallel slot, a Ray actor) prepares the data, the model and the features once
per distinct configuration, then trains the trials it is given as `HeadBatch`es (imgtune.training.batched_heads:
trials whose configs differ only in learning rate, weight decay, momentum, dropout or head width share every
feature batch), one epoch per call, so that the driver (imgtune.tuning.batched) can stop trials between epochs.

Each trial is a training job in the tuning job's `trials/` directory, run through the one job lifecycle: its
job.json, metrics.jsonl and logs.txt are a training job's; its weights are the head's alone, in
`checkpoints/head.safetensors` (the backbone is the tuning job's, unchanged). A trial of a batch that was cut
short (its driver was killed) is trained again from the start: it costs seconds.
"""

from __future__ import annotations

import json
import os
import time
import traceback
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from imgtune.config import JobConfig, build_config
from imgtune.core.io import atomic_output
from imgtune.data.dataset import PreparedData, prepare_data
from imgtune.runs.lifecycle import JobLifecycle
from imgtune.runs.plugins import tracking_plugins
from imgtune.storage.record import JobRecord
from imgtune.training.batched_heads import HeadBatch, batch_key
from imgtune.training.feature_cache import FeatureLoader
from imgtune.training.setup import build_model, resolve_device, setup_training, versions
from imgtune.training.standard_callbacks import MetricsWriter
from imgtune.tuning.tuner import TUNER_STOP, require_shared_paths

HEAD_WEIGHTS = "head.safetensors"
PREPARED_KEPT = 2  # distinct (data, model, features) setups a worker keeps in memory


class _Prepared:
    """What every trial with the same data, model and features shares: computed once per worker."""

    def __init__(self, config: JobConfig):
        self.device = resolve_device(config.train.device)
        self.data: PreparedData = prepare_data(config.data, progress=False)
        model = build_model(config, self.data.num_classes)
        self.weights = model.weights_report.to_dict() if model.weights_report else None
        self.weights_summary = model.weights_report.summary() if model.weights_report else None
        preprocessing = model.preprocessing(config.data.image_size)
        setup = setup_training(model, self.data, preprocessing, config, self.device, progress=False)
        if setup.mode != "features":
            raise RuntimeError("batched trials need cached features (a frozen backbone, train.feature_cache on)")
        self.features: dict[str, FeatureLoader] = setup.loaders
        self.num_features = model.num_features
        self.feature_backend = setup.feature_backend
        del model  # the backbone is not needed again: heads train on the features

    def loaders(self, batch_size: int) -> dict[str, FeatureLoader]:
        return {
            split: FeatureLoader(loader.views, loader.labels, batch_size, shuffle=split == "train")
            for split, loader in self.features.items()
        }


def _features_key(config: JobConfig) -> str:
    """Configs with equal keys share a `_Prepared`: all but the head, the optimisation and the batch size."""
    raw = config.model_dump(mode="json")
    model, train = raw["model"], raw["train"]
    return json.dumps(
        {
            "data": raw["data"],
            "model": {k: model[k] for k in ("backbone", "pretrained", "weights", "freeze", "backend")},
            "train": {k: train[k] for k in ("feature_cache", "augment_views", "seed", "device")},
        },
        sort_keys=True,
    )


class _Group:
    """Trials trained together: one HeadBatch, its loaders, the trials' lifecycles."""

    def __init__(self, names: list[str], lives: list[JobLifecycle], batch: HeadBatch, loaders: dict):
        self.names, self.lives, self.batch, self.loaders = names, lives, batch, loaders
        self.epoch = 0
        self.finished: set[int] = set()


class TrialBatchWorker:
    """A Ray actor training batches of trials; `start` a batch, then call `epoch` until every trial is final.

    `context`: trials_dir, cache (IMGTUNE_CACHE), cpus_per_trial, base (for require_shared_paths).

    Each trial's timings say what it cost: `training_loop` (its share of its batch's epochs: its own work) and
    `worker_share` (its share of the worker's wall time while it ran: its work, writing its files, waiting for
    the driver), so that `worker_share - training_loop` is what the trial cost beyond its own work."""

    def __init__(self, context: dict[str, Any]):
        require_shared_paths(context)
        torch.set_num_threads(max(1, int(context["cpus_per_trial"])))
        if context.get("cache"):
            os.environ["IMGTUNE_CACHE"] = context["cache"]
        self.trials_dir = Path(context["trials_dir"])
        self.prepared: OrderedDict[str, _Prepared] = OrderedDict()
        self.groups: list[_Group] = []
        self.outcomes: dict[str, dict[str, Any]] = {}
        self.worker_share: dict[str, float] = {}
        self.since: float | None = None  # the end of the last call, when the worker's time is counted from

    def node(self) -> str:
        import ray

        return ray.util.get_node_ip_address() if ray.is_initialized() else "127.0.0.1"

    def _prepare(self, config: JobConfig) -> _Prepared:
        key = _features_key(config)
        if key in self.prepared:
            self.prepared.move_to_end(key)
        else:
            self.prepared[key] = _Prepared(config)
            while len(self.prepared) > PREPARED_KEPT:
                self.prepared.popitem(last=False)
        return self.prepared[key]

    def start(self, trials: list[tuple[str, dict[str, Any]]]) -> None:
        """Take a batch of (trial name, raw job config); trials that cannot start end `errored` at once."""
        if self.since is None:  # (the first batch: the worker's start-up and first features are the job's cost)
            self.since = time.perf_counter()
        by_key: dict[str, list[tuple[str, JobConfig]]] = {}
        for name, raw in trials:
            self.worker_share[name] = 0.0
            try:
                config = build_config(raw, f"config of trial {name}")
            except Exception as exc:
                self._fail_unstarted(name, raw, exc, traceback.format_exc())
                continue
            by_key.setdefault(batch_key(config), []).append((name, config))
        for members in by_key.values():
            self._start_group(members)

    def _start_group(self, members: list[tuple[str, JobConfig]]) -> None:
        lives: list[JobLifecycle] = []
        try:
            for name, config in members:
                record = JobRecord(name=name, kind="training", config=config.model_dump(mode="json"))
                lives.append(
                    JobLifecycle.create(
                        self.trials_dir, record, prefix="trial", must_push=False, durable=False,
                        plugins=tracking_plugins(config),
                    )
                )  # fmt: skip
            prepared = self._prepare(members[0][1])
            configs = [config for _, config in members]
            batch = HeadBatch(configs, prepared.num_features, prepared.data.num_classes, prepared.device)
        except Exception as exc:
            trace = traceback.format_exc()
            for (name, _), life in zip(members, lives, strict=False):
                self.outcomes[name] = self._end_failed(life, exc, trace)
            for name, config in members[len(lives) :]:
                self._fail_unstarted(name, config.model_dump(mode="json"), exc, trace)
            return
        data = prepared.data
        running = {
            "versions": versions(),
            "dataset": data.summary(),
            "weights": prepared.weights,
            "training_mode": "features",
            "feature_backend": prepared.feature_backend,
            "trained_in_batch_of": len(members),
        }
        for life in lives:
            for problem in data.excluded:
                life.job.log(f"excluded {problem.path}: {problem.reason}")
            if prepared.weights_summary:
                life.job.log(prepared.weights_summary)
            life.begin(**running)
        loaders = prepared.loaders(configs[0].train.batch_size)
        self.groups.append(_Group([name for name, _ in members], lives, batch, loaders))

    def epoch(self, stops: list[str]) -> dict[str, dict[str, Any]]:
        """Stop the named trials, run one more epoch of every running trial; per trial: its epoch record
        ("record") and, once it ended, its outcome ("outcome"). Outcomes of trials that could not start come
        with the first call."""
        reports: dict[str, dict[str, Any]] = {name: {"outcome": o} for name, o in self.outcomes.items()}
        self.outcomes.clear()
        present = [g.names[k] for g in self.groups for k in range(len(g.names)) if k not in g.finished]
        ending: list[tuple[_Group, int]] = []
        for group in self.groups:
            for k, name in enumerate(group.names):
                if name in stops and not group.batch.heads[k].done:
                    group.batch.stop(k, TUNER_STOP)
            ending += [(group, k) for k in self._done(group)]
            if group.batch.active():
                group.epoch += 1
                try:
                    records = group.batch.run_epoch(group.epoch, group.loaders)
                except Exception as exc:
                    trace = traceback.format_exc()
                    for k in group.batch.active():
                        group.finished.add(k)
                        reports[group.names[k]] = {"outcome": self._end_failed(group.lives[k], exc, trace)}
                    continue
                for k, record in records.items():
                    MetricsWriter(group.lives[k].job).on_epoch_end(group.batch.heads[k])  # type: ignore[arg-type]
                    reports[group.names[k]] = {"record": record}
                ending += [(group, k) for k in self._done(group)]
        self._share_time(present)
        for group, k in ending:
            reports.setdefault(group.names[k], {})["outcome"] = self._end(group, k)
        self.groups = [g for g in self.groups if len(g.finished) < len(g.names)]
        return reports

    def _share_time(self, present: list[str]) -> None:
        """The worker's time since it was last counted, shared by the trials present."""
        now = time.perf_counter()
        if present and self.since is not None:
            for name in present:
                self.worker_share[name] += (now - self.since) / len(present)
        self.since = now

    def _done(self, group: _Group) -> list[int]:
        """The heads of `group` whose training ended since the last look."""
        ended = [k for k, head in enumerate(group.batch.heads) if head.done and k not in group.finished]
        group.finished.update(ended)
        return ended

    def _end(self, group: _Group, k: int) -> dict[str, Any]:
        """End trial k of `group`: its weights, its job.json completed; returns its outcome for the driver."""
        life, head = group.lives[k], group.batch.heads[k]
        try:
            results, state = group.batch.finish(k)
            with atomic_output(life.job.checkpoint_dir / HEAD_WEIGHTS) as tmp:
                save_file(state, str(tmp), metadata={"head": head.config.model.head})
            own = sum(record["epoch_time"] for record in head.history)
            share = self.worker_share.pop(group.names[k], 0.0)
            life.timings.update(training_loop=own, worker_share=share, total=time.perf_counter() - life.started)
            life.complete(results)
        except Exception as exc:
            return self._end_failed(life, exc, traceback.format_exc())
        outcome = {"status": "completed", "epochs": results["epochs_run"], "stop_reason": head.stop_reason}
        return {**outcome, "seconds": life.timings["total"], "own_seconds": own, "worker_share": share}

    def _end_failed(self, life: JobLifecycle, exc: BaseException, trace: str) -> dict[str, Any]:
        self.worker_share.pop(life.job.name, None)
        life.fail(exc, trace)
        return {"status": "errored", "error": trace, "epochs": 0}

    def _fail_unstarted(self, name: str, raw: dict[str, Any], exc: BaseException, trace: str) -> None:
        """A trial whose job could not even be created (a bad config): still a failed job, with its error."""
        try:
            record = JobRecord(name=name, kind="training", config=raw)
            life = JobLifecycle.create(self.trials_dir, record, prefix="trial", must_push=False, durable=False)
            self.outcomes[name] = self._end_failed(life, exc, trace)
        except Exception:
            self.outcomes[name] = {"status": "errored", "error": trace, "epochs": 0}
