"""Training, the profiler and the report on a CUDA GPU, against the same jobs on the CPU.

What is checked is behaviour, not only that a job ends: autocast runs the forward pass in fp16 (with a working
gradient scaler) or bf16, inputs arrive pinned and on the GPU, and the job's accuracy matches the CPU job's
within stated tolerances; the profiler's samples carry the GPU's utilisation and memory, its trace has CUDA
kernels, the GPU rules are evaluated (not NotApplicable), and the report shows the GPU plots and kernels.

The tolerances (not yet confirmed on a GPU; the README's GPU section says where they stand):
- test accuracy on dogs-mini's 100 test photos: within ACCURACY_TOLERANCE of the CPU job's (6 photos) when the
  network trains on images under autocast, FEATURE_ACCURACY_TOLERANCE (4 photos) on cached features;
- the first epoch's mean training loss, which the same seed, initial weights and batch order make comparable
  step by step: within LOSS_TOLERANCE (relative) of the CPU job's.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from imgtune.config import build_config
from imgtune.core.io import read_jsonl
from imgtune.runs.train import run_training_job
from imgtune.storage.jobs import Job
from imgtune.training.callbacks import Callback

pytestmark = [pytest.mark.gpu]

ACCURACY_TOLERANCE = 0.06
FEATURE_ACCURACY_TOLERANCE = 0.04
LOSS_TOLERANCE = 0.08
GPU_RULES = ("LowGPUUtilization", "CPUBottleneck", "IOBottleneck", "BatchSize", "GPUMemoryIncrease")


def image_job(dogs_mini: Path, weights: Path, device: str, precision: str, **extra: Any) -> dict[str, Any]:
    """MobileNetV2 with its last stage and head trained on images (no feature cache), seeded."""
    raw: dict[str, Any] = {
        "data": {"path": str(dogs_mini), "image_size": 96, "num_workers": 2},
        "model": {"backbone": "mobilenet_v2", "weights": str(weights), "freeze": "all_but_last"},
        "train": {
            "epochs": 3, "batch_size": 32, "lr": 0.001, "feature_cache": False, "device": device,
            "mixed_precision": precision, "seed": 0,
        },
        "debugger": {"enabled": False},
        "profiler": {"enabled": False, "report": False},
    }  # fmt: skip
    for section, values in extra.items():
        raw[section] = {**raw.get(section, {}), **values}
    return raw


class Observed(Callback):
    """What the Trainer really did: its device and autocast, where and in what dtype tensors were, the scaler."""

    order = 99

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {"scales": []}

    def on_fit_start(self, trainer) -> None:
        loader = trainer.loaders["train"]
        self.seen.update(
            device=trainer.device.type,
            amp_dtype=trainer.amp_dtype,
            scaler=trainer.scaler.is_enabled(),
            parameters=next(p for p in trainer.module.parameters() if p.requires_grad).device.type,
            pin_memory=getattr(loader, "pin_memory", None),
        )

    def on_after_forward(self, trainer) -> None:
        if trainer.phase == "train" and "output_dtype" not in self.seen:
            self.seen.update(output_dtype=trainer.outputs.dtype, input_device=trainer.inputs.device.type)

    def on_after_step(self, trainer) -> None:
        if trainer.scaler.is_enabled():
            self.seen["scales"].append(trainer.scaler.get_scale())


def train(raw: dict[str, Any], workspace: Path) -> tuple[Job, dict[str, Any]]:
    observer = Observed()
    job = run_training_job(build_config(raw), workspace=workspace, progress=False, callbacks=[observer])
    assert job.read()["status"] == "completed"
    return job, observer.seen


@pytest.fixture(scope="module")
def cpu_image_job(tmp_path_factory, dogs_mini, mobilenet_weights) -> Job:
    job, seen = train(image_job(dogs_mini, mobilenet_weights, "cpu", "off"), tmp_path_factory.mktemp("cpu"))
    assert seen["device"] == "cpu" and seen["amp_dtype"] is None
    return job


@pytest.mark.parametrize(
    ("precision", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16)], ids=["fp16", "bf16"]
)
def test_autocast_training_on_cuda_matches_the_cpu_job(
    cuda, cpu_image_job, tmp_path, dogs_mini, mobilenet_weights, precision, dtype
):
    job, seen = train(image_job(dogs_mini, mobilenet_weights, "cuda", precision), tmp_path)
    assert seen["device"] == "cuda" and seen["parameters"] == "cuda" and seen["input_device"] == "cuda"
    assert seen["amp_dtype"] == dtype and seen["output_dtype"] == dtype  # the forward pass ran under autocast
    assert seen["pin_memory"] is True  # host batches pinned, so the non-blocking copies are asynchronous
    if precision == "fp16":  # the gradient scaler runs, and settles: a few skipped steps at most, finite scale
        scales = seen["scales"]
        assert seen["scaler"] and len(scales) == job.read_metrics()[-1]["step"] == 30  # 3 epochs of 10 batches
        skipped = sum(1 for a, b in zip(scales, scales[1:], strict=False) if b < a)
        assert skipped <= 5 and math.isfinite(scales[-1]) and scales[-1] > 0, scales
    else:
        assert not seen["scaler"]  # bf16 keeps fp32's range: no loss scaling
    gpu, cpu = job.read(), cpu_image_job.read()
    assert gpu["training_mode"] == cpu["training_mode"] == "images"
    gpu_loss, cpu_loss = job.read_metrics()[0]["train_loss"], cpu_image_job.read_metrics()[0]["train_loss"]
    assert math.isfinite(gpu_loss) and abs(gpu_loss - cpu_loss) <= LOSS_TOLERANCE * cpu_loss, (gpu_loss, cpu_loss)
    assert abs(gpu["test"]["accuracy"] - cpu["test"]["accuracy"]) <= ACCURACY_TOLERANCE, (
        gpu["test"]["accuracy"],
        cpu["test"]["accuracy"],
    )
    assert gpu["test"]["accuracy"] > 0.5  # ten breeds: chance is 0.1


def test_frozen_backbone_features_on_cuda_match_the_cpu_job(cuda, tmp_path, monkeypatch, dogs_mini, mobilenet_weights):
    """The default path: the backbone's features computed once on the GPU (by the backend auto measures there),
    the head trained on them under autocast; each job with its own feature cache, so neither reads the other's."""
    results, observed = {}, {}
    for device in ("cpu", "cuda"):
        monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path / f"cache-{device}"))
        raw = {
            "data": {"path": str(dogs_mini), "image_size": 96, "num_workers": 2},
            "model": {"backbone": "mobilenet_v2", "weights": str(mobilenet_weights)},
            "train": {"epochs": 6, "lr": 0.003, "device": device},
            "debugger": {"enabled": False},
            "profiler": {"enabled": False, "report": False},
        }
        job, observed[device] = train(raw, tmp_path / f"ws-{device}")
        seen = observed[device]
        assert seen["device"] == device and seen["parameters"] == device and seen["input_device"] == device
        results[device] = job.read()
        assert results[device]["training_mode"] == "features"
        assert results[device]["feature_extraction"]["images"] == 500  # computed here, not read from a cache
    gpu = results["cuda"]
    assert observed["cpu"]["amp_dtype"] is None  # mixed_precision auto: off on the CPU, autocast on CUDA
    assert observed["cuda"]["amp_dtype"] in (torch.bfloat16, torch.float16)
    assert gpu["feature_backend"] in ("eager", "channels_last", "bf16", "onnx", "int8", "compile")
    difference = abs(gpu["test"]["accuracy"] - results["cpu"]["test"]["accuracy"])
    assert difference <= FEATURE_ACCURACY_TOLERANCE, (gpu["test"], results["cpu"]["test"])


# -- the profiler, its rules and the report on a GPU ------------------------------------------------------------


@pytest.fixture(scope="module")
def profiled_gpu_job(cuda, tmp_path_factory, dogs_mini, mobilenet_weights) -> Job:
    short = {"patience": 0}
    raw = image_job(
        dogs_mini,
        mobilenet_weights,
        "cuda",
        "auto",
        data={"image_size": 160},
        train={"epochs": 4},
        profiler={
            "enabled": True,
            "report": True,
            "interval_ms": 100,
            "trace_start_step": 2,
            "trace_steps": 3,
            "trace_max_share": 1,
            "rule_parameters": {
                "LowGPUUtilization": {**short, "window": 5},
                "CPUBottleneck": short,
                "IOBottleneck": short,
                "BatchSize": {**short, "window": 5},
                "GPUMemoryIncrease": {**short, "window": 3},
            },
        },
    )
    job, _ = train(raw, tmp_path_factory.mktemp("profiled"))
    return job


def test_profiler_samples_carry_gpu_utilisation_and_memory(profiled_gpu_job: Job):
    directory = profiled_gpu_job.path / "profiler"
    meta = json.loads((directory / "meta.json").read_text())
    assert meta["device"].startswith("cuda") and meta["gpu_count"] >= 1 and meta["pin_memory"] is True
    samples = list(read_jsonl(directory / "system.jsonl"))
    assert len(samples) >= 10
    assert all(len(s.get("gpus", [])) == meta["gpu_count"] for s in samples)  # every sample, every GPU it may use
    gpu = [s["gpus"][0] for s in samples]
    assert all(g["mem_total"] > 0 and 0 <= g["util"] <= 100 for g in gpu)
    assert max(g["mem_used"] for g in gpu) > 0
    assert max(g["util"] for g in gpu) > 0  # the GPU did work while it was sampled
    train = [s for s in read_jsonl(directory / "steps.jsonl") if s["phase"] == "train"]
    assert train and all(s["forward"] > 0 and s["backward"] > 0 and s["h2d"] >= 0 for s in train)


def test_the_trace_has_cuda_kernels(profiled_gpu_job: Job):
    operators = json.loads((profiled_gpu_job.path / "profiler/operators.json").read_text())
    kernels = operators["kernels"]
    assert kernels and all(k["device_us"] >= 0 and k["calls"] > 0 for k in kernels)
    assert sum(k["device_us"] for k in kernels) > 0
    assert [k["device_us"] for k in kernels] == sorted((k["device_us"] for k in kernels), reverse=True)


def test_gpu_rules_are_evaluated_not_left_not_applicable(profiled_gpu_job: Job):
    rules = json.loads((profiled_gpu_job.path / "profiler/rules.json").read_text())
    for name in GPU_RULES:
        assert rules[name]["status"] in ("IssuesFound", "NoIssuesFound"), (name, rules[name])
        assert not rules[name]["message"].startswith("no GPU"), (name, rules[name]["message"])  # the GPU reading
    assert rules["GPUMemoryIncrease"]["message"].startswith("GPU memory")
    assert "not pinned" not in rules["Dataloader"]["message"]  # images on CUDA: pinned host memory
    usage = rules["OverallSystemUsage"]["details"]["table"]
    assert any(row["metric"] == "GPU 0 utilisation" and row["max"] > 0 for row in usage)


def test_the_report_shows_gpu_plots_and_kernels(profiled_gpu_job: Job):
    html = (profiled_gpu_job.path / "report.html").read_text()
    for marker in ("GPU (%)", "GPU 0 util", "GPU 0 memory %", "GPU 0 utilisation", "Top GPU kernels (by device time)"):
        assert marker in html, marker
    assert "GPU(s)" in html and " 0 GPU(s)" not in html
