"""Models from MLflow: `models:/NAME@ALIAS`, `models:/NAME/VERSION` (the registry) or any other MLflow model URI
(`runs:/RUN/model`, `models:/m-...`) that imgtune logged, as a bundle directory `deploy`, `predict`, `evaluate`
and `batch-transform` use like a job's.

Only imgtune's own models are taken (their pyfunc flavour names imgtune.tracking.pyfunc as its loader): the
bundle inside is read as any bundle is (safetensors, checksums from its manifest); nothing in the model runs.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import yaml

from imgtune.core.errors import JobError
from imgtune.core.io import cache_dir
from imgtune.tracking import require

MODEL_URI_PREFIXES = ("models:/", "runs:/")
LOADER_MODULE = "imgtune.tracking.pyfunc"


def is_model_uri(source: object) -> bool:
    return isinstance(source, str) and source.startswith(MODEL_URI_PREFIXES)


def fetch_bundle(uri: str) -> Path:
    """Download the MLflow model `uri` (from $MLFLOW_TRACKING_URI's store) and return its imgtune bundle."""
    require("mlflow", "mlflow")
    import mlflow
    from mlflow.exceptions import MlflowException

    downloads = cache_dir() / "mlflow-models"
    downloads.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix="model-", dir=downloads))
    try:
        root = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=str(target)))
    except MlflowException as exc:
        raise JobError(
            f"no MLflow model at {uri}: {exc.message.splitlines()[0]}",
            f"check the name, version or alias in the registry of {mlflow.get_tracking_uri()} "
            "(set MLFLOW_TRACKING_URI to the tracking server)",
        ) from None
    spec_file = root / "MLmodel"
    spec = yaml.safe_load(spec_file.read_text()) if spec_file.is_file() else {}
    flavors = spec.get("flavors") if isinstance(spec, dict) else None
    pyfunc = flavors.get("python_function") if isinstance(flavors, dict) else None
    pyfunc = pyfunc if isinstance(pyfunc, dict) else {}
    if pyfunc.get("loader_module") != LOADER_MODULE or not isinstance(pyfunc.get("data"), str):
        raise JobError(
            f"{uri} is not a model imgtune logged (no imgtune bundle in it)",
            "serve it with `mlflow models serve`, or give a model that an imgtune job with --mlflow logged",
        )
    bundle = (root / pyfunc["data"]).resolve()
    if root.resolve() not in bundle.parents or not (bundle / "manifest.json").is_file():
        raise JobError(f"the model at {uri} has no bundle manifest at {pyfunc['data']!r}")
    return bundle
