"""One training job on N data-parallel workers: Ray Train's TorchTrainer (DDP; gloo on CPU, NCCL on GPU).

The job's own process (the driver) keeps the job's lifecycle (lock, status, plugins' job hooks, push) and
starts a TorchTrainer; each worker runs `imgtune.training.process.train_in_this_process` as one rank. Rank 0
writes the job directory, which every worker reaches at the same path (one machine, or a path every node
mounts). What goes where:

* checkpoints: each epoch's end, through Ray Train's checkpoint API (`ray.train.report`), into
  JOB/ray-train/ (Ray's run folder: its checkpoints and its run snapshot, plain JSON). When a worker dies, Ray
  Train restarts the group (`FailureConfig(max_failures)`) and every rank continues from the latest checkpoint;
  `imgtune train --resume` starts a TorchTrainer on the same run folder, which finds the same checkpoint.
* the results: rank 0's last report carries them (and a results.json checkpoint), read by the driver.
* progress: the driver follows metrics.jsonl, shows the epochs and calls its own callbacks' `on_epoch_end` (a
  tuning trial's reporter); a stop one of them asks for reaches the workers through a file in the job
  (STOP_REQUEST), which rank 0 reads after each batch and all ranks agree on.

Head training on cached features (a frozen backbone) is not data-parallel: the workers build the feature cache
together, each a shard of the files, and the job's own process then trains the head on it (`head_trained_on`).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgtune.config import JobConfig, build_config
from imgtune.core.errors import JobError
from imgtune.core.progress import progress_bar
from imgtune.runs.lifecycle import JobLifecycle
from imgtune.runs.plugins import training_plugins
from imgtune.storage.jobs import Job, push_interval
from imgtune.training import distributed
from imgtune.training.callbacks import Callback, StopTraining
from imgtune.training.plugin import PluginSet
from imgtune.training.standard_callbacks import load_checkpoint

RUN_FOLDER = "ray-train"  # JOB/ray-train: Ray Train's checkpoints and run snapshot
FEATURES_RUN_FOLDER = "ray-train-features"  # the same for the workers that build a feature cache
STOP_REQUEST = "stop-request.txt"  # JOB/checkpoints/stop-request.txt: the driver asks the workers to stop
LAST_CHECKPOINT = "last.pt"
RESULTS_FILE = "results.json"
FOLLOW_SECONDS = 0.5
STOP_GRACE_SECONDS = 60.0  # how long a failed driver waits for its workers to stop


def train_on_workers(
    life: JobLifecycle,
    config: JobConfig,
    *,
    ray_address: str | None = None,
    callbacks: list[Callback] = (),
    progress: bool = True,
) -> dict[str, Any]:
    """Train `config` on `config.train.workers` Ray Train workers; returns the job's results (rank 0's)."""
    job = life.job
    stop_request = job.checkpoint_dir / STOP_REQUEST
    job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    stop_request.unlink(missing_ok=True)

    def follow(fit: threading.Thread) -> None:
        _follow(job, config.train.epochs, fit, stop_request, list(callbacks), progress)

    return _run_workers(life, config, ray_address, _train_on_this_worker, RUN_FOLDER, follow)


def build_features_on_workers(
    life: JobLifecycle, config: JobConfig, *, ray_address: str | None = None, progress: bool = True
) -> dict[str, Any]:
    """Compute the feature cache a frozen-backbone job needs on `config.train.workers` Ray Train workers, each a
    shard of the files; returns the backend they used (`feature_backend`) and what they computed."""

    def follow(fit: threading.Thread) -> None:
        from imgtune.core.progress import console

        with console.status(f"feature cache on {config.train.workers} workers", spinner="dots") as status:
            while fit.is_alive():
                status.update(f"feature cache on {_workers_label(life.job)}")
                fit.join(FOLLOW_SECONDS)

    return _run_workers(life, config, ray_address, _features_on_this_worker, FEATURES_RUN_FOLDER, follow)


def _run_workers(
    life: JobLifecycle,
    config: JobConfig,
    ray_address: str | None,
    body: Callable[[dict[str, Any]], None],
    run_folder: str,
    follow: Callable[[threading.Thread], None],
) -> dict[str, Any]:
    """Run `body` on the job's Ray Train workers (TorchTrainer.fit in a thread, `follow` in this one); returns
    rank 0's results and adds the workers' timings to the job's."""
    from imgtune.tuning import connect  # first: it keeps Ray on loopback unless told of a cluster

    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig  # isort: skip
    from ray.train.torch import TorchConfig, TorchTrainer  # isort: skip

    job, cfg = life.job, config.train
    connect(ray_address)
    use_gpu = cfg.gpus_per_worker > 0
    resources = {"CPU": cfg.cpus_per_worker, **({"GPU": cfg.gpus_per_worker} if use_gpu else {})}
    trainer = TorchTrainer(
        body,
        train_loop_config={
            "job": str(job.path),
            "config": config.model_dump(mode="json"),
            "resumed": life.resumed,
            "timings": dict(life.timings),
        },
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_folder,
            storage_path=str(job.path),
            failure_config=FailureConfig(max_failures=cfg.max_failures),
            # the last epoch's checkpoint and the final results.json (kept: a resumed job that ended reads it)
            checkpoint_config=CheckpointConfig(num_to_keep=2),
        ),
    )
    started = time.perf_counter()
    outcome = _Outcome()
    fit = threading.Thread(target=outcome.capture, args=(trainer.fit,), name="imgtune-ray-train", daemon=True)
    fit.start()
    try:
        follow(fit)
    except BaseException:
        _stop_workers(job, fit)
        raise
    fit.join()
    result = outcome.value()
    life.timings[run_folder.replace("-", "_")] = time.perf_counter() - started
    metrics = result.metrics or {}
    if "results" not in metrics:
        raise JobError(f"the workers of job {job.name} ended without results", f"see {job.log_file}")
    life.timings.update(metrics.get("timings", {}))
    life.plugins.failures.extend(metrics.get("plugin_failures", []))
    return metrics["results"]


def _stop_workers(job: Job, fit: threading.Thread) -> None:
    """The driver failed (a callback raised, Ctrl-C): ask the workers to stop, so that they do not train on
    into a job that has ended (in a process that lives on: a notebook, a reused tuning actor). Training workers
    stop after their current batch; feature-cache workers finish their shard. Waits a little, except on Ctrl-C."""
    job.checkpoint_dir.mkdir(parents=True, exist_ok=True)
    (job.checkpoint_dir / STOP_REQUEST).write_text("the job's own process failed")
    job.log("the job's own process failed: asked its workers to stop")
    if not isinstance(sys.exc_info()[1], KeyboardInterrupt):
        fit.join(STOP_GRACE_SECONDS)


@dataclass
class _Outcome:
    """What the thread running TorchTrainer.fit returned or raised."""

    result: Any = None
    error: BaseException | None = None

    def capture(self, fit: Callable[[], Any]) -> None:
        try:
            self.result = fit()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the job's own thread by value()
            self.error = exc

    def value(self) -> Any:
        if self.error is not None:
            raise JobError(f"training on the workers failed: {_first_line(self.error)}", _hint(self.error)) from (
                self.error
            )
        return self.result


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    lines = [line for line in text.splitlines() if line.strip()]
    errors = [line for line in lines if "Error" in line and "Traceback" not in line]
    return (errors[-1] if errors else lines[0]).strip()


def _hint(error: BaseException) -> str:
    return "the job's log (logs.txt) and Ray's worker logs (/tmp/ray/session_latest/logs) say more"


@dataclass
class EpochEnd:
    """What the driver's callbacks see at each epoch's end (the Trainer runs on the workers)."""

    epoch_record: dict[str, Any]
    epoch: int
    epochs: int


def _follow(
    job: Job,
    epochs: int,
    fit: threading.Thread,
    stop_request: Path,
    callbacks: list[Callback],
    progress: bool,
) -> None:
    """Until `fit` ends: show the epochs rank 0 records, give each to `callbacks`, push the job every push
    interval (a remote workspace), and pass a stop one of the callbacks asks for on to the workers."""
    seen = len(job.read_metrics()) if job.metrics_file.exists() else 0
    delivered = seen  # the last epoch given to `callbacks`: an epoch redone after a restart is not given twice
    bar = progress_bar(enabled=progress)
    with bar:
        task = bar.add_task(f"epochs on {_workers_label(job)}", total=epochs, completed=seen, info="")
        while True:
            running = fit.is_alive()
            records = job.read_metrics() if job.metrics_file.exists() else []
            if len(records) < seen:  # the workers restarted from a checkpoint and dropped later epochs
                seen = len(records)
            for record in records[seen:]:
                info = f"train acc {record['train_accuracy']:.3f}"
                if "valid_accuracy" in record:
                    info += f" valid acc {record['valid_accuracy']:.3f} loss {record['valid_loss']:.4f}"
                bar.update(task, completed=record["epoch"], info=info, description=f"epochs on {_workers_label(job)}")
                if record["epoch"] <= delivered:
                    continue
                delivered = record["epoch"]
                for callback in callbacks:
                    handler = getattr(callback, "on_epoch_end", None)
                    try:
                        if handler is not None:
                            handler(EpochEnd(record, record["epoch"], epochs))
                    except StopTraining as stop:
                        if not stop_request.exists():
                            stop_request.write_text(stop.reason)
            seen = max(seen, len(records))
            job.push(min_interval=push_interval(), strict=False)
            if not running:
                return
            fit.join(FOLLOW_SECONDS)


def _workers_label(job: Job) -> str:
    workers = job.record().workers or []
    nodes = {w.get("node") for w in workers}
    if not workers:
        return "workers (starting)"
    return f"{len(workers)} workers" + (f" on {len(nodes)} nodes" if len(nodes) > 1 else "")


# -- on each worker ----------------------------------------------------------------------------------------


class RayTrainCheckpoints:
    """A worker's CheckpointStore: rank 0 writes the checkpoint into a temporary folder and hands it to Ray
    Train, which keeps it in JOB/ray-train; every rank reports (Ray Train's report is collective)."""

    def __init__(self, rank: int):
        self.rank = rank

    def save(self, state: dict[str, Any], epoch_record: dict[str, Any]) -> None:
        from imgtune.training.standard_callbacks import atomic_torch_save

        epoch = int(epoch_record["epoch"])
        self.report({"epoch": epoch}, lambda folder: atomic_torch_save(state, folder / LAST_CHECKPOINT))

    def report(self, metrics: dict[str, Any], write: Callable[[Path], None]) -> None:
        import ray.train

        if self.rank != 0:
            ray.train.report(metrics)
            return
        folder = Path(tempfile.mkdtemp(prefix="imgtune-checkpoint-"))
        try:
            write(folder)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(str(folder)))
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def report_results(self, results: dict[str, Any], **extra: Any) -> None:
        """Hand rank 0's results to the job's process, in the report's metrics and a results.json checkpoint."""
        self.report(
            {"results": results, **extra}, lambda folder: (folder / RESULTS_FILE).write_text(json.dumps(results))
        )

    def _folder(self) -> Path | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        return Path(checkpoint.path) if checkpoint is not None else None

    def load(self) -> dict[str, Any] | None:
        folder = self._folder()
        if folder is None or not (folder / LAST_CHECKPOINT).is_file():
            return None
        return load_checkpoint(folder / LAST_CHECKPOINT)

    def final_results(self) -> dict[str, Any] | None:
        """The results of a run whose workers had finished (its driver died before it read them)."""
        folder = self._folder()
        if folder is None or not (folder / RESULTS_FILE).is_file():
            return None
        return json.loads((folder / RESULTS_FILE).read_text())


class StopRequestFile(Callback):
    """Rank 0 reads the driver's stop request after each batch; the Trainer makes every rank agree on it."""

    order = 5

    def __init__(self, path: Path):
        self.path = path

    def on_batch_end(self, trainer: Any) -> None:
        if trainer.phase == "train" and self.path.exists():
            raise StopTraining(self.path.read_text().strip() or "stop requested by the job's process")


@dataclass
class _Worker:
    """One rank of the job, as its worker process sees it."""

    rank: int
    world_size: int
    job: Job
    config: JobConfig
    device: Any
    store: RayTrainCheckpoints
    record: Any  # the job's JobRecord when the workers started
    started: float

    @classmethod
    def start(cls, loop_config: dict[str, Any]) -> _Worker:
        """Where am I, the job (its directory must be here), the config; rank 0 records where every rank runs."""
        import ray
        import ray.train
        import ray.train.torch
        import torch

        started = time.perf_counter()
        context = ray.train.get_context()
        rank, world_size = context.get_world_rank(), context.get_world_size()
        node = ray.util.get_node_ip_address()
        job = Job(Path(loop_config["job"]), pushes=False)
        if not job.job_file.is_file():
            raise JobError(
                f"job directory {job.path} not found on node {node}",
                "a data-parallel job's workers write into the job's directory where its process has it: put the "
                "workspace (and the data, and IMGTUNE_CACHE) on a path every node mounts, or train on one node",
            )
        config = build_config(rank_defaults(loop_config["config"]), f"config of job {job.name}")
        cfg = config.train
        torch.set_num_threads(max(1, int(cfg.cpus_per_worker)))
        device = ray.train.torch.get_device() if cfg.gpus_per_worker > 0 else torch.device("cpu")
        where = {"rank": rank, "node": node, "host": socket.gethostname(), "pid": os.getpid(), "device": str(device)}
        record = job.record()  # before the gather: rank 0 updates it once every rank has read it
        everyone = distributed.gather_objects(where)
        worker = cls(rank, world_size, job, config, device, RayTrainCheckpoints(rank), record, started)
        if rank == 0:
            job.update(world_size=world_size, workers=everyone, worker_starts=(record.worker_starts or 0) + 1)
            job.log(
                f"{'restarted' if record.worker_starts else 'started'} {world_size} workers: "
                + ", ".join(f"rank {w['rank']} on {w['node']} (pid {w['pid']}, {w['device']})" for w in everyone)
            )
        return worker

    def finish(self, results: dict[str, Any], **extra: Any) -> None:
        self.store.report_results(results, **extra)


def rank_defaults(raw: dict[str, Any]) -> dict[str, Any]:
    """A rank's config: `data.num_workers: -1` (one loader process per core) becomes one per core of the rank's
    share (`train.cpus_per_worker`), so ranks sharing a node do not each start a loader process per core."""
    from imgtune.core.resources import default_workers

    data, train = raw.get("data", {}), raw.get("train", {})
    if data.get("num_workers", -1) >= 0:
        return raw
    share = max(1, int(float(train.get("cpus_per_worker", 1))))
    return {**raw, "data": {**data, "num_workers": min(default_workers(), share)}}


def _train_on_this_worker(loop_config: dict[str, Any]) -> None:
    """The body of each Ray Train worker of a training job: one rank of it."""
    from imgtune.training.process import train_in_this_process

    if _reported_before():
        return
    worker = _Worker.start(loop_config)
    job, config, rank = worker.job, worker.config, worker.rank
    # A restart (after a failed worker, or of a resumed job) continues; a first start starts clean.
    resuming = bool(loop_config["resumed"] or worker.record.worker_starts or worker.store.load() is not None)
    plugins = PluginSet(training_plugins(config), rank=rank, log=job.log if rank == 0 else None)
    timings: dict[str, float] = dict(loop_config["timings"])
    results = train_in_this_process(
        job,
        config,
        plugins,
        resuming=resuming,
        callbacks=[StopRequestFile(job.checkpoint_dir / STOP_REQUEST)] if rank == 0 else [],
        progress=False,
        timings=timings,
        started=worker.started,
        rank=rank,
        world_size=worker.world_size,
        checkpoints=worker.store,
        device=worker.device,
    )
    worker.finish(results, timings=timings, plugin_failures=plugins.failures)


def _features_on_this_worker(loop_config: dict[str, Any]) -> None:
    """The body of each Ray Train worker building a frozen-backbone job's feature cache: its shard of the files."""
    from imgtune.training import memo
    from imgtune.training.setup import build_feature_cache_on_ranks, build_model

    if _reported_before():
        return
    worker = _Worker.start(loop_config)
    config = worker.config
    data = memo.prepared_data(config.data, progress=False)
    model, fingerprint = memo.model(config, data.num_classes, build_model)
    preprocessing = model.preprocessing(config.data.image_size)
    results = build_feature_cache_on_ranks(
        model, data, preprocessing, config, worker.device,
        rank=worker.rank, world_size=worker.world_size, backbone_fingerprint=fingerprint,
    )  # fmt: skip
    worker.finish(results, timings={"feature_cache_on_workers": time.perf_counter() - worker.started})


def _reported_before() -> bool:
    """True when this run's workers had finished (the job's process died before it read their results): their
    results are reported again, for the job's process to read, and there is nothing else to do."""
    import ray.train

    store = RayTrainCheckpoints(ray.train.get_context().get_world_rank())
    results = store.final_results()
    if results is None:
        return False
    store.report_results(results)
    return True
