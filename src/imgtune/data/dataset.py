"""From a dataset path to checked, split, labelled samples and the loaders that feed them."""

from __future__ import annotations

import hashlib
import os
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset

from imgtune.config import DataConfig
from imgtune.data.check import CheckReport, FileInfo, FileProblem, Issue, check_layout
from imgtune.data.folders import ALL, SPLITS, ClassInfo, discover
from imgtune.data.sources import resolve_source
from imgtune.data.transforms import load_image
from imgtune.errors import DataError
from imgtune.jobs import cache_dir


@dataclass(frozen=True)
class Sample:
    path: str
    label: int
    sha1: str


@dataclass
class PreparedData:
    """Usable samples by split, the classes they use, and everything that was left out and why."""

    root: Path
    source: str
    classes: list[ClassInfo]
    splits: dict[str, list[Sample]]
    excluded: list[FileProblem]
    issues: list[Issue]
    notes: list[str] = field(default_factory=list)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def fingerprint(self, split: str) -> str:
        """Identifies a split's content and labels (not its paths), for cache keys."""
        digest = hashlib.sha256()
        for sample in self.splits.get(split, []):
            digest.update(f"{sample.sha1}:{self.classes[sample.label].id}\n".encode())
        return digest.hexdigest()

    def summary(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "root": str(self.root),
            "classes": [asdict(c) for c in self.classes],
            "images": {split: len(samples) for split, samples in self.splits.items()},
            "excluded_count": len(self.excluded),
            "excluded": [asdict(p) for p in self.excluded],
            "issues": [asdict(i) for i in self.issues],
            "notes": self.notes,
        }


def _split_by_ratios(
    infos: list[FileInfo], ratios: tuple[float, float, float], rng: random.Random
) -> dict[str, list[FileInfo]]:
    shuffled = sorted(infos, key=lambda f: (f.sha1, f.path))
    rng.shuffle(shuffled)
    n = len(shuffled)
    n_valid = round(n * ratios[1]) if n >= 3 else 0
    n_test = round(n * ratios[2]) if n >= 3 else 0
    n_valid, n_test = min(n_valid, max(0, n - 1)), min(n_test, max(0, n - 1 - n_valid))
    return {
        "valid": shuffled[:n_valid],
        "test": shuffled[n_valid : n_valid + n_test],
        "train": shuffled[n_valid + n_test :],
    }


def _carve(infos: list[FileInfo], fraction: float, rng: random.Random) -> tuple[list[FileInfo], list[FileInfo]]:
    shuffled = sorted(infos, key=lambda f: (f.sha1, f.path))
    rng.shuffle(shuffled)
    n = min(len(shuffled) - 1, max(1, round(len(shuffled) * fraction))) if len(shuffled) >= 2 else 0
    return shuffled[n:], shuffled[:n]


def split_report(report: CheckReport, cfg: DataConfig) -> tuple[dict[str, dict[str, list[FileInfo]]], list[str]]:
    """Per split and class, the usable files: split by ratios or carved as `cfg` says. Also notes."""
    notes: list[str] = []
    rng = random.Random(cfg.split_seed)
    if report.kind == "classes":
        out: dict[str, dict[str, list[FileInfo]]] = {s: {} for s in SPLITS}
        for class_id, infos in report.good[ALL].items():
            for split, part in _split_by_ratios(infos, cfg.split_ratios, rng).items():
                out[split][class_id] = part
        notes.append(
            "one folder per class: split train/valid/test by ratios "
            f"{'/'.join(str(r) for r in cfg.split_ratios)} with seed {cfg.split_seed}"
        )
        return {s: per for s, per in out.items() if any(per.values())}, notes
    out = {s: dict(per) for s, per in report.good.items()}
    for split in (s for s in ("valid", "test") if s not in out and "train" in out):
        if cfg.carve_missing:
            out[split] = {}
            for class_id, infos in out["train"].items():
                out["train"][class_id], out[split][class_id] = _carve(infos, cfg.carve_fraction, rng)
            notes.append(f"no {split} split: carved {cfg.carve_fraction:.0%} of train with seed {cfg.split_seed}")
        else:
            notes.append(f"no {split} split" + (": test evaluation skipped" if split == "test" else ""))
    return out, notes


def prepare_data(cfg: DataConfig, *, progress: bool = True, cache: Path | None = None) -> PreparedData:
    """Resolve, discover, check and split the dataset of `cfg`.

    Raises:
        DataError: the dataset cannot be trained on (no training images, fewer than two classes, ...).
    """
    cache = cache or cache_dir()
    root = resolve_source(cfg.path, cache=cache, progress=progress)
    layout = discover(root)
    report = check_layout(
        layout, max_pixels=cfg.max_image_pixels, cache_dir=cache, progress=progress, workers=_workers(cfg)
    )
    if report.fatal:
        errors = "; ".join(i.message for i in report.issues if i.severity == "error")
        raise DataError(f"dataset {cfg.path} cannot be trained on: {errors}", "run `imgtune data check` for details")
    per_split, notes = split_report(report, cfg)
    train_ids = [cid for cid, infos in per_split["train"].items() if infos]
    classes = [c for c in layout.classes if c.id in train_ids]
    label_of = {c.id: i for i, c in enumerate(classes)}
    excluded = list(report.problems)
    splits: dict[str, list[Sample]] = {}
    for split in (s for s in SPLITS if s in per_split):
        samples = []
        for class_id, infos in per_split[split].items():
            for info in infos:
                if class_id in label_of:
                    samples.append(Sample(info.path, label_of[class_id], info.sha1))
                else:
                    excluded.append(FileProblem(info.path, split, class_id, "class has no training images"))
        splits[split] = sorted(samples, key=lambda s: (s.label, s.path))
    return PreparedData(
        root=root,
        source=cfg.path,
        classes=classes,
        splits=splits,
        excluded=excluded,
        issues=report.issues,
        notes=notes,
    )


def _workers(cfg: DataConfig) -> int:
    return (os.cpu_count() or 1) if cfg.num_workers < 0 else cfg.num_workers


class ImageFileDataset(Dataset):
    """(image tensor, label) pairs from checked files."""

    def __init__(self, samples: list[Sample], transform: Callable):
        self.samples = samples
        self.transform = transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        return self.transform(load_image(sample.path)), sample.label


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int = 0,
    pin_memory: bool = False,
) -> DataLoader:
    """A DataLoader whose shuffle order depends only on `seed` (so a resumed epoch repeats it)."""
    generator = torch.Generator().manual_seed(seed)
    workers = (os.cpu_count() or 1) if num_workers < 0 else num_workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        num_workers=workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
