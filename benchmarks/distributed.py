"""Data-parallel training on Ray Train, in one run: the same job as a single process, on 1 Ray Train worker and
on 2, each case in a fresh Python process (as `imgtune train` runs it: imports, Ray's start, the workers' start
all counted).

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


def fine_tune(data: str, weights: str, workers: int) -> dict[str, Any]:
    return {
        "data": {"path": data, "image_size": 128},
        "model": {"backbone": "mobilenet_v2", "weights": weights, "freeze": "none"},
        "train": {"epochs": 3, "batch_size": 32, "workers": workers},
    }


def frozen(data: str, weights: str, workers: int) -> dict[str, Any]:
    return {
        "data": {"path": data},
        "model": {"backbone": "mobilenet_v2", "weights": weights},
        "train": {"epochs": 1, "workers": workers},
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
        "train_images_per_s": train_images * len({s["epoch"] for s in later}) / sum(s["total"] for s in later),
        "valid_loss": metrics[-1]["valid_loss"],
        "valid_accuracy": metrics[-1]["valid_accuracy"],
        "log": [line for line in job.log_file.read_text().splitlines() if "workers" in line][-2:],
    }


def in_fresh_process(args: argparse.Namespace, kind: str, case: str, root: Path) -> dict[str, Any]:
    workspace = root / f"ws-{kind}-{list(CASES).index(case)}"
    env = {**os.environ, "IMGTUNE_CACHE": str(root / f"cache-{kind}-{list(CASES).index(case)}")}
    command = [sys.executable, __file__, "--case", case, "--kind", kind, "--workspace", str(workspace)]
    command += ["--data", args.data, "--weights", args.weights]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise SystemExit(f"{kind} / {case} failed:\n{result.stderr[-4000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(DOGS_MINI))
    parser.add_argument("--weights", default=str(MOBILENET_WEIGHTS))
    parser.add_argument("--case", choices=list(CASES), help=argparse.SUPPRESS)  # one case, in a child process
    parser.add_argument("--kind", choices=["fine-tune", "features"], help=argparse.SUPPRESS)
    parser.add_argument("--workspace", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.case:
        workers, ray_train = CASES[args.case]
        make = fine_tune if args.kind == "fine-tune" else frozen
        print(json.dumps(run_case(make(args.data, args.weights, workers), ray_train, Path(args.workspace))))
        return

    print(f"data-parallel training on Ray Train: {args.data}, mobilenet_v2, each case a fresh process")
    print(machine() + "; Ray Train workers: 1 CPU each (train.cpus_per_worker), gloo")
    with tempfile.TemporaryDirectory(prefix="imgtune-bench-dp-") as tmp:
        root = Path(tmp)
        print("\n1. fine-tune, every layer trained: 128 px, global batch 32, 3 epochs (300 train / 100 valid images)")
        tuned = {case: in_fresh_process(args, "fine-tune", case, root) for case in CASES}
        for case, r in tuned.items():
            epochs = ", ".join(f"{t:.1f}" for t in r["epoch_times"])
            print(
                f"  {case:20s} job {r['wall']:6.1f} s   epochs {epochs} s   training {r['train_images_per_s']:5.1f} "
                f"images/s   valid loss {r['valid_loss']:.4f} "
                f"accuracy {r['valid_accuracy']:.3f}   [{r['status']}]"
            )
        base = tuned["single process"]
        for case in list(CASES)[1:]:
            r = tuned[case]
            later = statistics.median(r["epoch_times"][1:]) / statistics.median(base["epoch_times"][1:])
            print(
                f"  {case} vs single process: epoch time (epochs 2-3, median) {later:.3f}x, whole job "
                f"{r['wall'] / base['wall']:.3f}x (+{r['wall'] - base['wall']:.1f} s: Ray's and the workers' "
                f"start, checkpoints through Ray Train), training images/s "
                f"{r['train_images_per_s'] / base['train_images_per_s']:.3f}x"
            )

        print("\n2. feature cache of the default frozen-backbone job (224 px, 500 images), a fresh cache each")
        built = {case: in_fresh_process(args, "features", case, root) for case in CASES}
        for case, r in built.items():
            t = r["timings"]
            if "ray_train_features" in t:
                what = (
                    f"workers' group {t['ray_train_features']:6.1f} s (of which rank 0 inside its worker "
                    f"{t.get('feature_cache_on_workers', 0):5.1f} s)"
                )
            else:
                what = f"feature cache {t.get('feature_cache', 0):6.1f} s"
            print(f"  {case:20s} job {r['wall']:6.1f} s   {what}   [{r['status']}]")
        base_t = built["single process"]["timings"]["feature_cache"]
        for case in list(CASES)[1:]:
            t = built[case]["timings"]
            print(f"  {case} vs single process: cache build {t['ray_train_features'] / base_t:.3f}x")
        print(
            "\nOn 2 cores, 2 workers share the cores one process had: this shows the distributed path's costs (Ray "
            "and worker start, gradient all-reduce, per-rank loaders), not a speed-up; a speed-up needs a core, "
            "GPU or node per worker."
        )


if __name__ == "__main__":
    main()
