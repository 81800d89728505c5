"""A model bundle ready to answer: decoded images in, top-k classes (and raw logits) out.

Two backends compute the logits of a batch:

- `torch`: the bundle's model in inference mode, channels-last memory format;
- `onnx`: ONNX Runtime on an export of the same model (`model/model.onnx`, made once per bundle and checked
  against PyTorch on the same inputs before it serves anything).
"""

from __future__ import annotations

import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgtune.data.transforms import to_rgb
from imgtune.errors import ConfigError, JobError
from imgtune.jobs import Job, atomic_write_json
from imgtune.models.weights import sha256_file
from imgtune.serving.bundle import WEIGHTS_FILE, Bundle, load_bundle

BACKENDS = ("torch", "onnx")
ONNX_FILE = "model.onnx"
ONNX_RECORD = "model.onnx.json"  # which weights the export was made from, and how close it came to PyTorch
ONNX_TOLERANCE = 1e-3  # max |logit difference| against PyTorch (float32 kernels differ in summation order)


@dataclass
class ClassScore:
    index: int
    id: str
    label: str
    probability: float

    def to_dict(self) -> dict[str, Any]:
        return {"index": self.index, "id": self.id, "label": self.label, "probability": self.probability}


def top_k(logits: np.ndarray, labels: list[tuple[str, str]], k: int) -> list[ClassScore]:
    """The k most probable classes of one image's logits (softmax), most probable first."""
    shifted = np.exp(logits - logits.max())
    probabilities = shifted / shifted.sum()
    order = np.argsort(-probabilities, kind="stable")[: max(1, min(k, len(labels)))]
    return [ClassScore(int(i), labels[i][0], labels[i][1], float(probabilities[i])) for i in order]


class TorchBackend:
    name = "torch"

    def __init__(self, model: torch.nn.Module, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.model = model.eval().to(memory_format=torch.channels_last)

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        with torch.inference_mode():
            return self.model(batch.contiguous(memory_format=torch.channels_last)).float().numpy()


class OnnxBackend:
    name = "onnx"

    def __init__(self, path: Path, threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's business
        self.session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> np.ndarray:
        return self.session.run(None, {self.input_name: batch.contiguous().numpy()})[0]


def export_onnx(bundle: Bundle, model_dir: Path, *, force: bool = False) -> tuple[Path, dict[str, Any]]:
    """The bundle's ONNX export, made once (again only when the weights change) and checked against PyTorch.

    Raises:
        JobError: the export's logits differ from PyTorch's by more than ONNX_TOLERANCE.
    """
    path, record_path = model_dir / ONNX_FILE, model_dir / ONNX_RECORD
    weights_sha = sha256_file(model_dir / WEIGHTS_FILE)
    if not force and path.is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record.get("weights_sha256") == weights_sha and record.get("onnx_sha256") == sha256_file(path):
            return path, record
    size = bundle.preprocessing.image_size
    model = bundle.model.eval()
    example = torch.randn(2, 3, size, size)
    started = time.perf_counter()
    tmp = model_dir / f".{ONNX_FILE}.tmp"
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (example,),
            str(tmp),
            input_names=["images"],
            output_names=["logits"],
            dynamic_shapes=({0: batch},),
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    tmp.replace(path)
    difference = _max_difference(model, OnnxBackend(path), size)
    record = {
        "weights_sha256": weights_sha,
        "onnx_sha256": sha256_file(path),
        "torch_version": torch.__version__,
        "export_seconds": round(time.perf_counter() - started, 2),
        "max_abs_logit_difference": difference,
        "tolerance": ONNX_TOLERANCE,
    }
    if not difference <= ONNX_TOLERANCE:
        path.unlink(missing_ok=True)
        raise JobError(
            f"the ONNX export's logits differ from PyTorch's by {difference:.2e} (tolerance {ONNX_TOLERANCE})",
            "serve this model with --backend torch",
        )
    atomic_write_json(record_path, record)
    return path, record


def _max_difference(model: torch.nn.Module, onnx: OnnxBackend, size: int) -> float:
    """Largest |logit difference| between ONNX Runtime and PyTorch over batches of 1 and 3 images."""
    generator = torch.Generator().manual_seed(0)
    worst = 0.0
    for count in (1, 3):
        batch = torch.randn(count, 3, size, size, generator=generator)
        with torch.inference_mode():
            expected = model(batch).numpy()
        worst = max(worst, float(np.abs(onnx(batch) - expected).max()))
    return worst


class Predictor:
    """Preprocesses images as the model was trained and evaluated, and computes logits with one backend."""

    def __init__(self, bundle: Bundle, backend: Any, model_dir: Path | None = None):
        self.bundle = bundle
        self.backend = backend
        self.model_dir = model_dir
        self.transform = bundle.preprocessing.eval_transform()
        self.labels = [(c.id, c.name) for c in bundle.classes]
        self.onnx_record: dict[str, Any] | None = None

    @classmethod
    def load(
        cls, source: str | Path, backend: str = "torch", threads: int | None = None, workspace: str | Path | None = None
    ) -> Predictor:
        """From a job (name or directory, in the workspace) or a bundle directory."""
        if backend not in BACKENDS:
            raise ConfigError(f"unknown backend {backend!r}", f"use one of {', '.join(BACKENDS)}")
        model_dir = resolve_model_dir(source, workspace)
        bundle = load_bundle(model_dir)
        if backend == "onnx":
            path, record = export_onnx(bundle, model_dir)
            predictor = cls(bundle, OnnxBackend(path, threads), model_dir)
            predictor.onnx_record = record
            return predictor
        return cls(bundle, TorchBackend(bundle.model, threads), model_dir)

    @property
    def image_size(self) -> int:
        return self.bundle.preprocessing.image_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(image))

    def logits(self, tensors: list[torch.Tensor]) -> np.ndarray:
        return self.backend(torch.stack(tensors))

    def classes(self, logits: np.ndarray, k: int = 5) -> list[dict[str, Any]]:
        """One image's top-k classes as dicts (index, id, label, probability), most probable first."""
        return [score.to_dict() for score in top_k(np.asarray(logits), self.labels, k)]

    def predict(self, images: list[Image.Image], k: int = 5) -> list[list[dict[str, Any]]]:
        """Top-k classes for each image, in order."""
        return [self.classes(row, k) for row in self.logits([self.preprocess(image) for image in images])]

    def describe(self) -> dict[str, Any]:
        manifest = self.bundle.manifest
        return {
            "backbone": manifest["architecture"]["backbone"],
            "classes": len(self.labels),
            "image_size": self.image_size,
            "backend": self.backend.name,
            "model_dir": str(self.model_dir) if self.model_dir else None,
        }


def resolve_model_dir(source: str | Path, workspace: str | Path | None = None) -> Path:
    """A bundle directory from a job name or path, or the bundle directory itself."""
    path = Path(source).expanduser()
    if (path / "manifest.json").is_file():
        return path
    job = Job.open(source, workspace)
    if not (job.model_dir / "manifest.json").is_file():
        raise JobError(f"job {job.name} has no model yet (status {job.status()})", "serve a completed training job")
    return job.model_dir
