"""What every backend shares: the Backend contract, its one exception, the torch runner the torch backends are
made of, and the fingerprints that name a module on a device."""

from __future__ import annotations

import contextlib
import hashlib
import platform
from abc import ABC, abstractmethod
from pathlib import Path
from typing import ClassVar

import torch
from torch import nn


class BackendUnavailable(Exception):
    """This backend cannot run here (no bf16 support, no CUDA provider ...): `auto` skips it, naming it fails."""


class Backend(ABC):
    """One way to run a module: a float32 NCHW batch in, float32 outputs on the CPU out.

    A subclass builds in `__init__` (raising BackendUnavailable when it cannot run on `device`) and runs in
    `__call__`. Every backend takes the same keyword options and ignores those it has no use for:
    `image_size` (the side of the square inputs, for exporters), `threads` (for runtimes with their own pool),
    `fingerprint` (of the module's weights, naming what it keeps in the cache; hashed here when None) and
    `calibration` (a batch of real preprocessed inputs, for quantizers). `name` is set by `register_backend`.

    `lossy` backends (quantized ones) change answers a little by design: they are checked on labelled photos
    (top-1 agreement with fp32 eager and accuracy, imgtune.models.backends.choose) instead of by output cosine.
    """

    name: ClassVar[str] = ""
    lossy: ClassVar[bool] = False

    def __init__(
        self,
        module: nn.Module,
        device: torch.device,
        *,
        image_size: int = 224,
        threads: int | None = None,
        fingerprint: str | None = None,
        calibration: torch.Tensor | None = None,
    ):
        self.device = device

    @abstractmethod
    def __call__(self, batch: torch.Tensor) -> torch.Tensor: ...


class TorchBackend(Backend):
    """The module itself in torch, in eval mode on `device`; subclasses pick the memory format, autocast and
    compilation. Converts the caller's module in place (no copy of a large model's weights)."""

    channels_last: ClassVar[bool] = False
    autocast: ClassVar[torch.dtype | None] = None
    compiled: ClassVar[bool] = False

    def __init__(self, module: nn.Module, device: torch.device, **options):
        super().__init__(module, device, **options)
        module = module.eval().to(device)
        if self.channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = torch.compile(module) if self.compiled else module

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            context = (
                torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
            )
            with context:
                return self.module(batch).float().cpu()


def device_description(device: torch.device) -> str:
    """The device as a measured choice depends on it: GPU model, or CPU model and thread count."""
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu:{model}:{torch.get_num_threads()} threads"


def architecture_signature(module: nn.Module) -> str:
    """Which network this is (layer types, tensor names and shapes), whatever its weights."""
    digest = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
    digest.update(str([type(m).__name__ for m in module.modules()]).encode())
    return digest.hexdigest()[:20]


def weights_fingerprint(module: nn.Module, salt: str = "") -> str:
    """sha256 of a module's tensors (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256(salt.encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()
