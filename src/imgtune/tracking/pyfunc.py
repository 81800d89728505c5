"""imgtune's model bundle as an MLflow pyfunc model.

The MLflow model holds the bundle itself (model.safetensors + manifest.json, checked on load) as its data, and
names this module as its loader (`loader_module`): loading it imports imgtune and reads tensors, it never
unpickles anything from the artifact store. `mlflow.pyfunc.load_model(uri).predict(images)` and
`mlflow models serve -m URI --env-manager local` both run imgtune's Predictor (fp32 eager, the reference every
other backend is checked against).

Input: a DataFrame with a column `image` of encoded image bytes (JPEG, PNG, ...; base64 in JSON requests to
`mlflow models serve`, which MLflow decodes from the signature's `binary` type) or PIL images. Never a file path:
behind a server, a string comes from a request. Output: a DataFrame, one row per image: `label`, `class_id`,
`index` and `probability` of the most probable class.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from imgtune.models.bundle import JOB_CONFIG_FILE
from imgtune.storage.jobs import Job

EXAMPLE_MAX_BYTES = 200_000  # the input example stored with the model: one small photo of the job's own


class ImgtunePyfuncModel:
    """What `_load_pyfunc` returns: MLflow calls `predict`."""

    def __init__(self, bundle_dir: str | Path):
        from imgtune.serving.predictor import Predictor

        self.predictor = Predictor.load(bundle_dir, backend="eager")

    def predict(self, model_input: Any, params: dict[str, Any] | None = None) -> Any:
        import pandas as pd
        import torch

        images = _images(model_input)
        tensors = []
        for number, image in enumerate(images):
            tensor, problem = self._tensor(image)
            if tensor is None:
                from mlflow.exceptions import MlflowException
                from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

                raise MlflowException(f"image {number} is not usable: {problem}", INVALID_PARAMETER_VALUE)
            tensors.append(tensor)
        if not tensors:
            return pd.DataFrame({"label": [], "class_id": [], "index": [], "probability": []})
        with torch.inference_mode():
            rows = [self.predictor.classes(row, 1)[0] for row in self.predictor.logits(tensors)]
        return pd.DataFrame(
            {
                "label": [r["label"] for r in rows],
                "class_id": [r["id"] for r in rows],
                "index": [int(r["index"]) for r in rows],
                "probability": [float(r["probability"]) for r in rows],
            }
        )

    def _tensor(self, image: Any) -> tuple[Any, str | None]:
        from PIL import Image

        if isinstance(image, Image.Image):
            return self.predictor.preprocess(image), None
        if isinstance(image, bytes | bytearray | memoryview):
            data = bytes(image)
            return self.predictor.tensor_from(lambda: data)
        # never a path: behind `mlflow models serve`, a string is a request's, and must not open a server's file
        return None, f"expected encoded image bytes or a PIL image, got {type(image).__name__}"


def _images(model_input: Any) -> list[Any]:
    import numpy as np
    import pandas as pd

    if isinstance(model_input, pd.DataFrame):
        column = "image" if "image" in model_input.columns else model_input.columns[0]
        return list(model_input[column])
    if isinstance(model_input, dict) and "image" in model_input:
        value = model_input["image"]
        return list(value) if isinstance(value, list | tuple | np.ndarray) else [value]
    if isinstance(model_input, list | tuple | np.ndarray | pd.Series):
        return list(model_input)
    return [model_input]


def _load_pyfunc(data_path: str) -> ImgtunePyfuncModel:
    """MLflow's entry point for a `loader_module`: the bundle directory the model holds."""
    return ImgtunePyfuncModel(data_path)


def signature() -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("binary", "image")]),
        outputs=Schema(
            [ColSpec("string", "label"), ColSpec("string", "class_id"), ColSpec("long", "index"),
             ColSpec("double", "probability")]
        ),
    )  # fmt: skip


def input_example(job: Job) -> Any:
    """One small photo of the job's validation (or training) split, as the model's input example; None when the
    data is not at hand (a job trained elsewhere, on s3:// data)."""
    import pandas as pd

    from imgtune.data.check import IMAGE_SUFFIXES

    root = Path(((job.record().config or {}).get("data") or {}).get("path", ""))
    if not root.is_dir():
        return None
    for split in ("valid", "val", "train", ""):
        folder = root / split
        if not folder.is_dir():
            continue
        files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
        small = [p for p in files[:50] if p.stat().st_size <= EXAMPLE_MAX_BYTES]
        if small:
            return pd.DataFrame({"image": [small[0].read_bytes()]})
    return None


@contextlib.contextmanager
def pyfunc_model_arguments(job: Job) -> Iterator[dict[str, Any]]:
    """What `mlflow.pyfunc.log_model` needs besides the name: the bundle (with the job's config beside it, for
    `imgtune evaluate models:/...`) as data, this module as the loader."""
    from importlib.metadata import version

    with tempfile.TemporaryDirectory(prefix="imgtune-model-") as staging:
        bundle = Path(staging) / "bundle"
        shutil.copytree(job.model_dir, bundle)
        (bundle / JOB_CONFIG_FILE).write_text(json.dumps(job.record().config or {}, indent=2))
        yield {
            "loader_module": __name__,
            "data_path": str(bundle),
            "signature": signature(),
            "input_example": input_example(job),
            "pip_requirements": [f"imgtune=={version('imgtune')}", f"torch>={version('torch').split('+')[0]}"],
        }
