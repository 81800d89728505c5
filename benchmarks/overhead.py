"""Shared by the overhead benchmarks: time the same training job with a feature on and off, in one process.

Each comparison runs one warm-up job (builds the feature cache, loads libraries), then alternates jobs
without and with the feature `repeats` times, and prints the median whole-job and training-loop times and
their ratios (with / without).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from imgtune.config import build_config
from imgtune.runs.train import run_training_job

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGTUNE_SHARED", ROOT.parent / "shared"))
DOGS_MINI = SHARED / "data/dogs-mini"
MOBILENET_WEIGHTS = SHARED / "weights/mobilenet_v2_imagenet_features.pth"


def arguments(doc: str) -> argparse.Namespace:
    """--data, --weights and --repeats, with the shared dogs-mini photos and MobileNetV2 weights as defaults."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--data", default=str(DOGS_MINI))
    parser.add_argument("--weights", default=str(MOBILENET_WEIGHTS))
    parser.add_argument("--repeats", type=int, default=5)
    return parser.parse_args()


def machine() -> str:
    """The machine in a line: architecture, cores, the CPU's model and whether it has bf16 natively, torch."""
    model, flags = platform.processor() or "unknown CPU", set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == (platform.processor() or "unknown CPU"):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    bf16 = "with native bf16" if flags & {"avx512_bf16", "amx_bf16"} else "without native bf16"
    return f"machine: {platform.machine()}, {os.cpu_count()} cores, {model} ({bf16}), torch {torch.__version__}"


def job_timings(raw: dict[str, Any], section: str, enabled: bool, workspace: Path) -> dict[str, float]:
    config = build_config({**raw, section: {**raw.get(section, {}), "enabled": enabled}})
    job = run_training_job(config, workspace=workspace, progress=False)
    return job.read()["timings"]


def compare(label: str, raw: dict[str, Any], section: str, repeats: int, workspace: Path) -> dict[str, float]:
    """Print and return the median timings with `section` off and on, and their ratios."""
    job_timings(raw, section, False, workspace)
    runs: dict[bool, list[dict[str, float]]] = {False: [], True: []}
    for _ in range(repeats):
        for enabled in (False, True):
            runs[enabled].append(job_timings(raw, section, enabled, workspace))
    print(label)
    medians = {}
    for key, name in (("total", "job total    "), ("training_loop", "training loop")):
        off = statistics.median(t[key] for t in runs[False])
        on = statistics.median(t[key] for t in runs[True])
        medians[key] = on / off
        print(f"  median {name} without {off:8.3f} s   with {on:8.3f} s   ratio {on / off:.3f}")
    return medians
