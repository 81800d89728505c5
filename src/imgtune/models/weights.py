"""Reading weight files without unpickling code, and loading them with a report of what matched."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from imgtune.core.errors import WeightsError


@dataclass
class LoadReport:
    """What a state dict did and did not provide for a model."""

    source: str
    loaded: int = 0
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)  # "key: file shape vs model shape"
    ignored_missing: list[str] = field(default_factory=list)  # missing keys of the replaced classifier

    def summary(self) -> str:
        parts = [f"loaded {self.loaded} tensors from {self.source}"]
        for label, keys in (
            ("missing", self.missing),
            ("unexpected", self.unexpected),
            ("shape mismatch", self.mismatched),
        ):
            if keys:
                shown = ", ".join(keys[:4]) + (f" and {len(keys) - 4} more" if len(keys) > 4 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        return "; ".join(parts)

    def to_dict(self) -> dict:
        return {
            "source": self.source,
            "loaded": self.loaded,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "mismatched": self.mismatched,
            "ignored_missing": self.ignored_missing,
        }


def sha256_file(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from .safetensors, or from a torch file loaded with weights_only=True.

    Common wrappers ({"state_dict": ...}, {"model": ...}) and DataParallel's "module." prefix are undone.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise WeightsError(f"weights file not found: {path}", "check the path given to --weights")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsError(
            f"cannot read weights from {path}: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}",
            "pass a state dict saved with torch.save(model.state_dict()) or safetensors",
        ) from None
    for wrapper in ("state_dict", "model", "model_state_dict"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise WeightsError(f"{path} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in state.items()}


def load_matching(
    model: nn.Module, state: dict[str, torch.Tensor], source: str, ignore_prefixes: tuple[str, ...] = ()
) -> LoadReport:
    """Load the tensors of `state` that fit `model`; report the rest instead of failing on them.

    Raises:
        WeightsError: not a single tensor fits (the file is for another architecture).
    """
    own = model.state_dict()
    report = LoadReport(source=source)
    usable = {}
    for key, tensor in state.items():
        if key not in own:
            report.unexpected.append(key)
        elif own[key].shape != tensor.shape:
            report.mismatched.append(f"{key}: {tuple(tensor.shape)} vs {tuple(own[key].shape)}")
        else:
            usable[key] = tensor
    for key in own:
        if key not in state:
            target = report.ignored_missing if key.startswith(ignore_prefixes) else report.missing
            target.append(key)
    if not usable:
        raise WeightsError(
            f"none of the {len(state)} tensors in {source} fit this model",
            "is the file for the backbone you chose with --backbone?",
        )
    model.load_state_dict(usable, strict=False)
    report.loaded = len(usable)
    return report
