"""Evaluating a finished job's model bundle on a dataset split."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from imgtune.config import DataConfig, build_config
from imgtune.core.errors import DataError
from imgtune.core.io import cache_dir, now_iso
from imgtune.data.check import MAX_IMAGE_PIXELS, check_layout
from imgtune.data.dataset import ImageFileDataset, Sample, make_loader, prepare_data
from imgtune.data.folders import discover
from imgtune.data.sources import resolve_source
from imgtune.models.bundle import JOB_CONFIG_FILE, MANIFEST_FILE
from imgtune.runs.lifecycle import amend_job
from imgtune.serving.predictor import Predictor
from imgtune.storage.jobs import Job
from imgtune.training.metrics import PhaseMetrics


def _same_source(a: str, b: str) -> bool:
    if "://" in a or "://" in b:
        return a.rstrip("/") == b.rstrip("/")
    return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()


def _labelled_files(job_data: dict[str, Any], data_path: str, split: str, progress: bool) -> list[tuple[str, str, str]]:
    """(path, class id, sha1) of the usable images of `split` ('all' for every split).

    The job's own dataset is split exactly as in training (ratios, carving); any other dataset is taken
    as its folders say, with every class it has.
    """
    if _same_source(data_path, job_data["path"]):
        data = prepare_data(DataConfig(**job_data), progress=progress)
        chosen = data.splits if split == "all" else {split: data.splits.get(split)}
        if chosen.get(split, True) is None:
            raise DataError(f"the job's dataset has no {split} split (it has {', '.join(data.splits)})")
        return [(s.path, data.classes[s.label].id, s.sha1) for samples in chosen.values() for s in samples]
    root = resolve_source(data_path, progress=progress)
    report = check_layout(
        discover(root),
        max_pixels=job_data.get("max_image_pixels", MAX_IMAGE_PIXELS),
        cache_dir=cache_dir(),
        progress=progress,
    )
    if split != "all" and split not in report.good:
        raise DataError(
            f"{data_path} has no {split} split (it has {', '.join(report.good)})",
            "pick one with --split, or --split all",
        )
    chosen = report.good if split == "all" else {split: report.good[split]}
    return [(f.path, class_id, f.sha1) for per in chosen.values() for class_id, fs in per.items() for f in fs]


@torch.inference_mode()
def evaluate_job(
    job: str | Path,
    data_path: str,
    *,
    split: str = "test",
    workspace: str | Path | None = None,
    batch_size: int = 64,
    num_workers: int = -1,
    progress: bool = True,
    tta: bool | None = None,
) -> dict[str, Any]:
    """Top-1/top-5 accuracy, loss, per-class accuracy and confusion matrix of a job's model on a split.

    `split` is train, valid, test, or all. Images of classes the model does not know are left out and
    counted. `tta`: average each image's logits with its mirror image's (flip test-time augmentation); None:
    as the job evaluated itself (its `train.tta`). The result is also appended to the job's `evaluations` in
    job.json.
    """
    handle, model_dir, config = _model_and_config(job, workspace)
    if tta is None:
        tta = config.get("train", {}).get("tta") == "flip"
    model = config.get("model", {})
    backend = model.get("backend", model.get("inference", "auto"))  # `inference`: job configs of older imgtune
    predictor = Predictor.load(model_dir, backend=backend)
    bundle = predictor.bundle
    job_data = {**config["data"], "num_workers": num_workers}
    index_of = {c.id: i for i, c in enumerate(bundle.classes)}
    samples, unknown = [], 0
    for path, class_id, sha1 in _labelled_files(job_data, data_path, split, progress):
        if class_id in index_of:
            samples.append(Sample(path, index_of[class_id], sha1))
        else:
            unknown += 1
    if not samples:
        whose = handle.name if handle else model_dir
        raise DataError(f"none of the {split} images of {data_path} belong to classes the model of {whose} knows")
    loader = make_loader(
        ImageFileDataset(samples, bundle.preprocessing.eval_transform(), job_data.get("max_image_pixels")),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    metrics = PhaseMetrics(len(bundle.classes), confusion=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    for images, targets in loader:
        logits = predictor.backend(images)  # the fastest backend that agrees with fp32 eager, by default
        if tta:
            logits = (logits + predictor.backend(images.flip(-1))) / 2
        metrics.update(logits, targets, loss_fn(logits, targets))
    result = {
        "data": data_path,
        "split": split,
        "tta": "flip" if tta else "none",
        "evaluated": now_iso(),
        **metrics.summary(),
        "skipped_unknown_class": unknown,
        "per_class_accuracy": {c.id: a for c, a in zip(bundle.classes, metrics.per_class_accuracy(), strict=True)},
        "confusion_matrix": metrics.confusion.tolist(),
    }
    if handle is not None:
        amend_job(handle, appended={"evaluations": [result]})
    return result


def _model_and_config(job: str | Path, workspace: str | Path | None) -> tuple[Job | None, Path, dict[str, Any]]:
    """A job (its bundle and config), or a bundle that left its job (an MLflow model: its config beside it; the
    evaluation is then returned, with no job to record it in)."""
    bundle = Path(job)
    if (bundle / MANIFEST_FILE).is_file() and (bundle / JOB_CONFIG_FILE).is_file():
        config = json.loads((bundle / JOB_CONFIG_FILE).read_text())
        build_config(config, f"the config that came with the model at {bundle}")  # checked as a job's own
        return None, bundle, config
    handle = Job.open(job, workspace)
    return handle, handle.model_dir, handle.record().config or {}
