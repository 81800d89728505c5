"""What a training process builds before the loop: device, seeds, data loaders (cached features for a frozen
backbone), model, optimizer and schedule."""

from __future__ import annotations

import json
import platform
import random
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imgtune.config import JobConfig, TrainConfig
from imgtune.core.errors import ConfigError
from imgtune.core.io import cache_dir
from imgtune.core.resources import torch_device
from imgtune.core.version import __version__
from imgtune.data.dataset import ImageFileDataset, PreparedData, make_loader, prepare_data
from imgtune.data.transforms import Preprocessing
from imgtune.models.backends import known_backend_name
from imgtune.models.factory import ImageClassifier, create_model
from imgtune.training import distributed, memo
from imgtune.training.feature_cache import (
    FeatureCache,
    FeatureLoader,
    backbone_backend,
    extract_features,
    module_fingerprint,
)

FEATURE_BATCH_SIZE = 64


def resolve_device(name: str) -> torch.device:
    """The device a job trains on (train.device): auto, cpu, cuda or cuda:N."""
    return torch_device(name, "train.device")


def cpu_has_native_bf16() -> bool:
    """Does this CPU compute bf16 natively (AVX512-BF16 or AMX)? Elsewhere (AVX2 only, say) bf16 is emulated,
    slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def amp_dtype(mode: str, device: torch.device, fine_tuning: bool = False) -> torch.dtype | None:
    """The autocast dtype: bf16 where the GPU supports it, else fp16. On a CPU, 'auto' takes bf16 for an unfrozen
    backbone trained on images (`fine_tuning`: where the time goes) where the CPU has it natively, else none (a
    head on cached or frozen features keeps fp32's numbers)."""
    if mode == "auto" and device.type != "cuda":
        return torch.bfloat16 if fine_tuning and device.type == "cpu" and cpu_has_native_bf16() else None
    if mode == "off":
        return None
    if mode == "fp16":
        return torch.float16
    # Natively only (Ampere and later): older GPUs "support" bf16 by emulation, slowly and without cuDNN's bf16
    # convolutions, where fp16 with a gradient scaler is the fast choice.
    if mode == "bf16" or (device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)):
        return torch.bfloat16
    return torch.float16


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    # Both ways: a process that runs job after job (a reused tuning worker) must not keep an earlier job's choice.
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    if deterministic:
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


def make_optimizer(params: Iterable[Any], cfg: TrainConfig) -> torch.optim.Optimizer:
    """The config's optimizer over `params` (parameters, or parameter groups with rates of their own, as
    imgtune.training.recipe gives them); parameters that do not train are left out."""
    params = list(params)
    if params and isinstance(params[0], dict):
        groups = [{**g, "params": [p for p in g["params"] if p.requires_grad]} for g in params]
        params = [g for g in groups if g["params"]]
    else:
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
    feature_backend: str | None = None  # the inference backend that computed the backbone's features
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
        head_seed=config.train.seed,
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
    backbone_fingerprint: str | None = None,
    rank: int = 0,
    world_size: int = 1,
    feature_backend: str | None = None,
) -> TrainingSetup:
    """Loaders for each split; with a frozen backbone and the cache on, features instead of images.
    `backbone_fingerprint`: the backbone's module_fingerprint when the caller knows it (else it is computed).
    `rank` of `world_size`: a data-parallel worker's share of each batch (images only: head training on cached
    features runs in one process). `feature_backend`: the inference backend the features were computed with
    (data-parallel workers built the cache), instead of this process's own choice."""
    cfg = config.train
    workers = config.data.num_workers
    labels = {s: torch.tensor([x.label for x in samples], dtype=torch.long) for s, samples in data.splits.items()}
    if model.backbone_frozen and cfg.feature_cache:
        started = time.perf_counter()
        features = FeaturePlan(model, data, preprocessing, config, device, cache_root, backbone_fingerprint)
        backend_name = features.choose_backend(feature_backend)
        loaders: dict[str, Any] = {}
        extraction: dict[str, float] = {}
        for split in data.splits:
            entries = features.entries(backend_name, split)
            tensors = [features.compute(entry, backend_name, progress, extraction) for entry in entries]
            loaders[split] = FeatureLoader(
                torch.stack(tensors), labels[split], cfg.batch_size, shuffle=split == "train"
            )
        model.backbone.cpu()
        seconds = time.perf_counter() - started
        return TrainingSetup(model.head, loaders, "features", seconds, backend_name, _rates(extraction) or None)
    loaders = {}
    for split, samples in data.splits.items():
        train = split == "train"
        transform = (
            preprocessing.train_transform(cfg.augment, cfg.random_erasing) if train else preprocessing.eval_transform()
        )
        loaders[split] = make_loader(
            ImageFileDataset(samples, transform, config.data.max_image_pixels, seed=cfg.seed if train else None),
            batch_size=cfg.batch_size,
            shuffle=train,
            num_workers=workers,
            seed=cfg.seed,
            pin_memory=device.type == "cuda",
            rank=rank,
            world_size=world_size,
        )
    return TrainingSetup(model, loaders, "images")


@dataclass
class FeatureEntry:
    """One cache entry a job needs: a split's features in one view (0: the eval crop; k: the k-th augmented view)."""

    split: str
    view: int
    key: str
    samples: list[Any]


class FeaturePlan:
    """The feature cache entries a job with a frozen backbone needs, and how to compute each: in one process, or
    shared by the ranks of a data-parallel job (`compute_shard`, then `merge_shards` on rank 0)."""

    def __init__(
        self,
        model: ImageClassifier,
        data: PreparedData,
        preprocessing: Preprocessing,
        config: JobConfig,
        device: torch.device,
        cache_root: Path | None = None,
        backbone_fingerprint: str | None = None,
    ):
        self.model, self.data, self.preprocessing, self.config, self.device = model, data, preprocessing, config, device
        self.cache = FeatureCache((cache_root or cache_dir()) / "features")
        self.backbone_fp = backbone_fingerprint or module_fingerprint(model.backbone, model.spec.backbone)
        self._backend: Any = None  # built on the first cache miss

    def choose_backend(self, name: str | None = None) -> str:
        """The inference backend's name: `name`, else the one remembered for this device, else measured now."""
        if name is not None:
            return name
        size = self.preprocessing.image_size
        choice = self.config.model.backend
        known = known_backend_name(
            self.model.backbone, choice, self.device, (3, size, size), fingerprint=self.backbone_fp
        )
        if known is not None:
            return known
        self._backend, _ = backbone_backend(  # auto, never measured on this device: measure now
            self.model.backbone,
            self.backbone_fp,
            self.data.splits["train"],
            self.preprocessing.eval_transform(),
            self.device,
            choice,
        )
        return self._backend.name

    def entries(self, backend_name: str, split: str | None = None) -> list[FeatureEntry]:
        cfg = self.config.train
        out = []
        for name, samples in self.data.splits.items():
            if split is not None and name != split:
                continue
            for view in [0] + (list(range(1, cfg.augment_views + 1)) if name == "train" else []):
                # An augmented view draws from per-sample seeds: the same whatever process or rank computes it.
                view_id = "eval" if view == 0 else f"augment-{view}-sample-seed-{cfg.seed}"
                key = self.cache.key(
                    self.backbone_fp, self.preprocessing, self.data.fingerprint(name), view_id, backend_name
                )
                out.append(FeatureEntry(name, view, key, samples))
        return out

    def cached(self, entry: FeatureEntry) -> torch.Tensor | None:
        features = memo.features(self.cache, entry.key)
        return features if features is not None and features.shape[0] == len(entry.samples) else None

    def _extract(self, entry: FeatureEntry, backend_name: str, progress: bool, stats: dict, rank: int, world_size: int):
        if self._backend is None or self._backend.name != backend_name:
            self._backend, _ = backbone_backend(
                self.model.backbone,
                self.backbone_fp,
                entry.samples,
                self.preprocessing.eval_transform(),
                self.device,
                backend_name,
            )
        transform = self.preprocessing.eval_transform() if entry.view == 0 else self.preprocessing.train_transform()
        return extract_features(
            self._backend,
            entry.samples,
            transform,
            device=self.device,
            batch_size=FEATURE_BATCH_SIZE,
            num_workers=self.config.data.num_workers,
            max_pixels=self.config.data.max_image_pixels,
            augment_seed=None if entry.view == 0 else self.config.train.seed * 1000 + entry.view,
            progress=progress,
            description=f"features {entry.split}" + (f" view {entry.view}" if entry.view else ""),
            stats=stats,
            rank=rank,
            world_size=world_size,
        )

    def _meta(self, entry: FeatureEntry) -> dict[str, str]:
        return {"backbone": self.model.spec.backbone, "split": entry.split, "view": str(entry.view)}

    def compute(self, entry: FeatureEntry, backend_name: str, progress: bool, stats: dict) -> torch.Tensor:
        """The entry's features: from the cache, or computed here and stored."""
        features = self.cached(entry)
        if features is None:
            features = self._extract(entry, backend_name, progress, stats, 0, 1)
            self.cache.store(entry.key, features, self._meta(entry))
        return features

    def shard_key(self, entry: FeatureEntry, rank: int, world_size: int) -> str:
        return f"{entry.key}-shard-{rank}-of-{world_size}"

    def compute_shard(
        self, entry: FeatureEntry, backend_name: str, rank: int, world_size: int, progress: bool, stats: dict
    ) -> None:
        """Rank `rank`'s share of a missing entry (samples rank, rank + world_size, ...), stored beside it."""
        features = self._extract(entry, backend_name, progress, stats, rank, world_size)
        self.cache.store(self.shard_key(entry, rank, world_size), features, self._meta(entry))

    def merge_shards(self, entry: FeatureEntry, world_size: int) -> None:
        """The ranks' shards put back in sample order as the entry itself (on one rank, after all stored theirs)."""
        shards = [self.cache.load(self.shard_key(entry, r, world_size)) for r in range(world_size)]
        if any(shard is None for shard in shards):
            raise RuntimeError(f"a feature shard of {entry.split} view {entry.view} is missing from {self.cache.root}")
        # a rank with no samples of a small split has an empty (1-D) shard
        filled = [(r, shard) for r, shard in enumerate(shards) if shard.numel()]
        if not filled:
            features = shards[0]
        else:
            features = torch.empty(len(entry.samples), filled[0][1].shape[1], dtype=filled[0][1].dtype)
            for r, shard in filled:
                features[r::world_size] = shard
        self.cache.store(entry.key, features, self._meta(entry))
        for r in range(world_size):
            self.cache.path(self.shard_key(entry, r, world_size)).unlink(missing_ok=True)


def _rates(extraction: dict[str, float]) -> dict[str, float]:
    if extraction:
        busy = extraction["data_wait_seconds"] + extraction["backbone_seconds"]
        extraction["data_wait_fraction"] = extraction["data_wait_seconds"] / busy if busy else 0.0
        extraction["images_per_second"] = extraction["images"] / busy if busy else 0.0
    return extraction


def build_feature_cache_on_ranks(
    model: ImageClassifier,
    data: PreparedData,
    preprocessing: Preprocessing,
    config: JobConfig,
    device: torch.device,
    *,
    rank: int,
    world_size: int,
    backbone_fingerprint: str | None = None,
) -> dict[str, Any]:
    """Called on every rank of a data-parallel job with a frozen backbone: the ranks compute the missing cache
    entries together, each a shard of the files, and rank 0 merges each entry. Rank 0 chooses the inference
    backend for all. Returns (on every rank) the backend's name, the entries computed and this rank's
    extraction figures."""
    plan = FeaturePlan(model, data, preprocessing, config, device, backbone_fingerprint=backbone_fingerprint)
    backend_name = distributed.broadcast_text(plan.choose_backend() if rank == 0 else None, 0)
    entries = plan.entries(backend_name)
    missing_here = [e.key for e in entries if plan.cached(e) is None] if rank == 0 else None
    missing = set(json.loads(distributed.broadcast_text(json.dumps(missing_here), 0)))
    stats: dict[str, float] = {}
    for entry in (e for e in entries if e.key in missing):
        plan.compute_shard(entry, backend_name, rank, world_size, progress=False, stats=stats)
    distributed.barrier()
    if rank == 0:
        for entry in (e for e in entries if e.key in missing):
            plan.merge_shards(entry, world_size)
    distributed.barrier()
    model.backbone.cpu()
    return {"feature_backend": backend_name, "entries_computed": len(missing), "extraction": _rates(stats)}


def trains_head_on_features(config: JobConfig) -> bool:
    """True when a job with `config` trains only its head, on cached features (a frozen backbone)."""
    return config.model.freeze == "backbone" and config.train.feature_cache


def warm_feature_cache(config: JobConfig, *, progress: bool = True) -> bool:
    """Compute (or find) the feature cache a job with `config` would use, without training; False when the job
    would train on images. Tuning jobs call this once, so that all trials share one cache."""
    if not trains_head_on_features(config):
        return False
    data = prepare_data(config.data, progress=progress)
    model = build_model(config, data.num_classes)
    preprocessing = model.preprocessing(config.data.image_size)
    setup_training(model, data, preprocessing, config, resolve_device(config.train.device), progress=progress)
    return True
