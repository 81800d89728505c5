"""Data-parallel training on Ray Train, in one run: the same job as a single process, on 1 Ray Train worker and
on 2, each case in a fresh Python process (as `imgtune train` runs it: imports, Ray's start, the workers' start
all counted) with the whole machine (one worker all its cores, two workers half each), in alternating rounds.

1. Fine-tune: MobileNetV2 (the shared ImageNet weights), every layer trained (`model.freeze=none`), dogs-mini
   (300 training, 100 validation images), 128 px, global batch 32, 3 epochs, default debugger and profiler.
   Printed per case: the job's wall time, its epoch times, training images/s (rank 0's training steps, from its
   profiler timeline) and the final validation metrics; then the ratios against the single process: the
   distributed path's overhead at 1 worker (target: at most 1.1x the single process per epoch) and 2 workers.
2. Feature cache: the default frozen-backbone job (224 px); the cache built by the single process, by 1 Ray
   Train worker and by 2 workers each taking a shard of the files (a fresh cache for each case).

    python benchmarks/distributed.py | tee benchmarks/results/distributed.txt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from overhead import DOGS_MINI, MOBILENET_WEIGHTS, machine

CASES = {"single process": (1, False), "1 Ray Train worker": (1, True), "2 Ray Train workers": (2, True)}
CORES = os.cpu_count() or 1  # each case has the whole machine: one worker all its cores, two workers half each


def fine_tune(data: str, weights: str, workers: int) -> dict[str, Any]:
    return {
        "data": {"path": data, "image_size": 128},
        "model": {"backbone": "mobilenet_v2", "weights": weights, "freeze": "none"},
        "train": {"epochs": 3, "batch_size": 32, "workers": workers, "cpus_per_worker": max(1, CORES // workers)},
    }


def frozen(data: str, weights: str, workers: int) -> dict[str, Any]:
    return {
        "data": {"path": data},
        "model": {"backbone": "mobilenet_v2", "weights": weights},
        "train": {"epochs": 1, "workers": workers, "cpus_per_worker": max(1, CORES // workers)},
    }


def run_case(raw: dict[str, Any], ray_train: bool, workspace: Path) -> dict[str, Any]:
    """In this (fresh) process: one job, and what the comparison reads from it."""
    from imgtune.config import build_config
    from imgtune.core.io import read_jsonl
    from imgtune.runs.train import run_training_job

    started = time.perf_counter()
    job = run_training_job(build_config(raw), workspace=workspace, progress=False, ray_train=ray_train)
    wall = time.perf_counter() - started
    record, metrics = job.read(), job.read_metrics()
    profiler = job.path / "profiler"
    steps_file = profiler / "steps.rank0.jsonl" if (profiler / "steps.rank0.jsonl").exists() else None
    steps = [s for s in read_jsonl(steps_file or profiler / "steps.jsonl") if s["phase"] == "train"]
    later = [s for s in steps if s["epoch"] > 1]  # the first epoch warms up
    train_images = record["dataset"]["images"]["train"]
    return {
        "status": record["status"],
        "wall": wall,
        "timings": record["timings"],
        "world_size": record.get("world_size") or 1,
        "epoch_times": [m["epoch_time"] for m in metrics],
        # the ranks step together: the job's training images over rank 0's time in its training steps
        "train_images_per_s": train_images * len({s["epoch"] for s in later}) / sum(s["total"] for s in later)
        if later
        else None,
        "valid_loss": metrics[-1]["valid_loss"],
        "valid_accuracy": metrics[-1]["valid_accuracy"],
        "log": [line for line in job.log_file.read_text().splitlines() if "workers" in line][-2:],
    }


def in_fresh_process(args: argparse.Namespace, kind: str, case: str, root: Path, run: int) -> dict[str, Any]:
    tag = f"{kind}-{list(CASES).index(case)}-{run}"
    env = {**os.environ, "IMGTUNE_CACHE": str(root / f"cache-{tag}")}  # a fresh cache for every job
    command = [sys.executable, __file__, "--case", case, "--kind", kind, "--workspace", str(root / f"ws-{tag}")]
    command += ["--data", args.data, "--weights", args.weights]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{kind} / {case} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def alternating(args: argparse.Namespace, kind: str, root: Path) -> dict[str, list[dict[str, Any]]]:
    """`args.repeats` rounds of every case, in turn (a slow spell of the machine hits each case alike)."""
    runs: dict[str, list[dict[str, Any]]] = {case: [] for case in CASES}
    for run in range(args.repeats):
        for case in CASES:
            runs[case].append(in_fresh_process(args, kind, case, root, run))
    return runs


def median(values: list[float]) -> float:
    return statistics.median(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DOGS_MINI))
    parser.add_argument("--weights", default=str(MOBILENET_WEIGHTS))
    parser.add_argument("--repeats", type=int, default=2, help="rounds of the cases, alternating")
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # one case, in a child process
    parser.add_argument("--kind", choices=["fine-tune", "features"], help=argparse.SUPPRESS)
    parser.add_argument("--workspace", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        workers, ray_train = CASES[args.case]
        make = fine_tune if args.kind == "fine-tune" else frozen
        print(json.dumps(run_case(make(args.data, args.weights, workers), ray_train, Path(args.workspace))))
        return

    print(f"data-parallel training on Ray Train: {args.data}, mobilenet_v2, {args.repeats} alternating rounds")
    print(f"{machine()}; every case a fresh process with the whole machine (1 worker: {CORES} CPUs, 2 workers:")
    print(f"{max(1, CORES // 2)} each, train.cpus_per_worker), gloo; medians over the rounds")
    with tempfile.TemporaryDirectory(prefix="imgtune-bench-dp-") as tmp:
        root = Path(tmp)
        print("\n1. fine-tune, every layer trained: 128 px, global batch 32, 3 epochs (300 train / 100 valid images)")
        tuned = alternating(args, "fine-tune", root)
        summary = {}
        for case, runs in tuned.items():
            for r in runs:
                t = r["timings"]
                epochs = ", ".join(f"{e:.1f}" for e in r["epoch_times"])
                ray = f"Ray Train {t['ray_train']:5.1f} s, " if "ray_train" in t else ""
                print(
                    f"  {case:20s} job {r['wall']:6.1f} s ({ray}loop {t['training_loop']:5.1f} s)   epochs {epochs} s  "
                    f" training {r['train_images_per_s']:5.1f} images/s   valid loss {r['valid_loss']:.3f} acc "
                    f"{r['valid_accuracy']:.2f}   [{r['status']}]"
                )
            summary[case] = {
                "wall": median([r["wall"] for r in runs]),
                "epoch": median([e for r in runs for e in r["epoch_times"][1:]]),  # epochs 2-3: warm
                "rate": median([r["train_images_per_s"] for r in runs]),
            }
        base = summary["single process"]
        for case in list(CASES)[1:]:
            mine = summary[case]
            print(
                f"  {case} vs single process: epoch time (epochs 2-3) {mine['epoch'] / base['epoch']:.3f}x "
                f"({mine['epoch']:.2f} vs {base['epoch']:.2f} s), training images/s "
                f"{mine['rate'] / base['rate']:.3f}x, "
                f"whole job {mine['wall'] / base['wall']:.3f}x ({mine['wall'] - base['wall']:+.1f} s: Ray's and the "
                "workers' start, checkpoints through Ray Train)"
            )

        print("\n2. feature cache of the default frozen-backbone job (224 px, 500 images), a fresh cache each")
        built = alternating(args, "features", root)
        seconds = {}
        for case, runs in built.items():
            for r in runs:
                t = r["timings"]
                if "ray_train_features" in t:
                    what = (
                        f"workers' group {t['ray_train_features']:6.1f} s (rank 0 inside its worker "
                        f"{t.get('feature_cache_on_workers', 0):5.1f} s)"
                    )
                else:
                    what = f"feature cache {t['feature_cache']:6.1f} s"
                print(f"  {case:20s} job {r['wall']:6.1f} s   {what}   [{r['status']}]")
            timings = [r["timings"] for r in runs]
            seconds[case] = median([t.get("ray_train_features", t["feature_cache"]) for t in timings])
        for case in list(CASES)[1:]:
            print(
                f"  {case} vs single process: cache build {seconds[case] / seconds['single process']:.3f}x "
                f"({seconds[case]:.1f} vs {seconds['single process']:.1f} s, the workers' start included)"
            )
        print(
            "\nOn 2 cores, 2 workers share the cores one process had: this shows what the distributed path costs "
            "(Ray's and the workers' start, the gradient all-reduce, a loader per rank), not a speed-up from more "
            "hardware, which needs a core, GPU or node per worker. No GPU was lent to this run."
        )


if __name__ == "__main__":
    main()
