"""Evaluating a finished job's model bundle on a dataset split."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from imgtune.config import DataConfig
from imgtune.data.dataset import ImageFileDataset, Sample, make_loader, prepare_data
from imgtune.errors import DataError
from imgtune.jobs import Job, now_iso
from imgtune.serving.bundle import load_bundle
from imgtune.training.metrics import PhaseMetrics


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
) -> dict[str, Any]:
    """Top-1/top-5 accuracy, loss, per-class accuracy and confusion matrix of a job's model on a split.

    Classes of the dataset that the model does not know are left out and counted. The result is also
    appended to the job's `evaluations` in job.json.
    """
    handle = Job.open(job, workspace)
    bundle = load_bundle(handle.model_dir)
    data = prepare_data(DataConfig(path=data_path, num_workers=num_workers), progress=progress)
    if split not in data.splits:
        raise DataError(f"{data_path} has no {split} split (it has {', '.join(data.splits)})", "pick one with --split")
    index_of = {c.id: i for i, c in enumerate(bundle.classes)}
    samples, unknown = [], 0
    for s in data.splits[split]:
        class_id = data.classes[s.label].id
        if class_id in index_of:
            samples.append(Sample(s.path, index_of[class_id], s.sha1))
        else:
            unknown += 1
    if not samples:
        raise DataError(f"none of the {split} images belong to classes the model of {handle.name} knows")
    loader = make_loader(
        ImageFileDataset(samples, bundle.preprocessing.eval_transform()),
        batch_size=batch_size,
        shuffle=False,
        num_workers=num_workers,
    )
    metrics = PhaseMetrics(len(bundle.classes), confusion=True)
    loss_fn = torch.nn.CrossEntropyLoss()
    model = bundle.model.eval()
    for images, targets in loader:
        logits = model(images.contiguous(memory_format=torch.channels_last))
        metrics.update(logits, targets, loss_fn(logits, targets))
    result = {
        "data": data_path,
        "split": split,
        "evaluated": now_iso(),
        **metrics.summary(),
        "skipped_unknown_class": unknown,
        "excluded_files": len(data.excluded),
        "per_class_accuracy": {c.id: a for c, a in zip(bundle.classes, metrics.per_class_accuracy(), strict=True)},
        "confusion_matrix": metrics.confusion.tolist(),
    }
    record = handle.read()
    handle.update(evaluations=[*record.get("evaluations", []), result])
    return result
