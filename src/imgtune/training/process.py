"""One training process's work in a job: data, model, loaders, Trainer, resume, fit, test, the plugins' hooks.

The job's life around it (status, timings, the plugins' job hooks, push) is `imgtune.runs`'s: this module
knows the plugin contract (imgtune.training.plugin), never a plugin.

The same function runs on each rank of a data-parallel job (`rank`, `world_size`, inside a process group that
imgtune.runs.distributed set up): every rank builds the same model and trains its share of each batch; rank 0
alone writes the job directory (job.json fields, metrics, log, best.pt, the plugins' rank-0 hooks); the
checkpoint goes wherever the caller's CheckpointStore keeps it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from imgtune.config import JobConfig
from imgtune.core.progress import console
from imgtune.storage.jobs import Job
from imgtune.training import memo
from imgtune.training.callbacks import Callback
from imgtune.training.compiled import CompiledTraining, compile_key
from imgtune.training.plugin import PluginSet, TrainingRun
from imgtune.training.recipe import freeze_batchnorm_statistics, make_optimizer, recipe_callbacks, schedules_per_step
from imgtune.training.setup import (
    amp_dtype,
    build_model,
    make_scheduler,
    resolve_device,
    seed_everything,
    setup_training,
)
from imgtune.training.standard_callbacks import (
    Checkpointer,
    CheckpointFile,
    CheckpointStore,
    EarlyStopping,
    MetricsWriter,
    ProgressBar,
    restore_checkpoint,
)
from imgtune.training.trainer import Trainer

LAST_CHECKPOINT = "last.pt"
BEST_CHECKPOINT = "best.pt"


def train_in_this_process(
    job: Job,
    config: JobConfig,
    plugins: PluginSet,
    *,
    resuming: bool,
    callbacks: list[Callback],
    progress: bool,
    timings: dict[str, float],
    started: float,
    on_finding: Callable[[str, Any], None] | None = None,
    rank: int = 0,
    world_size: int = 1,
    checkpoints: CheckpointStore | None = None,
    device: torch.device | None = None,
    feature_backend: str | None = None,
) -> dict[str, Any]:
    """Train `config` into `job` on this process; returns the results for job.json (and fills `timings`).
    `checkpoints`: where the checkpoint goes (default JOB/checkpoints/last.pt); `device`: default train.device;
    `feature_backend`: the backend cached features were computed with elsewhere (see setup_training)."""
    cfg = config.train
    writer = rank == 0
    seed_everything(cfg.seed, cfg.deterministic)
    device = device or resolve_device(cfg.device)
    data = memo.prepared_data(config.data, progress=progress)  # memo: off unless this process runs job after job
    model, backbone_fingerprint = memo.model(config, data.num_classes, build_model)
    if writer:
        job.update(dataset=data.summary())
        for problem in data.excluded:
            job.log(f"excluded {problem.path}: {problem.reason}")
        if model.weights_report:
            job.log(model.weights_report.summary())
            job.update(weights=model.weights_report.to_dict())
        _warn_about_a_frozen_random_backbone(job, config, progress)
    preprocessing = model.preprocessing(config.data.image_size)
    setup = setup_training(
        model, data, preprocessing, config, device, progress=progress, backbone_fingerprint=backbone_fingerprint,
        rank=rank, world_size=world_size, feature_backend=feature_backend,
    )  # fmt: skip
    timings["initialization"] = time.perf_counter() - started
    timings["feature_cache"] = setup.cache_seconds
    run = TrainingRun(
        job, config, data, model, preprocessing, setup, device, progress, rank, world_size, on_finding=on_finding
    )
    images = setup.mode == "images"
    module = setup.module.to(device)
    if images and cfg.channels_last:  # convolutions run faster on NHWC tensors (oneDNN, cuDNN)
        module.to(memory_format=torch.channels_last)
    if images and cfg.batchnorm == "frozen" and not model.backbone_frozen:
        layers = freeze_batchnorm_statistics(model)
        if writer:
            job.log(f"the backbone's batch-norm statistics stay as pretrained ({layers} layers)")
    optimizer = make_optimizer(module, cfg)
    has_valid = "valid" in setup.loaders
    stopper = EarlyStopping(
        cfg.early_stopping.metric,
        cfg.early_stopping.patience,
        cfg.early_stopping.min_delta,
        best_path=job.checkpoint_dir / BEST_CHECKPOINT,
        enabled=cfg.early_stopping.enabled and has_valid,
        save_best=writer,
    )
    checkpoints = checkpoints or CheckpointFile(job.checkpoint_dir / LAST_CHECKPOINT)
    amp = amp_dtype(cfg.mixed_precision, device, fine_tuning=images and not model.backbone_frozen)
    compiling = []
    if images and world_size == 1:
        key = compile_key(module, device, cfg.batch_size, config.data.image_size, amp, cfg.channels_last)
        first_trainable = cfg.head_only_epochs + 1 if not model.backbone_frozen else 1
        log = job.log if writer else None
        compiling.append(
            CompiledTraining(module, cfg.compile, key, cfg.batch_size, first_trainable_epoch=first_trainable, log=log)
        )
    trainer = Trainer(
        module,
        optimizer,
        setup.loaders,
        epochs=cfg.epochs,
        num_classes=data.num_classes,
        loss_fn=nn.CrossEntropyLoss(label_smoothing=cfg.label_smoothing),
        device=device,
        scheduler=None if schedules_per_step(cfg) else make_scheduler(optimizer, cfg),
        callbacks=[
            *compiling,
            *recipe_callbacks(module, cfg, data.num_classes, len(setup.loaders["train"]), images),
            *([MetricsWriter(job)] if writer else []),
            stopper,
            Checkpointer(checkpoints, run.class_ids),
            ProgressBar(progress and writer),
            *plugins.callbacks(run),
            *callbacks,
        ],
        amp_dtype=amp,
        channels_last=images and cfg.channels_last,
        seed=cfg.seed,
        log=job.log if writer else None,
        tta_flip=cfg.tta == "flip" and images,
    )
    start_epoch = 1
    state = checkpoints.load() if resuming else None
    if state is not None:
        start_epoch = restore_checkpoint(trainer, state, run.class_ids)
        if writer:
            job.truncate_metrics(start_epoch - 1)
            job.log(f"resumed after epoch {start_epoch - 1}")
    elif resuming:  # killed before its first epoch ended: start over
        if writer:
            job.truncate_metrics(0)
        plugins.call("on_start_over", run)
    if writer:
        job.update(
            training_mode=setup.mode,
            feature_backend=setup.feature_backend,
            feature_extraction=setup.extraction,  # did the backbone wait for data? (None: features from the cache)
            resumed_from_epoch=start_epoch - 1 if resuming else None,
        )
    loop_started = time.perf_counter()
    try:
        trainer.fit(start_epoch)
    except BaseException:
        plugins.call("on_fit_abort", run)
        raise
    timings["training_loop"] = timings.get("training_loop", 0.0) + time.perf_counter() - loop_started
    finalize_started = time.perf_counter()
    restored = cfg.early_stopping.restore_best and has_valid and stopper.restore_best(module, job.log)
    results: dict[str, Any] = {
        "epochs_run": len(trainer.history),
        "stop_reason": trainer.stop_reason,
        "best_epoch": stopper.best_epoch if has_valid else None,
        "restored_best": bool(restored),
        "best": _best_record(trainer.history, stopper.best_epoch if restored else None),
        "callback_failures": trainer.runner.failures,
    }
    if compiling:
        results["compile"] = compiling[0].summary
    if "test" in setup.loaders and cfg.evaluate_test:
        test = trainer.evaluate("test", confusion=True)
        results["test"] = {
            **test.summary(),
            "per_class_accuracy": {c.id: acc for c, acc in zip(data.classes, test.per_class_accuracy(), strict=True)},
            "confusion_matrix": test.confusion.tolist(),
        }
        if writer:
            job.log(f"test accuracy {test.accuracy:.4f} top-5 {test.top5:.4f} on {test.samples} images")
    module.cpu().to(memory_format=torch.contiguous_format)
    plugins.call("on_fit_end", run, results)
    timings["finalization"] = time.perf_counter() - finalize_started
    timings["total"] = time.perf_counter() - started
    return results


def _warn_about_a_frozen_random_backbone(job: Job, config: JobConfig, progress: bool) -> None:
    if config.model.pretrained != "none" or config.model.weights or config.model.freeze == "none":
        return
    warning = (
        f"the backbone has random weights and is frozen ({config.model.freeze}): its features carry little "
        "information and only the head learns; use --freeze none to train the whole network"
    )
    job.log(f"warning: {warning}")
    job.update(warnings=[warning])
    if progress:
        console.print(f"[yellow]warning:[/] {warning}", soft_wrap=True)


def _best_record(history: list[dict[str, Any]], best_epoch: int | None) -> dict[str, Any] | None:
    """The record of the epoch whose weights the model keeps: early stopping's best, else the last."""
    for record in history:
        if record["epoch"] == best_epoch:
            return record
    return history[-1] if history else None
