"""Choosing a backend by measurement: each candidate is timed on an example batch of real inputs and checked
against fp32 eager; `auto` takes the fastest that agrees and remembers it in the cache (per device, torch
version, architecture, weights and input shape), so a model is measured once per device.

Two checks: an fp32 backend's outputs must match fp32 eager's (FEATURE_AGREEMENT, cosine per sample); a lossy
(quantized) backend's answers must match on labelled validation photos (LOSSY_AGREEMENT: top-1 agreement with
fp32 eager, and accuracy no more than half a point lower). Without labelled photos a lossy backend is not
taken by `auto`; named, it serves, with a warning when it falls short."""

from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgtune.core.errors import ConfigError
from imgtune.core.io import atomic_write_json, cache_dir
from imgtune.models.backends.base import (
    Backend,
    BackendUnavailable,
    architecture_signature,
    device_description,
    weights_fingerprint,
)
from imgtune.models.backends.eager import EagerBackend
from imgtune.models.backends.registry import (
    AUTO,
    auto_candidates,
    backend_class,
    make_backend,
    resolve_backend_name,
)

# Outputs must stay this close to fp32 eager's on the example batch: mean cosine similarity over samples,
# and the lowest single sample's. (bf16 on MobileNetV2 falls short: its features' mean cosine is 0.995, its
# logits' 0.9989, and 0.8% of dogs-mini's top-1 answers change, so it is rejected there.)
FEATURE_AGREEMENT = {"mean_cosine": 0.999, "min_cosine": 0.995}
# A lossy backend's answers on labelled validation photos: the share of photos whose top-1 class equals fp32
# eager's, and the most accuracy it may lose against fp32 eager (0.005 = half a point).
LOSSY_AGREEMENT = {"top1_agreement": 0.99, "accuracy_drop": 0.005}
VALIDATION_BATCH = 32  # validation photos per forward pass

log = logging.getLogger("imgtune.backends")


def agreement(outputs: torch.Tensor, reference: torch.Tensor) -> dict[str, float]:
    """Cosine similarity per sample between two output batches (and top-1 agreement, for logits)."""
    a, b = outputs.flatten(1).double(), reference.flatten(1).double()
    cosine = torch.nn.functional.cosine_similarity(a, b, dim=1, eps=1e-12)
    return {
        "mean_cosine": float(cosine.mean()),
        "min_cosine": float(cosine.min()),
        "top1_agreement": float((a.argmax(1) == b.argmax(1)).double().mean()),
    }


def agrees(measured: dict[str, float]) -> bool:
    return all(measured[key] >= bound for key, bound in FEATURE_AGREEMENT.items())


def answers_agreement(logits: torch.Tensor, reference: torch.Tensor, targets: torch.Tensor) -> dict[str, float]:
    """How a lossy backend's answers compare with fp32 eager's on labelled photos: top-1 agreement, and both
    accuracies."""
    answers, expected = logits.argmax(1), reference.argmax(1)
    return {
        "top1_agreement": float((answers == expected).double().mean()),
        "accuracy": float((answers == targets).double().mean()),
        "reference_accuracy": float((expected == targets).double().mean()),
    }


def answers_agree(measured: dict[str, float]) -> bool:
    drop = measured["reference_accuracy"] - measured["accuracy"]
    return measured["top1_agreement"] >= LOSSY_AGREEMENT["top1_agreement"] and drop <= LOSSY_AGREEMENT[
        "accuracy_drop"
    ] + 1e-9  # fmt: skip


def _outputs_in_batches(backend: Backend, inputs: torch.Tensor) -> torch.Tensor:
    return torch.cat([backend(chunk) for chunk in inputs.split(VALIDATION_BATCH)])


@dataclass
class BackendTrial:
    name: str
    ms_per_image: float | None = None
    mean_cosine: float | None = None
    min_cosine: float | None = None
    top1_agreement: float | None = None
    accuracy: float | None = None  # lossy backends: on the labelled validation photos ...
    reference_accuracy: float | None = None  # ... and fp32 eager's on the same photos
    validation_images: int | None = None
    accepted: bool = False
    reason: str | None = None


def _time_per_image(backend: Backend, batch: torch.Tensor, repeats: int) -> float | None:
    """Median time per image; the caller has run `backend` on `batch` once already (the warm-up)."""
    if repeats < 1:
        return None
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        backend(batch)
        timings.append(time.perf_counter() - started)
    return 1000 * sorted(timings)[len(timings) // 2] / batch.shape[0]


def measure_backends(
    module: nn.Module,
    example: torch.Tensor,
    device: torch.device,
    candidates: tuple[str, ...] | None = None,
    *,
    repeats: int = 3,
    threads: int | None = None,
    fingerprint: str | None = None,
    calibration: torch.Tensor | None = None,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[list[BackendTrial], dict[str, Backend]]:
    """Time each candidate (default: auto's) on `example` and check it against fp32 eager: its outputs on
    `example`, or for a lossy backend its answers on `validation` (preprocessed photos and their class indices).
    `calibration`: real photos for quantizing backends (the job's training photos).

    Returns a trial per candidate, and the built backends that agree, by name."""
    candidates = auto_candidates() if candidates is None else candidates
    eager = EagerBackend(module, device)
    reference = eager(example)
    validation_reference: list[torch.Tensor] = []  # fp32 eager's logits on `validation`, once a lossy one needs them
    options = {"image_size": example.shape[-1], "threads": threads, "fingerprint": fingerprint}
    trials, built = [], {}
    for name in candidates:
        trial = BackendTrial(name)
        try:
            backend = make_backend(name, module, device, calibration=calibration, **options)
            outputs = backend(example)
            measured = agreement(outputs, reference)
            trial.mean_cosine, trial.min_cosine = measured["mean_cosine"], measured["min_cosine"]
            trial.top1_agreement = measured["top1_agreement"]
            trial.ms_per_image = _time_per_image(backend, example, repeats)
            if backend.lossy:
                _check_answers(trial, backend, eager, validation, validation_reference)
            else:
                trial.accepted = agrees(measured)
                if not trial.accepted:
                    trial.reason = f"outputs differ from fp32 eager (mean cosine {trial.mean_cosine:.4f})"
            if trial.accepted:
                built[name] = backend
        except BackendUnavailable as exc:
            trial.reason = str(exc)
        except Exception as exc:  # an exporter or compiler failing on this model: use another backend
            trial.reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        trials.append(trial)
    return trials, built


def _check_answers(
    trial: BackendTrial,
    backend: Backend,
    eager: Backend,
    validation: tuple[torch.Tensor, torch.Tensor] | None,
    reference: list[torch.Tensor],
) -> None:
    """A lossy backend's check: its answers on the labelled validation photos against fp32 eager's."""
    if validation is None or len(validation[0]) == 0:
        trial.reason = "a quantized backend is checked on labelled validation photos, and none are at hand"
        return
    photos, targets = validation
    if not reference:
        reference.append(_outputs_in_batches(eager, photos))
    measured = answers_agreement(_outputs_in_batches(backend, photos), reference[0], targets)
    trial.top1_agreement, trial.validation_images = measured["top1_agreement"], len(photos)
    trial.accuracy, trial.reference_accuracy = measured["accuracy"], measured["reference_accuracy"]
    trial.accepted = answers_agree(measured)
    if not trial.accepted:
        trial.reason = (
            f"answers differ from fp32 eager on {len(photos)} validation photos: top-1 agreement "
            f"{trial.top1_agreement:.1%} (needs {LOSSY_AGREEMENT['top1_agreement']:.0%}), accuracy "
            f"{trial.accuracy:.1%} against {trial.reference_accuracy:.1%}"
        )


class ChoiceRecord:
    """Remembered choices, one JSON file: key (device, torch, architecture, input shape) -> the trials."""

    def __init__(self, file: Path):
        self.file = file

    def read(self) -> dict[str, Any]:
        try:
            return json.loads(self.file.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def get(self, key: str) -> dict[str, Any] | None:
        return self.read().get(key)

    def put(self, key: str, value: dict[str, Any]) -> None:
        self.file.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(self.file, {**self.read(), key: value})


def choose_backend(
    module: nn.Module,
    example: torch.Tensor,
    device: torch.device,
    choice: str = AUTO,
    *,
    record_file: Path | None = None,
    candidates: tuple[str, ...] | None = None,
    threads: int | None = None,
    remember: bool = True,
    fingerprint: str | None = None,
    calibration: torch.Tensor | None = None,
    validation: tuple[torch.Tensor, torch.Tensor] | None = None,
) -> tuple[Backend, dict[str, Any]]:
    """The backend to run `module` with: `choice` itself (checked against fp32 eager, refused with a
    ConfigError when it disagrees or cannot run; a lossy one the user named serves with a warning when its
    answers fall short), or for `auto` the fastest candidate that agrees.

    `fingerprint`: of the module's weights, when the caller has one already (else they are hashed here).
    `remember`: keep auto's measured choice in the cache (not for a choice measured on noise, say).
    `calibration`, `validation`: see measure_backends.
    Returns the backend and a summary: `backend` (its name), `chosen_by` and the candidates' `trials`.
    """
    choice = resolve_backend_name(choice)
    checks = {"threads": threads, "fingerprint": fingerprint, "calibration": calibration, "validation": validation}
    if choice != AUTO:
        (trial,), built = measure_backends(module, example, device, (choice,), repeats=0, **checks)
        summary = {"backend": choice, "chosen_by": "configuration", "trials": [asdict(trial)]}
        if choice in built:
            return built[choice], summary
        if trial.mean_cosine is not None and backend_class(choice).lossy:  # it ran: named, it serves
            log.warning("backend %s serves as asked, but %s", choice, trial.reason)
            options = {"image_size": example.shape[-1], "threads": threads, "fingerprint": fingerprint}
            return make_backend(choice, module, device, calibration=calibration, **options), summary
        raise ConfigError(f"backend {choice} cannot be used here: {trial.reason}", "use auto")
    candidates = auto_candidates() if candidates is None else candidates
    fingerprint = fingerprint or weights_fingerprint(module)
    input_shape = tuple(example.shape[1:])
    hit = remembered_backend(
        module, device, input_shape, candidates=candidates, threads=threads, fingerprint=fingerprint,
        record_file=record_file,
    )  # fmt: skip
    if hit is not None:
        return hit
    trials, built = measure_backends(module, example, device, candidates, **{**checks, "fingerprint": fingerprint})
    timed = [t for t in trials if t.accepted and t.ms_per_image is not None]  # (eager is always possible)
    if not timed:
        return EagerBackend(module, device), {"backend": "eager", "chosen_by": "fallback", "trials": []}
    best = min(timed, key=lambda t: t.ms_per_image)
    summary = {"backend": best.name, "chosen_by": "measurement", "trials": [asdict(t) for t in trials]}
    if remember:
        key = choice_key(module, device, input_shape, fingerprint)
        ChoiceRecord(record_file or default_record_file()).put(key, summary)
    return built[best.name], summary


def remembered_backend(
    module: nn.Module,
    device: torch.device,
    input_shape: tuple[int, ...],
    *,
    candidates: tuple[str, ...] | None = None,
    threads: int | None = None,
    fingerprint: str | None = None,
    record_file: Path | None = None,
) -> tuple[Backend, dict[str, Any]] | None:
    """auto's remembered choice for this module on this device, built (no example needed); None when nothing
    is remembered, or the remembered backend cannot run now."""
    candidates = auto_candidates() if candidates is None else candidates
    remembered = _remembered(module, device, input_shape, fingerprint, record_file)
    if not remembered or remembered["backend"] not in candidates:
        return None
    options = {"image_size": input_shape[-1], "threads": threads, "fingerprint": fingerprint}
    try:
        backend = make_backend(remembered["backend"], module, device, **options)
    except BackendUnavailable:
        return None
    return backend, {**remembered, "chosen_by": "remembered measurement"}


def known_backend_name(
    module: nn.Module,
    choice: str,
    device: torch.device,
    input_shape: tuple[int, ...],
    *,
    fingerprint: str | None = None,
    record_file: Path | None = None,
) -> str | None:
    """The backend `choice` resolves to without measuring: itself, or auto's remembered choice (None if none
    yet)."""
    choice = resolve_backend_name(choice)
    if choice != AUTO:
        return choice
    remembered = _remembered(module, device, input_shape, fingerprint, record_file)
    return remembered["backend"] if remembered else None


def _remembered(
    module: nn.Module,
    device: torch.device,
    input_shape: tuple[int, ...],
    fingerprint: str | None,
    record_file: Path | None,
) -> dict[str, Any] | None:
    key = choice_key(module, device, input_shape, fingerprint)
    remembered = ChoiceRecord(record_file or default_record_file()).get(key)
    if remembered and "backend" not in remembered and "path" in remembered:  # remembered before the rename
        remembered = {"backend": remembered["path"], **{k: v for k, v in remembered.items() if k != "path"}}
    return remembered if remembered and remembered.get("backend") else None


def choice_key(
    module: nn.Module, device: torch.device, input_shape: tuple[int, ...], fingerprint: str | None = None
) -> str:
    """Device, torch, the module's architecture and weights, and the input shape: a remembered choice was
    measured and checked on exactly this."""
    network = [architecture_signature(module), (fingerprint or weights_fingerprint(module))[:20]]
    return "|".join([device_description(device), torch.__version__, *network, str(input_shape)])


def default_record_file() -> Path:
    return cache_dir() / "inference" / "choices.json"
