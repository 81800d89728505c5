"""`int8`: ONNX Runtime on a statically quantized (QDQ) copy of the `onnx` backend's export.

Quantization follows ONNX Runtime's recipe for CNNs on CPUs: `quant_pre_process` first (shape inference and
graph optimisation, which folds BatchNorm into the convolutions; without it int8 ran slower than fp32 here),
then `quantize_static` in the QDQ format with per-channel int8 weights, uint8 activations and `reduce_range`
(7-bit weights: no saturation on CPUs without VNNI, where int8 products are summed in 16 bits), calibrated on a
batch of the job's own training photos (min-max ranges).

The quantized model is kept in the cache beside the fp32 export, named after it; it is made once, when a
calibration batch is given. Without one (and nothing in the cache) the backend is unavailable.

Quantization changes answers a little: this backend is `lossy`, so it is accepted only after a check on the
job's labelled validation photos (top-1 agreement with fp32 eager and accuracy), not by output cosine.
"""

from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

from imgtune.core.io import atomic_output
from imgtune.models.backends.base import BackendUnavailable
from imgtune.models.backends.onnx import OnnxBackend, export_file, exported_onnx
from imgtune.models.backends.registry import register_backend

CALIBRATION_BATCH = 8  # images per calibration step (the calibration batch is fed in slices of this size)


def int8_file(fp32_file: Path) -> Path:
    return fp32_file.with_name(f"{fp32_file.stem}-int8-qdq.onnx")


def quantize_onnx(fp32_onnx: Path, calibration: torch.Tensor, out: Path) -> Path:
    """Write a static QDQ int8 copy of `fp32_onnx` to `out` (atomically), calibrated on `calibration` (a
    preprocessed float32 NCHW batch of real photos, a few dozen)."""
    try:
        import onnxruntime as ort
        from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
        from onnxruntime.quantization.shape_inference import quant_pre_process
    except ImportError:
        raise BackendUnavailable("onnxruntime's quantization tools are not installed") from None
    if calibration.ndim != 4 or calibration.shape[0] < 1:
        raise ValueError(f"calibration must be a non-empty NCHW batch, got shape {tuple(calibration.shape)}")
    input_name = ort.InferenceSession(str(fp32_onnx), providers=["CPUExecutionProvider"]).get_inputs()[0].name
    batches = [
        {input_name: chunk.detach().cpu().float().contiguous().numpy()}
        for chunk in calibration.split(CALIBRATION_BATCH)
    ]

    class Photos(CalibrationDataReader):
        def __init__(self) -> None:
            self._batches = iter(batches)

        def get_next(self) -> dict[str, np.ndarray] | None:
            return next(self._batches, None)

    with tempfile.TemporaryDirectory(prefix="imgtune-int8-") as scratch, atomic_output(out) as tmp:
        prepared = Path(scratch) / "prepared.onnx"
        with open(Path(scratch) / "log", "w") as log, contextlib.redirect_stdout(log):
            quant_pre_process(str(fp32_onnx), str(prepared), skip_symbolic_shape=False)
            quantize_static(
                str(prepared),
                str(tmp),
                Photos(),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                calibration_providers=["CPUExecutionProvider"],
                extra_options={"CalibTensorRangeSymmetric": False},
            )
    return out


def quantized_model(
    module: nn.Module, image_size: int, fingerprint: str | None, calibration: torch.Tensor | None
) -> Path:
    """The cached int8 model of `module`, made now from `calibration` when not cached yet."""
    quantized = int8_file(export_file(module, image_size, fingerprint))
    if quantized.is_file():
        return quantized
    if calibration is None:
        raise BackendUnavailable("int8 needs calibration photos (the job's training photos) to be made")
    return quantize_onnx(exported_onnx(module, image_size, fingerprint), calibration, quantized)


@register_backend("int8", auto_candidate=True, aliases=("onnx-int8",))
class Int8Backend(OnnxBackend):
    lossy = True

    def model_file(
        self, module: nn.Module, image_size: int, fingerprint: str | None, calibration: torch.Tensor | None
    ) -> Path:
        return quantized_model(module, image_size, fingerprint, calibration)
