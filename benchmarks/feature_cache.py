"""Per-epoch time of head training with and without the frozen-backbone feature cache, in one run.

Both jobs train the same head on the same data with the same backbone through `run_training_job`; the only
difference is `train.feature_cache`. Without the cache every epoch decodes, augments and runs every image
through the frozen backbone (what the original scripts did); with it the backbone runs once, before the
first epoch, and an epoch is a pass over feature vectors.

    python benchmarks/feature_cache.py [--data ../shared/data/dogs-mini] [--epochs 3] [--image-size 224]

Prints a table and the ratio; the output is saved in benchmarks/results/feature_cache.txt by the caller
(`... | tee benchmarks/results/feature_cache.txt`).
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
from imgtune.runs.train import run_training_job

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGTUNE_SHARED", ROOT.parent / "shared"))


def run(data: str, weights: str, epochs: int, image_size: int, feature_cache: bool, workspace: Path) -> dict:
    config = build_config(
        {
            "data": {"path": data, "image_size": image_size},
            "model": {"backbone": "mobilenet_v2", "weights": weights},
            "train": {
                "epochs": epochs,
                "feature_cache": feature_cache,
                "early_stopping": {"enabled": False, "restore_best": False},
            },
        }
    )
    job = run_training_job(config, workspace=workspace, progress=False)
    record = job.read()
    epoch_times = [m["epoch_time"] for m in job.read_metrics()]
    return {
        "epoch_times": epoch_times,
        "median_epoch": statistics.median(epoch_times),
        "cache_build": record["timings"]["feature_cache"],
        "total": record["timings"]["total"],
        "valid_accuracy": record["best"]["valid_accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED / "data/dogs-mini"))
    parser.add_argument("--weights", default=str(SHARED / "weights/mobilenet_v2_imagenet_features.pth"))
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=224)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IMGTUNE_CACHE"] = str(Path(tmp) / "cache")  # a cold cache: the build is measured too
        cached = run(args.data, args.weights, args.epochs, args.image_size, True, Path(tmp) / "ws")
        uncached = run(args.data, args.weights, args.epochs, args.image_size, False, Path(tmp) / "ws")

    print(
        f"feature cache benchmark: mobilenet_v2 (frozen) + mlp head, {args.data}, {args.image_size}px, "
        f"{args.epochs} epochs"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}"
    )
    print(f"{'':28}{'with cache':>14}{'without cache':>16}")
    print(
        f"{'epoch times (s)':28}{'/'.join(f'{t:.3f}' for t in cached['epoch_times']):>14}  "
        f"{'/'.join(f'{t:.2f}' for t in uncached['epoch_times']):>16}"
    )
    print(f"{'median epoch (s)':28}{cached['median_epoch']:>14.4f}{uncached['median_epoch']:>16.2f}")
    print(f"{'one-off cache build (s)':28}{cached['cache_build']:>14.2f}{'-':>16}")
    print(f"{'job total (s)':28}{cached['total']:>14.2f}{uncached['total']:>16.2f}")
    print(f"{'best valid accuracy':28}{cached['valid_accuracy']:>14.3f}{uncached['valid_accuracy']:>16.3f}")
    ratio = uncached["median_epoch"] / cached["median_epoch"]
    print(
        f"per-epoch speed-up with the cache: {ratio:.0f}x "
        f"(without / with = {uncached['median_epoch']:.2f} s / {cached['median_epoch']:.4f} s)"
    )
    print(
        f"whole-job speed-up: {uncached['total'] / cached['total']:.2f}x; the cache pays for itself after "
        f"{cached['cache_build'] / max(uncached['median_epoch'] - cached['median_epoch'], 1e-9):.2f} epochs"
    )


if __name__ == "__main__":
    main()
