"""`bf16`: channels-last under bfloat16 autocast, where the CPU (AVX512-BF16/AMX) or GPU supports it."""

from __future__ import annotations

import torch
from torch import nn

from imgtune.models.backends.base import BackendUnavailable, TorchBackend, device_description
from imgtune.models.backends.registry import register_backend


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":  # natively (Ampere and later), not by emulation: slow, and no cuDNN bf16 convolutions
        return torch.cuda.is_bf16_supported(including_emulation=False)
    return device.type == "cpu" and bool(torch.backends.mkldnn.is_available()) and _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


@register_backend("bf16", auto_candidate=True)
class Bf16Backend(TorchBackend):
    channels_last = True
    autocast = torch.bfloat16

    def __init__(self, module: nn.Module, device: torch.device, **options):
        if not bf16_supported(device):
            raise BackendUnavailable(f"no bfloat16 support on {device_description(device)}")
        super().__init__(module, device, **options)
