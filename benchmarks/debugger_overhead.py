"""Time of the same training job with and without the default debugger, in one process run.

The job is `imgtune train` on dogs-mini with the shared MobileNetV2 weights and default settings (frozen
backbone, feature cache, 10 epochs, the default collections and five default rules). The feature cache is
built once by a warm-up job, then jobs with and without the debugger alternate, `--repeats` times each.
Two ratios are printed: whole job (what a user waits for) and training loop only (where the debugger works).
A second pair runs the same job for 50 epochs, where the debugger's fixed cost (the dense capture of the
first steps that PoorWeightInitialization needs) is spread over more steps. A third pair trains on images (`--set train.feature_cache=false`, all but the last stage frozen), where
steps are heavier.

    python benchmarks/debugger_overhead.py | tee benchmarks/results/debugger_overhead.txt
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
from pathlib import Path

import torch

from imgtune.config import build_config
from imgtune.training.job import run_training_job

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGTUNE_SHARED", ROOT.parent / "shared"))


def job_times(raw: dict, debugger: bool, workspace: Path) -> tuple[float, float]:
    config = build_config({**raw, "debugger": {"enabled": debugger}})
    job = run_training_job(config, workspace=workspace, progress=False)
    timings = job.read()["timings"]
    return timings["total"], timings["training_loop"]


def compare(label: str, raw: dict, repeats: int, workspace: Path) -> None:
    job_times(raw, False, workspace)  # warm-up: builds the feature cache, loads libraries
    runs: dict[bool, list[tuple[float, float]]] = {True: [], False: []}
    for _ in range(repeats):
        for debugger in (False, True):
            runs[debugger].append(job_times(raw, debugger, workspace))
    total = {d: statistics.median(t for t, _ in runs[d]) for d in runs}
    loop = {d: statistics.median(lp for _, lp in runs[d]) for d in runs}
    print(f"{label}")
    print(
        f"  median job total     without {total[False]:8.3f} s   with {total[True]:8.3f} s   "
        f"ratio {total[True] / total[False]:.3f}"
    )
    print(
        f"  median training loop without {loop[False]:8.3f} s   with {loop[True]:8.3f} s   "
        f"ratio {loop[True] / loop[False]:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED / "data/dogs-mini"))
    parser.add_argument("--weights", default=str(SHARED / "weights/mobilenet_v2_imagenet_features.pth"))
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    model = {"backbone": "mobilenet_v2", "weights": args.weights}
    print(f"debugger overhead: {args.data}, mobilenet_v2, {args.repeats} alternating runs each")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IMGTUNE_CACHE"] = str(Path(tmp) / "cache")
        compare(
            "frozen backbone, feature cache, 224 px, 10 epochs (the default job)",
            {"data": {"path": args.data}, "model": model, "train": {"epochs": 10}},
            args.repeats,
            Path(tmp) / "ws",
        )
        compare(  # the same job, longer: the debugger's fixed cost (dense capture of the first steps) amortised
            "frozen backbone, feature cache, 224 px, 50 epochs",
            {"data": {"path": args.data}, "model": model, "train": {"epochs": 50, "early_stopping": {"enabled": False}}},
            max(1, args.repeats // 2),
            Path(tmp) / "ws",
        )
        compare(
            "images, all but the last stage frozen, 96 px, 2 epochs",
            {
                "data": {"path": args.data, "image_size": 96},
                "model": {**model, "freeze": "all_but_last"},
                "train": {"epochs": 2, "feature_cache": False},
            },
            max(1, args.repeats // 2),
            Path(tmp) / "ws",
        )


if __name__ == "__main__":
    main()
