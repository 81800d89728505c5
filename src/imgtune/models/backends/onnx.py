"""`onnx`: ONNX Runtime on an export of the module (the torch.export-based exporter).

The export is made once and kept in the cache (`IMGTUNE_CACHE/inference/`), named by the module's
architecture, its weights' fingerprint and the input size (the export fixes the image size; only the batch
dimension is dynamic).
"""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from imgtune.core.io import atomic_output, cache_dir
from imgtune.models.backends.base import Backend, BackendUnavailable, architecture_signature, weights_fingerprint
from imgtune.models.backends.registry import register_backend


def export_file(module: nn.Module, image_size: int, fingerprint: str | None = None) -> Path:
    """Where the export of `module` at `image_size` is kept; `fingerprint`: of its weights (hashed if None)."""
    weights = (fingerprint or weights_fingerprint(module))[:24]
    return cache_dir() / "inference" / f"{architecture_signature(module)[:12]}-{weights}-{image_size}px.onnx"


def export_onnx(module: nn.Module, image_size: int, onnx_file: Path) -> Path:
    """Export `module` (fp32, CPU) with a dynamic batch dimension; written atomically."""
    module = copy.deepcopy(module).eval().cpu()  # the caller's module stays where it is (a GPU, say)
    example = torch.randn(2, 3, image_size, image_size)
    with (
        atomic_output(onnx_file) as tmp,
        warnings.catch_warnings(),
        open(os.devnull, "w") as devnull,
        contextlib.redirect_stdout(devnull),
    ):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=["outputs"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    return onnx_file


def exported_onnx(module: nn.Module, image_size: int, fingerprint: str | None = None) -> Path:
    """The cached fp32 export of `module` at `image_size`, made now when not cached yet."""
    onnx_file = export_file(module, image_size, fingerprint)
    if not onnx_file.is_file():
        export_onnx(module, image_size, onnx_file)
    return onnx_file


@register_backend("onnx", auto_candidate=True)
class OnnxBackend(Backend):
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
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime is not installed") from None
        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise BackendUnavailable("ONNX Runtime here has no CUDA provider")
            providers.insert(0, "CUDAExecutionProvider")
        onnx_file = self.model_file(module, image_size, fingerprint, calibration)
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's business
        if threads:
            options.intra_op_num_threads = threads
        self.onnx_file = onnx_file
        self.session = ort.InferenceSession(str(onnx_file), options, providers=providers)
        # A CUDA provider that fails to load (no cuDNN, a driver too old) is dropped with a log line, and the
        # session runs on the CPU: on CUDA that is another backend than the one asked for, so say so.
        if device.type == "cuda" and self.session.get_providers()[0] != "CUDAExecutionProvider":
            raise BackendUnavailable("ONNX Runtime's CUDA provider did not load (it fell back to the CPU)")
        self.input_name = self.session.get_inputs()[0].name

    def model_file(
        self, module: nn.Module, image_size: int, fingerprint: str | None, calibration: torch.Tensor | None
    ) -> Path:
        """The ONNX file this backend runs (exported now when not in the cache); subclasses run another."""
        return exported_onnx(module, image_size, fingerprint)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        output = self.session.run(None, {self.input_name: batch.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(output)
