"""How much of this machine imgtune may use."""

from __future__ import annotations

import os
from typing import Any


def default_workers(cap: int = 8) -> int:
    """Worker processes for the CPUs this process may run on (cgroup/affinity aware), at most `cap`."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cpus = os.cpu_count() or 1
    return max(1, min(cap, cpus))


def torch_device(name: str, setting: str = "--device") -> Any:
    """A torch.device from `name`: `auto` (a CUDA GPU when torch sees one, else the CPU), `cpu`, `cuda`, `cuda:N`;
    a ConfigError naming `setting` for an unknown name, a device other than the CPU or a CUDA GPU, or CUDA where
    there is none."""
    import torch

    from imgtune.core.errors import ConfigError

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"unknown device {name!r} ({setting})", "use auto, cpu, cuda or cuda:N") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"{setting} {name!r}: imgtune runs on the CPU or a CUDA GPU", "use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{setting} is {name}, but no CUDA GPU is available here", f"use {setting} auto or cpu")
    return device
