"""Frozen-backbone features, computed once and reused by every epoch, job and tuning trial.

A split's features are keyed by the backbone's weights, the preprocessing, the view (the plain eval crop, or
the k-th seeded augmented view), a fingerprint of the split's file contents and labels, and the library
versions.
Files are written atomically, so concurrent writers of the same key are safe (the last rename wins, and
both wrote the same thing).
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from imgtune.core.io import atomic_output
from imgtune.core.progress import progress_bar
from imgtune.data.dataset import ImageFileDataset, Sample, make_loader
from imgtune.data.transforms import Preprocessing, read_image
from imgtune.models.backends import Backend, choose_backend, weights_fingerprint

_CACHE_VERSION = 2  # 2: JPEGs decoded by torchvision.io (data.transforms.read_image), not PIL


def module_fingerprint(module: nn.Module, name: str = "") -> str:
    """sha256 of a module's tensors (names, shapes, dtypes, bytes), salted with its name and the cache version."""
    return weights_fingerprint(module, f"{name}|{_CACHE_VERSION}")


def example_images(samples: list[Sample], transform, count: int = 16) -> torch.Tensor:
    """A batch of the first usable images (spread over the list), for choosing and checking backends."""
    step = max(1, len(samples) // count)
    images = []
    for sample in samples[::step][:count]:
        images.append(transform(read_image(sample.path)))
    return torch.stack(images)


def backbone_backend(
    backbone: nn.Module,
    backbone_fp: str,
    samples: list[Sample],
    transform,
    device: torch.device,
    choice: str,
) -> tuple[Backend, dict]:
    """The inference backend the backbone's features are computed with (imgtune.models.backends);
    `backbone_fp` is its module_fingerprint."""
    example = example_images(samples, transform)
    return choose_backend(backbone, example, device, choice, fingerprint=backbone_fp)


def extract_features(
    backend: Backend,
    samples: list[Sample],
    transform,
    *,
    device: torch.device,
    batch_size: int = 64,
    num_workers: int = -1,
    max_pixels: int | None = None,
    augment_seed: int | None = None,
    progress: bool = True,
    description: str = "features",
    stats: dict[str, float] | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> torch.Tensor:
    """Run the backbone's inference backend over the samples' images; returns float32 features [N, D] on the CPU.

    `augment_seed`: a random `transform` (an augmented view) draws from per-sample seeds made from it, so a view
    does not depend on loader workers or ranks. `rank` of `world_size`: only samples rank, rank + world_size, ...
    (a data-parallel worker's shard). `stats`, when given, receives the seconds spent waiting for the loader and
    running the backbone, so that a job can say whether its backbone waited for data.
    """
    loader = make_loader(
        ImageFileDataset(samples, transform, max_pixels, seed=augment_seed),
        batch_size=batch_size * world_size,
        shuffle=False,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        rank=rank,
        world_size=world_size,
    )
    chunks = []
    waited = computed = 0.0
    with progress_bar(enabled=progress, transient=True) as bar:
        task = bar.add_task(description, total=len(loader.dataset), info=backend.name)
        batches = iter(loader)
        while True:
            started = time.perf_counter()
            try:
                images, _ = next(batches)
            except StopIteration:
                break
            ready = time.perf_counter()
            chunks.append(backend(images))
            waited, computed = waited + ready - started, computed + time.perf_counter() - ready
            bar.advance(task, images.shape[0])
    if stats is not None:
        stats["data_wait_seconds"] = stats.get("data_wait_seconds", 0.0) + waited
        stats["backbone_seconds"] = stats.get("backbone_seconds", 0.0) + computed
        stats["images"] = stats.get("images", 0) + len(loader.dataset)
    return torch.cat(chunks) if chunks else torch.empty(0)


class FeatureCache:
    """A directory of feature files, one per (backbone, preprocessing, view, split content)."""

    def __init__(self, root: Path):
        self.root = root

    def key(self, backbone_fp: str, preprocessing: Preprocessing, split_fp: str, view: str, backend: str) -> str:
        """`backend`: the inference backend's name (bf16 features are not fp32 features)."""
        import torchvision

        versions = [torch.__version__, torchvision.__version__, _CACHE_VERSION]
        text = json.dumps([backbone_fp, preprocessing.to_dict(), split_fp, view, backend, versions], sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:32]

    def path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def load(self, key: str) -> torch.Tensor | None:
        path = self.path(key)
        if not path.exists():
            return None
        try:
            return load_file(str(path))["features"]
        except Exception:  # a damaged file is recomputed, not trusted
            path.unlink(missing_ok=True)
            return None

    def store(self, key: str, features: torch.Tensor, meta: dict[str, str]) -> None:
        with atomic_output(self.path(key)) as tmp:
            save_file({"features": features.contiguous()}, str(tmp), metadata=meta)


class FeatureLoader:
    """Batches of (features, labels) from memory, shuffled per epoch; one view per sample per epoch.

    Has the `generator` the Trainer re-seeds each epoch, so an epoch's order and views depend only on
    (seed, epoch).
    """

    def __init__(self, views: torch.Tensor, labels: torch.Tensor, batch_size: int, shuffle: bool):
        self.views = views  # [V, N, D]
        self.labels = labels
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.generator = torch.Generator().manual_seed(0)

    def __len__(self) -> int:
        return -(-self.labels.shape[0] // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.labels.shape[0]
        order = torch.randperm(n, generator=self.generator) if self.shuffle else torch.arange(n)
        if self.views.shape[0] > 1 and self.shuffle:
            view = torch.randint(self.views.shape[0], (n,), generator=self.generator)
        else:
            view = torch.zeros(n, dtype=torch.long)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            yield self.views[view[idx], idx], self.labels[idx]
