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
        started = time.perf_counter()
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
        self.seconds = time.perf_counter() - started
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

    def __init__(self, names: list[str], lives: list[JobLifecycle], batch: HeadBatch, loaders: dict, started: float):
        self.names, self.lives, self.batch, self.loaders = names, lives, batch, loaders
        self.epoch = 0
        self.started = started
        self.loop_seconds = 0.0
        self.finished: set[int] = set()


class TrialBatchWorker:
    """A Ray actor training batches of trials; `start` a batch, then call `epoch` until every trial is final.

    `context`: trials_dir, cache (IMGTUNE_CACHE), cpus_per_trial, base (for require_shared_paths)."""

    def __init__(self, context: dict[str, Any]):
        require_shared_paths(context)
        torch.set_num_threads(max(1, int(context["cpus_per_trial"])))
        if context.get("cache"):
            os.environ["IMGTUNE_CACHE"] = context["cache"]
        self.trials_dir = Path(context["trials_dir"])
        self.prepared: OrderedDict[str, _Prepared] = OrderedDict()
        self.groups: list[_Group] = []
        self.outcomes: dict[str, dict[str, Any]] = {}

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
        by_key: dict[str, list[tuple[str, JobConfig]]] = {}
        for name, raw in trials:
            try:
                config = build_config(raw, f"config of trial {name}")
            except Exception as exc:
                self._fail_unstarted(name, raw, exc, traceback.format_exc())
                continue
            by_key.setdefault(batch_key(config), []).append((name, config))
        for members in by_key.values():
            self._start_group(members)

    def _start_group(self, members: list[tuple[str, JobConfig]]) -> None:
        started = time.perf_counter()
        lives = []
        try:
            for name, config in members:
                record = JobRecord(name=name, kind="training", config=config.model_dump(mode="json"))
                life = JobLifecycle.create(self.trials_dir, record, prefix="trial", must_push=False)
                lives.append(life)
                life.begin(versions=versions())
            prepared = self._prepare(members[0][1])
            configs = [config for _, config in members]
            batch = HeadBatch(configs, prepared.num_features, prepared.data.num_classes, prepared.device)
        except Exception as exc:
            trace = traceback.format_exc()
            for (name, _), life in zip(members, lives, strict=False):
                self.outcomes[name] = self._end_failed(name, life, exc, trace)
            for name, config in members[len(lives) :]:
                self._fail_unstarted(name, config.model_dump(mode="json"), exc, trace)
            return
        data = prepared.data
        for life in lives:
            job = life.job
            for problem in data.excluded:
                job.log(f"excluded {problem.path}: {problem.reason}")
            if prepared.weights_summary:
                job.log(prepared.weights_summary)
            job.update(
                dataset=data.summary(),
                weights=prepared.weights,
                training_mode="features",
                feature_backend=prepared.feature_backend,
                feature_extraction=None,
                resumed_from_epoch=None,
                trained_in_batch_of=len(members),
            )
        loaders = prepared.loaders(configs[0].train.batch_size)
        self.groups.append(_Group([name for name, _ in members], lives, batch, loaders, started))

    def epoch(self, stops: list[str]) -> dict[str, dict[str, Any]]:
        """Stop the named trials, run one more epoch of every running trial; per trial: its epoch record
        ("record") and, once it ended, its outcome ("outcome"). Outcomes of trials that could not start come
        with the first call."""
        reports: dict[str, dict[str, Any]] = {name: {"outcome": o} for name, o in self.outcomes.items()}
        self.outcomes.clear()
        for group in self.groups:
            for k, name in enumerate(group.names):
                if name in stops and not group.batch.heads[k].done:
                    group.batch.stop(k, TUNER_STOP)
            self._end_done(group, reports)
            if not group.batch.active():
                continue
            group.epoch += 1
            started = time.perf_counter()
            try:
                records = group.batch.run_epoch(group.epoch, group.loaders)
            except Exception as exc:
                trace = traceback.format_exc()
                for k in group.batch.active():
                    group.finished.add(k)
                    reports[group.names[k]] = {"outcome": self._end_failed(group.names[k], group.lives[k], exc, trace)}
                continue
            group.loop_seconds += time.perf_counter() - started
            for k, record in records.items():
                MetricsWriter(group.lives[k].job).on_epoch_end(group.batch.heads[k])  # type: ignore[arg-type]
                reports[group.names[k]] = {"record": record}
            self._end_done(group, reports)
        self.groups = [g for g in self.groups if len(g.finished) < len(g.names)]
        return reports

    def busy(self) -> bool:
        return bool(self.groups or self.outcomes)

    def _end_done(self, group: _Group, reports: dict[str, dict[str, Any]]) -> None:
        """End the trials of `group` whose training ended: results, weights, job.json completed."""
        batch = group.batch
        for k, head in enumerate(batch.heads):
            if not head.done or k in group.finished:
                continue
            group.finished.add(k)
            life, name = group.lives[k], group.names[k]
            try:
                results, state = batch.finish(k)
                with atomic_output(life.job.checkpoint_dir / HEAD_WEIGHTS) as tmp:
                    save_file(state, str(tmp), metadata={"head": head.config.model.head})
                share = group.loop_seconds / len(group.names)
                life.timings.update(initialization=0.0, feature_cache=0.0, training_loop=share, finalization=0.0)
                life.timings["total"] = time.perf_counter() - group.started
                life.complete(results)
            except Exception as exc:
                outcome = self._end_failed(name, life, exc, traceback.format_exc())
            else:
                outcome = {"status": "completed", "epochs": results["epochs_run"], "stop_reason": head.stop_reason}
                outcome["seconds"] = life.timings["total"]
                outcome["own_seconds"] = share
            reports.setdefault(name, {})["outcome"] = outcome

    def _end_failed(self, name: str, life: JobLifecycle, exc: BaseException, trace: str) -> dict[str, Any]:
        life.fail(exc, trace)
        return {"status": "errored", "error": trace, "epochs": 0}

    def _fail_unstarted(self, name: str, raw: dict[str, Any], exc: BaseException, trace: str) -> None:
        """A trial whose job could not even be created (a bad config): still a failed job, with its error."""
        try:
            record = JobRecord(name=name, kind="training", config=raw)
            life = JobLifecycle.create(self.trials_dir, record, prefix="trial", must_push=False)
            life.begin()
            self.outcomes[name] = self._end_failed(name, life, exc, trace)
        except Exception:
            self.outcomes[name] = {"status": "errored", "error": trace, "epochs": 0}
