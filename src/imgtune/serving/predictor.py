"""A model bundle ready to answer: decoded images in, top-k classes (and raw logits) out.

The logits come from an inference backend (imgtune.models.backends): `auto` (the default) measures the
backends this device offers on the job's own photos and keeps the fastest that agrees with fp32 eager (fp32
backends by their outputs; quantized ones, `int8` and `openvino-int8`, calibrated on the job's training photos,
by their answers on its validation photos: top-1 agreement at least 99%, accuracy within half a point);
`torch` (fp32 channels-last), `onnx`, `int8`, `openvino`, `openvino-int8`, `bf16`, `eager` or `compile` name
one, which is still checked before it serves.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from imgtune.config import DataConfig
from imgtune.core.errors import ImgtuneError, JobError
from imgtune.core.resources import torch_device
from imgtune.data.check import MAX_IMAGE_PIXELS, BadImage, decode_image
from imgtune.data.dataset import Sample, prepare_data
from imgtune.data.transforms import load_image, to_rgb
from imgtune.models.backends import (
    AUTO,
    Backend,
    choose_backend,
    remembered_backend,
    resolve_backend_name,
)
from imgtune.models.bundle import WEIGHTS_FILE, Bundle, load_bundle
from imgtune.storage.jobs import Job

EXAMPLE_IMAGES = 16  # photos the backends are timed and checked on
CALIBRATION_IMAGES = 64  # training photos a quantized backend is calibrated on
VALIDATION_IMAGES = 256  # labelled validation photos a quantized backend is checked on (at most)

log = logging.getLogger("imgtune.serving")


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


@dataclass
class JobPhotos:
    """The job's own photos, preprocessed, for choosing a backend."""

    example: torch.Tensor  # backends are timed and their outputs checked on these
    calibration: torch.Tensor | None = None  # training photos, for quantizing backends
    validation: tuple[torch.Tensor, torch.Tensor] | None = None  # validation photos and their class indices


def job_photos(bundle: Bundle, model_dir: Path) -> JobPhotos | None:
    """Photos from the job's own dataset split as the job split it (training photos for calibration, labelled
    validation photos for checks); None when the dataset is not a local folder at hand."""
    job_file = model_dir.parent / "job.json"
    try:
        data_config = json.loads(job_file.read_text()).get("config", {}).get("data", {})
        if not Path(str(data_config.get("path", ""))).expanduser().is_dir():
            return None
        data = prepare_data(DataConfig.model_validate(data_config), progress=False)
    except (OSError, ValueError, ImgtuneError) as exc:
        log.info("the job's photos are not at hand (%s): backends are checked on noise", exc)
        return None
    transform = bundle.preprocessing.eval_transform()
    index_of = {c.id: i for i, c in enumerate(bundle.classes)}

    def preprocessed(samples: list[Sample], limit: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        images, targets = [], []
        for sample in samples[:: max(1, len(samples) // limit)][:limit]:  # spread over classes (sorted by label)
            class_id = data.classes[sample.label].id
            if class_id in index_of:
                images.append(transform(load_image(sample.path)))
                targets.append(index_of[class_id])
        return (torch.stack(images), torch.tensor(targets)) if images else None

    train = preprocessed(data.splits.get("train", []), CALIBRATION_IMAGES)
    validation = preprocessed(data.splits.get("valid", []), VALIDATION_IMAGES)
    source = validation or train
    if source is None or len(source[0]) < 4:
        return None
    example = source[0][:: max(1, len(source[0]) // EXAMPLE_IMAGES)][:EXAMPLE_IMAGES]
    return JobPhotos(example, train[0] if train else None, validation)


def serving_device(name: str = "cpu") -> torch.device:
    """The device a model serves on: `auto` (a CUDA GPU when torch sees one, else the CPU), `cpu`, `cuda`, `cuda:N`."""
    return torch_device(name, "--device")


def noise_batch(bundle: Bundle) -> torch.Tensor:
    size = bundle.preprocessing.image_size
    return torch.randn(EXAMPLE_IMAGES, 3, size, size, generator=torch.Generator().manual_seed(0))


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
        cls,
        source: str | Path,
        backend: str = "auto",
        threads: int | None = None,
        workspace: str | Path | None = None,
        device: str = "cpu",
    ) -> Predictor:
        """From a job (name or directory, in the workspace) or a bundle directory, on `backend` (a name or alias
        of imgtune.models.backends, or auto) on `device` (see serving_device). The ONNX export, if any, is kept
        in the cache, named by the weights' checksum: the bundle's own directory stays as training wrote it, and
        may be read-only."""
        choice, where = resolve_backend_name(backend), serving_device(device)
        if threads:
            torch.set_num_threads(threads)
        model_dir = resolve_model_dir(source, workspace)
        bundle = load_bundle(model_dir)
        common = {"threads": threads, "fingerprint": weights_sha256(bundle)}
        size = bundle.preprocessing.image_size
        hit = remembered_backend(bundle.model, where, (3, size, size), **common) if choice == AUTO else None
        if hit is None:  # measure (auto) or check (a named backend) on the job's own photos
            photos = job_photos(bundle, model_dir)
            if photos is None:  # a choice measured on noise serves, but is not remembered
                log.warning("the job's photos are not at hand: the backend is checked on noise")
                photos = JobPhotos(noise_batch(bundle))
            hit = choose_backend(
                bundle.model, photos.example, where, choice, remember=photos.calibration is not None,
                calibration=photos.calibration, validation=photos.validation, **common,
            )  # fmt: skip
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
            "device": str(self.backend.device),
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
