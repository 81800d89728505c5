"""From a dataset path to checked, split, labelled samples and the loaders that feed them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from imgtune.config import DataConfig
from imgtune.core.errors import DataError
from imgtune.core.io import cache_dir
from imgtune.core.resources import default_workers
from imgtune.data.check import CheckReport, FileInfo, FileProblem, Issue, check_layout
from imgtune.data.folders import ALL, SPLITS, ClassInfo, discover
from imgtune.data.sources import resolve_source
from imgtune.data.transforms import read_image


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


def _stable_order(infos: list[FileInfo], seed: int) -> list[list[FileInfo]]:
    """Files grouped by content and ordered by a seeded hash of it.

    A file's place depends only on its own content and the seed, so adding or removing other files moves
    few files between splits; identical files form one group and always land in the same split.
    """
    groups: dict[str, list[FileInfo]] = {}
    for info in sorted(infos, key=lambda f: f.path):
        groups.setdefault(info.sha1, []).append(info)
    return [groups[sha] for sha in sorted(groups, key=lambda sha: hashlib.sha256(f"{seed}:{sha}".encode()).digest())]


def _take(groups: list[list[FileInfo]], count: int) -> tuple[list[FileInfo], list[list[FileInfo]]]:
    """The first groups holding about `count` files, and the rest."""
    taken: list[FileInfo] = []
    while groups and len(taken) < count:
        taken += groups.pop(0)
    return taken, groups


def _split_by_ratios(infos: list[FileInfo], ratios: tuple[float, float, float], seed: int) -> dict[str, list[FileInfo]]:
    groups = _stable_order(infos, seed)
    n = len(infos)
    n_valid = round(n * ratios[1]) if n >= 3 else 0
    n_test = round(n * ratios[2]) if n >= 3 else 0
    valid, groups = _take(groups, min(n_valid, max(0, n - 1)))
    test, groups = _take(groups, min(n_test, max(0, n - 1 - len(valid))))
    return {"valid": valid, "test": test, "train": [f for g in groups for f in g]}


def _carve(infos: list[FileInfo], fraction: float, seed: int) -> tuple[list[FileInfo], list[FileInfo]]:
    """(kept, carved): about `fraction` of the files carved out, at least one, never all."""
    groups = _stable_order(infos, seed)
    count = min(len(infos) - 1, max(1, round(len(infos) * fraction))) if len(infos) >= 2 else 0
    carved, groups = _take(groups, count)
    return [f for g in groups for f in g], carved


def split_report(report: CheckReport, cfg: DataConfig) -> tuple[dict[str, dict[str, list[FileInfo]]], list[str]]:
    """Per split and class, the usable files: split by ratios or carved as `cfg` says. Also notes."""
    notes: list[str] = []
    if report.kind == "classes":
        out: dict[str, dict[str, list[FileInfo]]] = {s: {} for s in SPLITS}
        for class_id, infos in report.good[ALL].items():
            for split, part in _split_by_ratios(infos, cfg.split_ratios, cfg.split_seed).items():
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
                out["train"][class_id], out[split][class_id] = _carve(
                    infos, cfg.carve_fraction, cfg.split_seed + (1 if split == "valid" else 2)
                )
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
    return default_workers() if cfg.num_workers < 0 else cfg.num_workers


class ImageFileDataset(Dataset):
    """(image tensor, label) pairs from checked files.

    With `seed`, a random transform (augmentation) draws from a generator seeded by (seed, epoch, index): an
    image is augmented the same way whatever process, loader worker or rank loads it, so a resumed epoch repeats
    and N data-parallel workers see what one process sees (the Trainer calls `set_epoch`).
    """

    def __init__(
        self, samples: list[Sample], transform: Callable, max_pixels: int | None = None, seed: int | None = None
    ):
        self.samples = samples
        self.transform = transform
        self.max_pixels = max_pixels  # the checked limit; PIL's own default would refuse larger images
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        if self.max_pixels and self.max_pixels != Image.MAX_IMAGE_PIXELS:
            Image.MAX_IMAGE_PIXELS = self.max_pixels  # per worker process
        image = read_image(sample.path)
        if self.seed is None:
            return self.transform(image), sample.label
        with torch.random.fork_rng(devices=[]):  # the caller's own random stream is left as it was
            # the CPU generator only: torch.manual_seed would also reseed every CUDA generator, which fork_rng
            # with devices=[] does not restore (GPU dropout would then depend on the last sample loaded)
            torch.random.default_generator.manual_seed(hash((self.seed, self.epoch, index)) % 2**63)
            return self.transform(image), sample.label


def make_loader(
    dataset: Dataset,
    *,
    batch_size: int,
    shuffle: bool,
    num_workers: int,
    seed: int = 0,
    pin_memory: bool = False,
    rank: int = 0,
    world_size: int = 1,
) -> DataLoader:
    """A DataLoader for rank `rank` of `world_size` data-parallel workers (1: a single process).

    `batch_size` is the global batch: each rank loads batch_size / world_size. Shuffled (training): a seeded,
    epoch-aware DistributedSampler (call its `set_epoch`; the Trainer does), so the order depends only on the seed
    and the epoch, and the ranks' batches together are the batch one process would load; when the data does not
    split evenly, the sampler repeats a few samples so every rank runs the same number of steps. In order
    (evaluation): rank r loads samples r, r + world_size, ... with no repeats, so metrics summed over ranks count
    each sample once.
    """
    generator = torch.Generator().manual_seed(seed)
    workers = default_workers() if num_workers < 0 else num_workers
    sampler = None
    if shuffle:
        sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=seed)
    elif world_size > 1:
        dataset = Subset(dataset, range(rank, len(dataset), world_size))
    return DataLoader(
        dataset,
        batch_size=max(1, batch_size // world_size),
        sampler=sampler,
        num_workers=workers,
        generator=generator,
        pin_memory=pin_memory,
        persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
    )
