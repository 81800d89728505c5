"""What a training process builds before the loop: device, seeds, data loaders (cached features for a frozen
backbone), model, optimizer and schedule."""

from __future__ import annotations

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
from imgtune.core.version import __version__
from imgtune.data.dataset import ImageFileDataset, PreparedData, make_loader, prepare_data
from imgtune.data.transforms import Preprocessing
from imgtune.models.backends import known_backend_name
from imgtune.models.factory import ImageClassifier, create_model
from imgtune.training import memo
from imgtune.training.feature_cache import (
    FeatureCache,
    FeatureLoader,
    backbone_backend,
    extract_features,
    module_fingerprint,
)

FEATURE_BATCH_SIZE = 64


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
) -> TrainingSetup:
    """Loaders for each split; with a frozen backbone and the cache on, features instead of images.
    `backbone_fingerprint`: the backbone's module_fingerprint when the caller knows it (else it is computed).
    `rank` of `world_size`: a data-parallel worker's share of each batch (images only: head training on cached
    features runs in one process)."""
    cfg = config.train
    workers = config.data.num_workers
    labels = {s: torch.tensor([x.label for x in samples], dtype=torch.long) for s, samples in data.splits.items()}
    if model.backbone_frozen and cfg.feature_cache:
        started = time.perf_counter()
        cache = FeatureCache((cache_root or cache_dir()) / "features")
        backbone_fp = backbone_fingerprint or module_fingerprint(model.backbone, model.spec.backbone)
        size = preprocessing.image_size
        backend: Any = None  # built on the first cache miss
        choice = config.model.backend
        backend_name = known_backend_name(model.backbone, choice, device, (3, size, size), fingerprint=backbone_fp)
        if backend_name is None:  # auto, never measured on this device: measure now
            backend, _ = backbone_backend(
                model.backbone, backbone_fp, data.splits["train"], preprocessing.eval_transform(), device, choice
            )
            backend_name = backend.name
        loaders: dict[str, Any] = {}
        extraction: dict[str, float] = {}
        for split, samples in data.splits.items():
            views = [0] + (list(range(1, cfg.augment_views + 1)) if split == "train" else [])
            tensors = []
            for view in views:
                # An augmented view's random stream depends on the seed and on how samples meet workers.
                view_id = "eval" if view == 0 else f"augment-{view}-seed-{cfg.seed}-workers-{workers}"
                key = cache.key(backbone_fp, preprocessing, data.fingerprint(split), view_id, backend_name)
                features = memo.features(cache, key)
                if features is None or features.shape[0] != len(samples):
                    transform = preprocessing.eval_transform() if view == 0 else preprocessing.train_transform()
                    if backend is None:
                        backend, _ = backbone_backend(
                            model.backbone, backbone_fp, samples, preprocessing.eval_transform(), device, backend_name
                        )
                    features = extract_features(
                        backend,
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
        return TrainingSetup(model.head, loaders, "features", seconds, backend_name, extraction or None)
    loaders = {}
    for split, samples in data.splits.items():
        transform = preprocessing.train_transform() if split == "train" else preprocessing.eval_transform()
        train = split == "train"
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
