"""The original workflow's tuning two ways, in one run: naive (every trial recomputes the frozen backbone on
every image every epoch, as the managed platform's trials do) vs imgtune (one shared feature cache).

8 trials x 5 epochs, learning rate (0.001-0.1, log) x batch size {16..256}, random search with one seed, so
both sides try the same hyperparameters; MobileNetV2 with the shared weights at 224 px on a stated subset of
../shared/data/imagewoof (the first --train-per-class train and --valid-per-class val photos of each of the 10
breeds; the naive side over all 9,025 would take hours on 2 cores). Each side starts from an empty cache.
Prints both wall times, their ratio, and each side's best validation accuracy.

    python benchmarks/tuning_shared_cache.py | tee benchmarks/results/tuning_shared_cache.txt
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

from overhead import MOBILENET_WEIGHTS, SHARED, machine

from imgtune.config import TuneOptions
from imgtune.runs.tune import run_tuning_job
from imgtune.tuning.space import DEFAULT_SPACE


def subset(source: Path, target: Path, per_split: dict[str, int]) -> int:
    """Symlink the first N photos of each class of each split; returns how many."""
    count = 0
    for split, n in per_split.items():
        for class_dir in sorted(p for p in (source / split).iterdir() if p.is_dir()):
            out = target / split / class_dir.name
            out.mkdir(parents=True)
            for photo in sorted(class_dir.iterdir())[:n]:
                (out / photo.name).symlink_to(photo)
                count += 1
    if (source / "classes.tsv").exists():
        (target / "classes.tsv").symlink_to(source / "classes.tsv")
    return count


def tune(data: Path, workspace: Path, cache: Path, naive: bool, args: argparse.Namespace) -> tuple[float, dict]:
    os.environ["IMGTUNE_CACHE"] = str(cache)
    base = {
        "data": {"path": str(data), "num_workers": 0},
        "model": {"backbone": "mobilenet_v2", "weights": str(args.weights)},
        "train": {"epochs": args.epochs, "feature_cache": not naive, "early_stopping": {"enabled": False}},
        "debugger": {"enabled": False},
        "profiler": {"enabled": False, "report": False},
    }
    options = TuneOptions(
        base=base, space=DEFAULT_SPACE, strategy="random", max_trials=args.trials, max_parallel=2, seed=0
    )
    started = time.perf_counter()
    job = run_tuning_job(options, workspace=workspace, progress=False)
    return time.perf_counter() - started, job.read()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED / "data/imagewoof"))
    parser.add_argument("--weights", default=str(MOBILENET_WEIGHTS))
    parser.add_argument("--train-per-class", type=int, default=80)
    parser.add_argument("--valid-per-class", type=int, default=20)
    parser.add_argument("--trials", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=5)
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "imagewoof-subset"
        photos = subset(Path(args.data), data, {"train": args.train_per_class, "val": args.valid_per_class})
        print(f"tuning: {args.trials} trials x {args.epochs} epochs, lr x batch size (random, seed 0), 2 in parallel;"
              f" imagewoof subset of {photos} photos ({args.train_per_class} train + {args.valid_per_class} val"
              f" per breed), mobilenet_v2 224 px")  # fmt: skip
        results = {}
        for label, naive in (("imgtune, shared feature cache", False), ("naive, backbone every epoch", True)):
            seconds, record = tune(data, Path(tmp) / label[:5], Path(tmp) / f"cache-{label[:5]}", naive, args)
            best = record["best"]
            results[label] = seconds
            values = ", ".join(
                f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best["hyperparameters"].items()
            )
            print(f"  {label:32s} {seconds:8.1f} s   best valid accuracy {best['objective']:.4f}   ({values})")
        ratio = results["naive, backbone every epoch"] / results["imgtune, shared feature cache"]
        print(f"  speed-up: {ratio:.1f}x (target at least 20x)")


if __name__ == "__main__":
    main()
