"""A training job from config to model bundle: data, model, feature cache, Trainer, test, bundle.

`run_training_job` is what `imgtune train` calls; tuning trials call it too.
"""

from __future__ import annotations

import platform
import random
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgtune.config import JobConfig, TrainConfig, build_config
from imgtune.core.errors import ConfigError, DataError, JobError
from imgtune.core.io import cache_dir, now_iso
from imgtune.core.version import __version__
from imgtune.data.dataset import ImageFileDataset, PreparedData, make_loader, prepare_data
from imgtune.data.sources import is_remote
from imgtune.data.transforms import Preprocessing
from imgtune.debugger.capture import DebuggerCallback
from imgtune.debugger.rules import make_rules
from imgtune.debugger.runner import RuleCallback, RuleRunner
from imgtune.models.bundle import save_bundle
from imgtune.models.factory import ImageClassifier, create_model
from imgtune.models.inference import known_path_name
from imgtune.profiler import ProfilerSession
from imgtune.storage.jobs import Job, push_interval, remote_url, workspace_dir
from imgtune.training.callbacks import Callback
from imgtune.training.feature_cache import (
    FeatureCache,
    FeatureLoader,
    backbone_path,
    extract_features,
    module_fingerprint,
)
from imgtune.training.standard_callbacks import (
    Checkpointer,
    EarlyStopping,
    MetricsWriter,
    ProgressBar,
    RemotePush,
    restore_checkpoint,
)
from imgtune.training.trainer import Trainer

LAST_CHECKPOINT = "last.pt"
FEATURE_BATCH_SIZE = 64
BEST_CHECKPOINT = "best.pt"


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r}", "use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device is cuda but no CUDA GPU is available", "use train.device=auto or cpu")
    return device


def amp_dtype(mode: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: bf16 where the GPU supports it, else fp16; off on CPU unless asked for."""
    if mode == "off" or (mode == "auto" and device.type != "cuda"):
        return None
    if mode == "fp16":
        return torch.float16
    if mode == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    if deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False


def versions() -> dict[str, str]:
    import torchvision

    return {
        "imgtune": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def make_optimizer(params: Iterable[nn.Parameter], cfg: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if not params:
        raise ConfigError("nothing to train: every parameter is frozen")
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer: torch.optim.Optimizer, cfg: TrainConfig) -> Any:
    if cfg.schedule == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg.epochs)
    if cfg.schedule == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=cfg.step_size, gamma=cfg.gamma)
    return None


@dataclass
class TrainingSetup:
    """What the Trainer trains: the whole model on images, or only the head on cached features."""

    module: nn.Module
    loaders: dict[str, Any]
    mode: str  # "features" | "images"
    cache_seconds: float = 0.0
    inference_path: str | None = None  # how the backbone's features were computed (imgtune.models.inference)
    extraction: dict[str, float] | None = None  # data wait vs backbone seconds, when features were computed


def build_model(config: JobConfig, num_classes: int) -> ImageClassifier:
    m = config.model
    return create_model(
        m.backbone,
        num_classes,
        m.head,
        m.freeze,
        pretrained=m.pretrained,
        weights=m.weights,
        head_hidden=m.head_hidden,
        dropout=m.dropout,
    )


def setup_training(
    model: ImageClassifier,
    data: PreparedData,
    preprocessing: Preprocessing,
    config: JobConfig,
    device: torch.device,
    *,
    progress: bool = True,
    cache_root: Path | None = None,
) -> TrainingSetup:
    """Loaders for each split; with a frozen backbone and the cache on, features instead of images."""
    cfg = config.train
    workers = config.data.num_workers
    labels = {s: torch.tensor([x.label for x in samples], dtype=torch.long) for s, samples in data.splits.items()}
    if model.backbone_frozen and cfg.feature_cache:
        started = time.perf_counter()
        cache = FeatureCache((cache_root or cache_dir()) / "features")
        backbone_fp = module_fingerprint(model.backbone, model.spec.backbone)
        size = preprocessing.image_size
        path: Any = None  # built on the first cache miss
        choice = config.model.inference
        path_name = known_path_name(model.backbone, choice, device, (3, size, size), fingerprint=backbone_fp)
        if path_name is None:  # auto, never measured on this device: measure now
            path, _ = backbone_path(
                model.backbone, backbone_fp, data.splits["train"], preprocessing.eval_transform(), device,
                choice, cache_root or cache_dir(),
            )  # fmt: skip
            path_name = path.name
        loaders: dict[str, Any] = {}
        extraction: dict[str, float] = {}
        for split, samples in data.splits.items():
            views = [0] + (list(range(1, cfg.augment_views + 1)) if split == "train" else [])
            tensors = []
            for view in views:
                # An augmented view's random stream depends on the seed and on how samples meet workers.
                view_id = "eval" if view == 0 else f"augment-{view}-seed-{cfg.seed}-workers-{workers}"
                key = cache.key(backbone_fp, preprocessing, data.fingerprint(split), view_id, path_name)
                features = cache.load(key)
                if features is None or features.shape[0] != len(samples):
                    transform = preprocessing.eval_transform() if view == 0 else preprocessing.train_transform()
                    if path is None:
                        path, _ = backbone_path(
                            model.backbone, backbone_fp, samples, preprocessing.eval_transform(), device,
                            path_name, cache_root or cache_dir(),
                        )  # fmt: skip
                    features = extract_features(
                        path,
                        samples,
                        transform,
                        device=device,
                        batch_size=FEATURE_BATCH_SIZE,
                        num_workers=workers,
                        max_pixels=config.data.max_image_pixels,
                        seed=cfg.seed * 1000 + view,
                        progress=progress,
                        description=f"features {split}" + (f" view {view}" if view else ""),
                        stats=extraction,
                    )
                    cache.store(key, features, {"backbone": model.spec.backbone, "split": split, "view": str(view)})
                tensors.append(features)
            loaders[split] = FeatureLoader(
                torch.stack(tensors), labels[split], cfg.batch_size, shuffle=split == "train"
            )
        model.backbone.cpu()
        if extraction:
            busy = extraction["data_wait_seconds"] + extraction["backbone_seconds"]
            extraction["data_wait_fraction"] = extraction["data_wait_seconds"] / busy if busy else 0.0
            extraction["images_per_second"] = extraction["images"] / busy if busy else 0.0
        seconds = time.perf_counter() - started
        return TrainingSetup(model.head, loaders, "features", seconds, path_name, extraction or None)
    loaders = {}
    for split, samples in data.splits.items():
        transform = preprocessing.train_transform() if split == "train" else preprocessing.eval_transform()
        loaders[split] = make_loader(
            ImageFileDataset(samples, transform, config.data.max_image_pixels),
            batch_size=cfg.batch_size,
            shuffle=split == "train",
            num_workers=workers,
            seed=cfg.seed,
            pin_memory=device.type == "cuda",
        )
    return TrainingSetup(model, loaders, "images")


def warm_feature_cache(config: JobConfig, *, progress: bool = True) -> bool:
    """Compute (or find) the feature cache a job with `config` would use, without training; False when the job
    would train on images. Tuning jobs call this once, so that all trials share one cache."""
    if config.model.freeze != "backbone" or not config.train.feature_cache:
        return False
    data = prepare_data(config.data, progress=progress)
    model = build_model(config, data.num_classes)
    preprocessing = model.preprocessing(config.data.image_size)
    setup_training(model, data, preprocessing, config, resolve_device(config.train.device), progress=progress)
    return True


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
) -> Job:
    """Run a training job to the end and return its directory.

    Args:
        config: the job; ignored when resuming (the job's own config is used).
        workspace: where jobs live (default ./imgtune-runs or $IMGTUNE_WORKSPACE).
        resume: a job name or path to continue from its last checkpoint.
        callbacks: extra Trainer callbacks (debugger, profiler, tuning reporters).
        progress: show progress bars.
        on_finding: called with (rule name, Finding) whenever a debugger rule finds an issue.
        force: resume a job recorded as running on another machine (that machine is gone).
        must_push: in an s3:// workspace, a job that succeeded but could not be pushed at its end raises
            (a tuning trial does not: its tuning job pushes it again at the end).
    """
    if resume is not None:
        job = Job.open(resume, workspace)
        record = job.read()
        status = job.status()
        if status == "completed":
            raise JobError(f"job {job.name} has already completed", "start a new job instead")
        check_resumable(job, force)
        config = build_config(record["config"], f"config of job {job.name}")
        job.log("resuming")
    else:
        if config is None:
            raise ConfigError("run_training_job needs a config or a job to resume")
        if not is_remote(config.data.path) and not Path(config.data.path).expanduser().is_dir():
            raise DataError(f"dataset folder not found: {config.data.path}", "check the path given to --data")
        if config.debugger.enabled:  # unknown rules or parameters: refuse before a job directory exists
            make_rules(config.debugger.rules, config.debugger.rule_parameters, config.debugger.rule_files)
        if remote_url(workspace_dir(workspace)) is not None:
            push_interval()  # a bad IMGTUNE_PUSH_INTERVAL: refuse before a job directory exists
        job = Job.create(workspace, config.name, prefix=config.model.backbone)
        record = {
            "name": job.name,
            "kind": "training",
            "created": now_iso(),
            "config": config.model_dump(mode="json"),
        }
        job.write(record)
    started = time.perf_counter()
    timings: dict[str, float] = dict(record.get("timings", {}))
    job.update(status="running", versions=versions(), started=now_iso(), error=None)
    job.mark_running()
    profiler = ProfilerSession(job, config.profiler).start() if config.profiler.enabled else None
    try:
        summary = _run(
            job, config, resume is not None, list(callbacks), progress, timings, started, on_finding, profiler
        )
    except KeyboardInterrupt:
        job.update(status="stopped", error="interrupted by the user", timings=timings)
        job.log("stopped by the user")
        _end(job, config, profiler, must_push=False)
        raise
    except Exception as exc:
        job.update(status="failed", error=f"{type(exc).__name__}: {exc}", timings=timings)
        job.log(f"failed: {type(exc).__name__}: {exc}")
        _end(job, config, profiler, must_push=False)
        raise
    job.update(status="completed", finished=now_iso(), timings=timings, **summary)
    job.log("completed")
    _end(job, config, profiler, must_push=must_push)
    return job


def check_resumable(job: Job, force: bool = False) -> None:
    """Refuse to resume a job that is still running. A job recorded as running on another machine (the
    bucket says so, and no process of this one can tell) is resumed only with `force`."""
    record = job.read()
    if job.status() != "running":
        return
    host = record.get("host")
    if host and host != socket.gethostname():
        if force:
            job.log(f"resumed with --force: it was recorded as running on {host}")
            return
        raise JobError(
            f"job {job.name} is recorded as running on {host} (pid {record.get('pid')}, last update "
            f"{record.get('updated')})",
            f"if {host} is gone or the job died there, resume it with --force",
        )
    raise JobError(f"job {job.name} is still running (pid {record.get('pid')})", "wait for it or stop it first")


def _end(job: Job, config: JobConfig, profiler: ProfilerSession | None, must_push: bool) -> None:
    """Whatever way the job ended: stop the profiler, evaluate its rules, write the report, push the job to its
    remote workspace. Only a failed push with `must_push` raises: a failure in the rest is logged, and never
    hides the job's own outcome."""
    try:
        if profiler is not None:
            job.update(profiler=profiler.finish())
        if config.profiler.report:
            from imgtune.report import write_report

            started = time.perf_counter()
            path = write_report(job)
            seconds = time.perf_counter() - started
            job.update(timings={**job.read().get("timings", {}), "report": seconds})
            job.log(f"report written to {path} in {seconds:.2f} s")
    except Exception as exc:  # the job's result stands; the report can be made again with `imgtune report`
        job.log(f"profiler/report failed: {type(exc).__name__}: {exc}")
    job.push(strict=must_push)


def _run(
    job: Job,
    config: JobConfig,
    resuming: bool,
    extra: list[Callback],
    progress: bool,
    timings: dict[str, float],
    started: float,
    on_finding: Callable[[str, Any], None] | None = None,
    profiler: ProfilerSession | None = None,
) -> dict[str, Any]:
    cfg = config.train
    debug = config.debugger
    rules = make_rules(debug.rules, debug.rule_parameters, debug.rule_files) if debug.enabled else []
    seed_everything(cfg.seed, cfg.deterministic)
    device = resolve_device(cfg.device)
    data = prepare_data(config.data, progress=progress)
    job.update(dataset=data.summary())
    for problem in data.excluded:
        job.log(f"excluded {problem.path}: {problem.reason}")
    model = build_model(config, data.num_classes)
    if model.weights_report:
        job.log(model.weights_report.summary())
        job.update(weights=model.weights_report.to_dict())
    if config.model.pretrained == "none" and not config.model.weights and config.model.freeze != "none":
        warning = (
            f"the backbone has random weights and is frozen ({config.model.freeze}): its features carry little "
            "information and only the head learns; use --freeze none to train the whole network"
        )
        job.log(f"warning: {warning}")
        job.update(warnings=[warning])
        if progress:
            from imgtune.core.progress import console

            console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)
    preprocessing = model.preprocessing(config.data.image_size)
    setup = setup_training(model, data, preprocessing, config, device, progress=progress)
    timings["initialization"] = time.perf_counter() - started
    timings["feature_cache"] = setup.cache_seconds
    module = setup.module.to(device)
    optimizer = make_optimizer(module.parameters(), cfg)
    has_valid = "valid" in setup.loaders
    stopper = EarlyStopping(
        cfg.early_stopping.metric,
        cfg.early_stopping.patience,
        cfg.early_stopping.min_delta,
        best_path=job.checkpoint_dir / BEST_CHECKPOINT,
        enabled=cfg.early_stopping.enabled and has_valid,
    )
    debugger = rule_callback = None
    if debug.enabled:
        debugger = DebuggerCallback(
            job.path / "debugger",
            debug,
            prefix="head." if setup.mode == "features" else "",
            requirements=[req for rule in rules for req in rule.requirements()],
        )
        runner = RuleRunner(rules, stop_on=debug.stop_on, on_finding=on_finding, log=job.log)
        rule_callback = RuleCallback(runner, lambda: debugger.trial, job.path / "debugger")
        extra = [debugger, rule_callback, *extra]
    if profiler is not None:
        train_loader = setup.loaders["train"]
        meta = {
            "training_mode": setup.mode,
            "batch_size": cfg.batch_size,
            "num_workers": getattr(train_loader, "num_workers", 0),
            "pin_memory": bool(getattr(train_loader, "pin_memory", False)),
        }
        extra = [*extra, profiler.callback(meta)]
    callbacks: list[Callback] = [
        MetricsWriter(job),
        stopper,
        Checkpointer(job.checkpoint_dir / LAST_CHECKPOINT, [c.id for c in data.classes]),
        ProgressBar(progress),
        *extra,
    ]
    if job.remote is not None:
        callbacks.append(RemotePush(job))
    trainer = Trainer(
        module,
        optimizer,
        setup.loaders,
        epochs=cfg.epochs,
        num_classes=data.num_classes,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        device=device,
        scheduler=make_scheduler(optimizer, cfg),
        callbacks=callbacks,
        amp_dtype=amp_dtype(cfg.mixed_precision, device),
        seed=cfg.seed,
        log=job.log,
    )
    start_epoch = 1
    last = job.checkpoint_dir / LAST_CHECKPOINT
    if resuming and last.exists():
        start_epoch = restore_checkpoint(trainer, last, [c.id for c in data.classes])
        job.truncate_metrics(start_epoch - 1)
        job.log(f"resumed after epoch {start_epoch - 1}")
    elif resuming:  # killed before its first epoch ended: start over
        job.truncate_metrics(0)
        if debugger is not None:
            debugger.writer.truncate_after(-1)
    job.update(
        training_mode=setup.mode,
        feature_path=setup.inference_path,
        feature_extraction=setup.extraction,  # did the backbone wait for data? (None: features from the cache)
        resumed_from_epoch=start_epoch - 1 if resuming else None,
    )
    loop_started = time.perf_counter()
    try:
        trainer.fit(start_epoch)
    except BaseException:
        if rule_callback is not None:  # stop the watchdog and release the store and hooks of a failed job
            rule_callback.close()
            debugger.close()
        raise
    timings["training_loop"] = timings.get("training_loop", 0.0) + time.perf_counter() - loop_started
    finalize_started = time.perf_counter()
    restored = cfg.early_stopping.restore_best and has_valid and stopper.restore_best(module)
    results: dict[str, Any] = {
        "epochs_run": len(trainer.history),
        "stop_reason": trainer.stop_reason,
        "best_epoch": stopper.best_epoch if has_valid else None,
        "restored_best": bool(restored),
        "best": _best_record(trainer.history, stopper.best_epoch if restored else None),
        "callback_failures": trainer.runner.failures,
    }
    if "test" in setup.loaders and cfg.evaluate_test:
        test = trainer.evaluate("test", confusion=True)
        results["test"] = {
            **test.summary(),
            "per_class_accuracy": {c.id: acc for c, acc in zip(data.classes, test.per_class_accuracy(), strict=True)},
            "confusion_matrix": test.confusion.tolist(),
        }
        job.log(f"test accuracy {test.accuracy:.4f} top-5 {test.top5:.4f} on {test.samples} images")
    if rule_callback is not None:
        rule_results = rule_callback.finish()
        debugger.close()
        results["debugger"] = {
            name: {"status": r["status"], "findings": r["finding_count"]} for name, r in rule_results.items()
        }
    module.cpu()
    save_bundle(
        model.cpu(),
        data.classes,
        preprocessing,
        job.model_dir,
        extra={
            "job": job.name,
            "metrics": {"test": results.get("test", {}).get("accuracy"), "best": results["best"]},
        },
    )
    timings["finalization"] = time.perf_counter() - finalize_started
    timings["total"] = time.perf_counter() - started
    return results


def _best_record(history: list[dict[str, Any]], best_epoch: int | None) -> dict[str, Any] | None:
    """The record of the epoch whose weights the model keeps: early stopping's best, else the last."""
    for record in history:
        if record["epoch"] == best_epoch:
            return record
    return history[-1] if history else None
