"""`openvino` and `openvino-int8`: Intel's OpenVINO runtime on the CPU.

`openvino` compiles the `onnx` backend's fp32 export (inference precision pinned to f32: on CPUs with bf16,
OpenVINO would otherwise run in bf16 unasked); `openvino-int8` compiles the `int8` backend's QDQ model, which
OpenVINO runs as int8 (its low-precision transformations read the quantize/dequantize pairs), so both int8
backends are calibrated once, on the same photos. OpenVINO runs on Intel/AMD CPUs here, not on CUDA GPUs.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgtune.models.backends.base import Backend, BackendUnavailable
from imgtune.models.backends.int8 import quantized_model
from imgtune.models.backends.onnx import exported_onnx
from imgtune.models.backends.registry import register_backend


def compile_openvino(model_file: Path, threads: int | None = None):
    """An OpenVINO CompiledModel of an ONNX or OpenVINO IR file on the CPU, fp32 where not quantized."""
    try:
        import openvino as ov
    except ImportError:
        raise BackendUnavailable("openvino is not installed") from None
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERFORMANCE_HINT": "LATENCY"}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(threads)
    return ov.Core().compile_model(str(model_file), "CPU", config)


@register_backend("openvino", auto_candidate=True)
class OpenVinoBackend(Backend):
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
        super().__init__(module, device)
        if device.type != "cpu":
            raise BackendUnavailable(f"OpenVINO runs on the CPU here, not on {device.type}")
        self.model_path = self.model_file(module, image_size, fingerprint, calibration)
        self.compiled = compile_openvino(self.model_path, threads)
        self.request = self.compiled.create_infer_request()

    def model_file(
        self, module: nn.Module, image_size: int, fingerprint: str | None, calibration: torch.Tensor | None
    ) -> Path:
        return exported_onnx(module, image_size, fingerprint)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        inputs = np.ascontiguousarray(batch.detach().cpu().float().numpy())
        outputs = self.request.infer({0: inputs})
        return torch.from_numpy(np.array(outputs[self.compiled.output(0)], dtype=np.float32, copy=True))


@register_backend("openvino-int8", auto_candidate=True)
class OpenVinoInt8Backend(OpenVinoBackend):
    lossy = True

    def model_file(
        self, module: nn.Module, image_size: int, fingerprint: str | None, calibration: torch.Tensor | None
    ) -> Path:
        return quantized_model(module, image_size, fingerprint, calibration)
