"""Inference paths for a frozen backbone or a whole classifier, chosen by measurement on this device.

Paths (each takes a float32 NCHW batch and returns float32 outputs on the CPU):

- `eager`: the module as it is, fp32, NCHW: the reference every other path is checked against;
- `channels_last`: fp32 with channels-last memory format (oneDNN's preferred layout on CPUs);
- `bf16`: channels-last under bfloat16 autocast, where the CPU (AVX512-BF16/AMX) or GPU supports it;
- `onnx`: ONNX Runtime on an export of the module (the torch.export-based exporter);
- `compile`: torch.compile of the channels-last module (compiling takes tens of seconds on a small CPU, so
  `auto` leaves it out unless asked).

`choose_path` times each candidate on an example batch of real inputs, keeps those whose outputs agree with
fp32 eager within FEATURE_AGREEMENT (cosine similarity per sample), and takes the fastest. The choice is
remembered per device, torch version, architecture, weights and input shape in the cache, so it is measured
once per model.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import platform
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from imgtune.core.errors import ConfigError
from imgtune.core.io import atomic_output, atomic_write_json, cache_dir

PATHS = ("eager", "channels_last", "bf16", "onnx", "compile")
AUTO_CANDIDATES = ("channels_last", "bf16", "onnx")
CHOICES = (*PATHS, "auto")
# Outputs must stay this close to fp32 eager's on the example batch: mean cosine similarity over samples,
# and the lowest single sample's. (bf16 on MobileNetV2 falls short: its features' mean cosine is 0.995, its
# logits' 0.9989, and 0.8% of dogs-mini's top-1 answers change, so it is rejected there.)
FEATURE_AGREEMENT = {"mean_cosine": 0.999, "min_cosine": 0.995}


class PathUnavailable(Exception):
    """This path cannot run here (no bf16 support, no CUDA provider ...)."""


def bf16_supported(device: torch.device) -> bool:
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return device.type == "cpu" and bool(torch.backends.mkldnn.is_available()) and _cpu_has_bf16()


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


class InferencePath:
    """A float32 NCHW batch in, float32 outputs (on the CPU) out."""

    name = "path"

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class TorchPath(InferencePath):
    def __init__(
        self,
        name: str,
        module: nn.Module,
        device: torch.device,
        channels_last: bool = False,
        autocast: torch.dtype | None = None,
        compiled: bool = False,
    ):
        self.name = name
        self.device = device
        self.channels_last = channels_last
        self.autocast = autocast
        module = module.eval().to(device)
        if channels_last:
            module = module.to(memory_format=torch.channels_last)
        self.module = torch.compile(module) if compiled else module

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        batch = batch.to(self.device, non_blocking=True)
        if self.channels_last:
            batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            context = (
                torch.autocast(self.device.type, dtype=self.autocast) if self.autocast else contextlib.nullcontext()
            )
            with context:
                return self.module(batch).float().cpu()


class OnnxPath(InferencePath):
    name = "onnx"

    def __init__(self, onnx_file: Path, device: torch.device, threads: int | None = None):
        import onnxruntime as ort

        providers = ["CPUExecutionProvider"]
        if device.type == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise PathUnavailable("ONNX Runtime here has no CUDA provider")
            providers.insert(0, "CUDAExecutionProvider")
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.log_severity_level = 3  # errors only: its graph-optimisation notes are not the user's business
        if threads:
            options.intra_op_num_threads = threads
        self.session = ort.InferenceSession(str(onnx_file), options, providers=providers)
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        output = self.session.run(None, {self.input_name: batch.detach().cpu().contiguous().numpy()})[0]
        return torch.from_numpy(output)


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


def make_path(
    name: str,
    module: nn.Module,
    device: torch.device,
    *,
    image_size: int = 224,
    onnx_file: Path | None = None,
    threads: int | None = None,
) -> InferencePath:
    """Build one path; PathUnavailable when it cannot run on this device."""
    if name == "eager":
        return TorchPath("eager", module, device)
    if name == "channels_last":
        return TorchPath("channels_last", module, device, channels_last=True)
    if name == "bf16":
        if not bf16_supported(device):
            raise PathUnavailable(f"no bfloat16 support on {device_description(device)}")
        return TorchPath("bf16", module, device, channels_last=True, autocast=torch.bfloat16)
    if name == "compile":
        return TorchPath("compile", module, device, channels_last=True, compiled=True)
    if name == "onnx":
        if onnx_file is None:
            raise PathUnavailable("no place to keep the ONNX export")
        if not onnx_file.is_file():
            export_onnx(module, image_size, onnx_file)
        return OnnxPath(onnx_file, device, threads)
    raise ConfigError(f"unknown inference path {name!r}", f"use one of {', '.join(CHOICES)}")


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return f"cpu:{model}:{torch.get_num_threads()} threads"


def architecture_signature(module: nn.Module) -> str:
    """Which network this is (layer types, tensor names and shapes), whatever its weights."""
    digest = hashlib.sha256(type(module).__name__.encode())
    for name, tensor in module.state_dict().items():
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
    digest.update(str([type(m).__name__ for m in module.modules()]).encode())
    return digest.hexdigest()[:20]


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


@dataclass
class PathTrial:
    name: str
    ms_per_image: float | None = None
    mean_cosine: float | None = None
    min_cosine: float | None = None
    top1_agreement: float | None = None
    accepted: bool = False
    reason: str | None = None


def _time_per_image(path: InferencePath, batch: torch.Tensor, repeats: int) -> float | None:
    """Median time per image; the caller has run `path` on `batch` once already (the warm-up)."""
    if repeats < 1:
        return None
    timings = []
    for _ in range(repeats):
        started = time.perf_counter()
        path(batch)
        timings.append(time.perf_counter() - started)
    return 1000 * sorted(timings)[len(timings) // 2] / batch.shape[0]


def measure_paths(
    module: nn.Module,
    example: torch.Tensor,
    device: torch.device,
    candidates: tuple[str, ...] = AUTO_CANDIDATES,
    *,
    onnx_file: Path | None = None,
    repeats: int = 3,
    threads: int | None = None,
) -> tuple[list[PathTrial], dict[str, InferencePath]]:
    """Time each candidate on `example` and check its outputs against fp32 eager."""
    reference = TorchPath("eager", module, device)(example)
    trials, built = [], {}
    for name in candidates:
        trial = PathTrial(name)
        try:
            path = make_path(name, module, device, image_size=example.shape[-1], onnx_file=onnx_file, threads=threads)
            outputs = path(example)
            measured = agreement(outputs, reference)
            trial.mean_cosine, trial.min_cosine = measured["mean_cosine"], measured["min_cosine"]
            trial.top1_agreement = measured["top1_agreement"]
            trial.ms_per_image = _time_per_image(path, example, repeats)
            trial.accepted = agrees(measured)
            if trial.accepted:
                built[name] = path
            else:
                trial.reason = f"outputs differ from fp32 eager (mean cosine {trial.mean_cosine:.4f})"
        except PathUnavailable as exc:
            trial.reason = str(exc)
        except Exception as exc:  # an exporter or compiler failing on this model: use another path
            trial.reason = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"
        trials.append(trial)
    return trials, built


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


def choose_path(
    module: nn.Module,
    example: torch.Tensor,
    device: torch.device,
    choice: str = "auto",
    *,
    onnx_file: Path | None = None,
    record_file: Path | None = None,
    candidates: tuple[str, ...] = AUTO_CANDIDATES,
    threads: int | None = None,
    remember: bool = True,
    fingerprint: str | None = None,
) -> tuple[InferencePath, dict[str, Any]]:
    """The path to run `module` with: `choice` itself, or for `auto` the fastest that agrees with fp32 eager.

    `fingerprint`: of the module's weights, when the caller has one already (else they are hashed here).
    Returns the path and a summary (its name, and for `auto` every candidate's timing and agreement).
    """
    if choice not in CHOICES:
        raise ConfigError(f"unknown inference path {choice!r}", f"use one of {', '.join(CHOICES)}")
    if choice != "auto":
        trials, built = measure_paths(
            module, example, device, (choice,), onnx_file=onnx_file, repeats=0, threads=threads
        )
        if choice not in built:
            raise ConfigError(f"inference path {choice} cannot be used here: {trials[0].reason}", "use auto")
        return built[choice], {"path": choice, "chosen_by": "configuration", "trials": [asdict(trials[0])]}
    fingerprint = fingerprint or weights_fingerprint(module)
    input_shape = tuple(example.shape[1:])
    hit = remembered_path(
        module, device, input_shape, candidates=candidates, onnx_file=onnx_file, threads=threads,
        fingerprint=fingerprint, record_file=record_file,
    )  # fmt: skip
    if hit is not None:
        return hit
    trials, built = measure_paths(module, example, device, candidates, onnx_file=onnx_file, threads=threads)
    timed = [t for t in trials if t.accepted and t.ms_per_image is not None]  # (eager is always possible)
    if not timed:
        return TorchPath("eager", module, device), {"path": "eager", "chosen_by": "fallback", "trials": []}
    best = min(timed, key=lambda t: t.ms_per_image)
    summary = {"path": best.name, "chosen_by": "measurement", "trials": [asdict(t) for t in trials]}
    if remember:
        key = choice_key(module, device, input_shape, fingerprint)
        ChoiceRecord(record_file or default_record_file()).put(key, summary)
    return built[best.name], summary


def remembered_path(
    module: nn.Module,
    device: torch.device,
    input_shape: tuple[int, ...],
    *,
    candidates: tuple[str, ...] = AUTO_CANDIDATES,
    onnx_file: Path | None = None,
    threads: int | None = None,
    fingerprint: str | None = None,
    record_file: Path | None = None,
) -> tuple[InferencePath, dict[str, Any]] | None:
    """auto's remembered choice for this module on this device, built (no example needed); None when nothing
    is remembered, or the remembered path cannot run now."""
    remembered = _remembered(module, device, input_shape, fingerprint, record_file)
    if not remembered or remembered.get("path") not in candidates:
        return None
    try:
        size = input_shape[-1]
        path = make_path(remembered["path"], module, device, image_size=size, onnx_file=onnx_file, threads=threads)
    except PathUnavailable:
        return None
    return path, {**remembered, "chosen_by": "remembered measurement"}


def _remembered(
    module: nn.Module,
    device: torch.device,
    input_shape: tuple[int, ...],
    fingerprint: str | None,
    record_file: Path | None,
) -> dict[str, Any] | None:
    key = choice_key(module, device, input_shape, fingerprint)
    return ChoiceRecord(record_file or default_record_file()).get(key)


def choice_key(
    module: nn.Module, device: torch.device, input_shape: tuple[int, ...], fingerprint: str | None = None
) -> str:
    """Device, torch, the module's architecture and weights, and the input shape: a remembered choice was
    measured and checked on exactly this."""
    network = [architecture_signature(module), (fingerprint or weights_fingerprint(module))[:20]]
    return "|".join([device_description(device), torch.__version__, *network, str(input_shape)])


def weights_fingerprint(module: nn.Module, salt: str = "") -> str:
    """sha256 of a module's tensors (names, shapes, dtypes, bytes)."""
    digest = hashlib.sha256(salt.encode())
    for name, tensor in module.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return digest.hexdigest()


def known_path_name(
    module: nn.Module,
    choice: str,
    device: torch.device,
    input_shape: tuple[int, ...],
    *,
    fingerprint: str | None = None,
    record_file: Path | None = None,
) -> str | None:
    """The path `choice` resolves to without measuring: itself, or auto's remembered choice (None if none yet)."""
    if choice != "auto":
        return choice
    remembered = _remembered(module, device, input_shape, fingerprint, record_file)
    return remembered.get("path") if remembered else None


def default_record_file() -> Path:
    return cache_dir() / "inference" / "choices.json"
