"""A model bundle ready to answer: decoded images in, top-k classes (and raw logits) out.

The logits come from an inference backend (imgtune.models.backends): `auto` (the default) measures the
backends this device offers on a few of the job's own photos and keeps the fastest whose outputs agree with fp32
eager; `torch` (fp32 channels-last), `onnx` (ONNX Runtime on an export made once per bundle, kept in the cache),
`bf16`, `eager` or `compile` name one, which is still checked against fp32 eager before it serves.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgtune.core.errors import JobError
from imgtune.data.check import IMAGE_SUFFIXES, MAX_IMAGE_PIXELS, BadImage, decode_image
from imgtune.data.transforms import load_image, to_rgb
from imgtune.models.backends import AUTO, Backend, choose_backend, remembered_backend, resolve_backend_name
from imgtune.models.bundle import WEIGHTS_FILE, Bundle, load_bundle
from imgtune.storage.jobs import Job

EXAMPLE_IMAGES = 16  # photos the backends are timed and checked on


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


def weights_sha256(bundle: Bundle) -> str:
    return bundle.manifest["files"][WEIGHTS_FILE]["sha256"]  # checked against the file when the bundle loaded


def example_batch(bundle: Bundle, model_dir: Path) -> tuple[torch.Tensor, bool]:
    """Up to EXAMPLE_IMAGES of the job's own photos, preprocessed, and True; or noise and False when the data
    is not at hand (a choice measured on noise is used, but not remembered)."""
    transform = bundle.preprocessing.eval_transform()
    job_file = model_dir.parent / "job.json"
    images: list[torch.Tensor] = []
    if job_file.is_file():
        data_path = Path(json.loads(job_file.read_text()).get("config", {}).get("data", {}).get("path", ""))
        if data_path.is_dir():
            files = (p for p in sorted(data_path.rglob("*")) if p.suffix.lower() in IMAGE_SUFFIXES)
            for file in itertools.islice(files, 0, None, 7):  # spread over classes
                try:
                    images.append(transform(load_image(file)))
                except Exception:
                    continue
                if len(images) == EXAMPLE_IMAGES:
                    break
    if len(images) < 4:
        size = bundle.preprocessing.image_size
        return torch.randn(EXAMPLE_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(0)), False
    return torch.stack(images), True


class Predictor:
    """Preprocesses images as the model was trained and evaluated, and computes logits on one inference backend."""

    def __init__(self, bundle: Bundle, backend: Backend, choice: dict | None = None, model_dir: Path | None = None):
        self.bundle = bundle
        self.backend = backend
        self.model_dir = model_dir
        self.choice = choice or {"backend": backend.name}
        self.transform = bundle.preprocessing.eval_transform()
        self.labels = [(c.id, c.name) for c in bundle.classes]

    @classmethod
    def load(
        cls, source: str | Path, backend: str = "auto", threads: int | None = None, workspace: str | Path | None = None
    ) -> Predictor:
        """From a job (name or directory, in the workspace) or a bundle directory, on `backend` (a name or alias
        of imgtune.models.backends, or auto). The ONNX export, if any, is kept in the cache, named by the weights'
        checksum: the bundle's own directory stays as training wrote it, and may be read-only."""
        choice, cpu = resolve_backend_name(backend), torch.device("cpu")
        if threads:
            torch.set_num_threads(threads)
        model_dir = resolve_model_dir(source, workspace)
        bundle = load_bundle(model_dir)
        common = {"threads": threads, "fingerprint": weights_sha256(bundle)}
        size = bundle.preprocessing.image_size
        hit = remembered_backend(bundle.model, cpu, (3, size, size), **common) if choice == AUTO else None
        if hit is None:  # measure (auto) or check (a named backend) on the job's own photos
            example, real_photos = example_batch(bundle, model_dir)
            hit = choose_backend(bundle.model, example, cpu, choice, remember=real_photos, **common)
        return cls(bundle, *hit, model_dir=model_dir)

    @property
    def image_size(self) -> int:
        return self.bundle.preprocessing.image_size

    def preprocess(self, image: Image.Image) -> torch.Tensor:
        return self.transform(to_rgb(image))

    def tensor_from(
        self, read: Callable[[], bytes], suffix: str = "", max_pixels: int = MAX_IMAGE_PIXELS
    ) -> tuple[torch.Tensor | None, str | None]:
        """One file's preprocessed image, or why it is not usable (the reason, not an exception)."""
        try:
            with decode_image(read(), max_pixels, suffix) as image:
                return self.preprocess(image), None
        except BadImage as exc:
            return None, str(exc)
        except OSError as exc:
            return None, f"unreadable: {exc.strerror or exc}"

    def logits(self, tensors: list[torch.Tensor]) -> np.ndarray:
        return self.backend(torch.stack(tensors)).numpy()

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
            "chosen_by": self.choice.get("chosen_by"),
            "checked_against_fp32_eager": next(
                (
                    {k: t[k] for k in ("mean_cosine", "min_cosine", "top1_agreement")}
                    for t in self.choice.get("trials", [])
                    if t["name"] == self.backend.name
                ),
                None,
            ),  # fmt: skip
            # the job's name, not the server's path to it: answers carry no absolute paths
            "job": self.bundle.manifest.get("job") or (self.model_dir.parent.name if self.model_dir else None),
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
