"""The model bundle: weights as safetensors plus a manifest. Loading never unpickles anything.

model/
  model.safetensors   every tensor of the ImageClassifier (backbone and head)
  manifest.json       architecture, labels, preprocessing, metrics, versions, sha256 of each file
  job-config.json     (a bundle that left its job: an MLflow model) the job's resolved config, for evaluation
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from imgtune.core.errors import JobError
from imgtune.core.io import atomic_output, atomic_write_json, now_iso
from imgtune.core.version import __version__
from imgtune.data.folders import ClassInfo
from imgtune.data.transforms import Preprocessing
from imgtune.models.factory import ImageClassifier, ModelSpec, create_model
from imgtune.models.weights import sha256_file

BUNDLE_FORMAT = 1
WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "manifest.json"
JOB_CONFIG_FILE = "job-config.json"  # beside a bundle that left its job: how its data was split and loaded


@dataclass
class Bundle:
    model: ImageClassifier
    classes: list[ClassInfo]
    preprocessing: Preprocessing
    manifest: dict[str, Any]


def save_bundle(
    model: ImageClassifier,
    classes: list[ClassInfo],
    preprocessing: Preprocessing,
    directory: Path,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write the bundle into `directory` atomically (weights first, the manifest last)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights = directory / WEIGHTS_FILE
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    with atomic_output(weights) as tmp:
        save_file(state, str(tmp), metadata={"format": "imgtune", "version": str(BUNDLE_FORMAT)})
    manifest = {
        "format": BUNDLE_FORMAT,
        "created": now_iso(),
        "imgtune_version": __version__,
        "torch_version": torch.__version__,
        "architecture": model.spec.to_dict(),
        "num_features": model.num_features,
        "norm": {k: list(v) if isinstance(v, tuple) else v for k, v in model.norm.items()},
        "labels": [{"index": i, "id": c.id, "name": c.name} for i, c in enumerate(classes)],
        "preprocessing": preprocessing.to_dict(),
        "files": {WEIGHTS_FILE: {"sha256": sha256_file(weights), "bytes": weights.stat().st_size}},
        **(extra or {}),
    }
    atomic_write_json(directory / MANIFEST_FILE, manifest)
    return directory


def load_bundle(directory: str | Path, device: str | torch.device = "cpu") -> Bundle:
    """Rebuild the model from a bundle, after checking each file's sha256 against the manifest.

    Raises:
        JobError: the bundle is missing, incomplete or does not match its checksums.
    """
    directory = Path(directory)
    manifest_path = directory / MANIFEST_FILE
    if not manifest_path.is_file():
        raise JobError(f"no model bundle in {directory} ({MANIFEST_FILE} missing)", "has the job finished?")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as exc:
        raise JobError(
            f"{manifest_path} is not valid JSON: {exc}", "the bundle is damaged; retrain or restore it"
        ) from None
    if manifest.get("format") != BUNDLE_FORMAT:
        raise JobError(f"model bundle {directory} has format {manifest.get('format')}, expected {BUNDLE_FORMAT}")
    for name, meta in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise JobError(f"model bundle {directory} is missing {name}")
        if sha256_file(path) != meta["sha256"]:
            raise JobError(f"{path} does not match the checksum in {MANIFEST_FILE}", "the file is damaged")
    arch = ModelSpec(**manifest["architecture"])
    model = create_model(
        arch.backbone,
        arch.num_classes,
        arch.head,
        arch.freeze,
        pretrained="none",
        head_hidden=arch.head_hidden,
        dropout=arch.dropout,
    )
    state = load_file(str(directory / WEIGHTS_FILE))
    model.load_state_dict(state, strict=True)
    model.norm = {k: tuple(v) if isinstance(v, list) else v for k, v in manifest.get("norm", {}).items()} or model.norm
    model.to(device).eval()
    classes = [ClassInfo(label["id"], label["name"]) for label in manifest["labels"]]
    return Bundle(model, classes, Preprocessing.from_dict(manifest["preprocessing"]), manifest)
