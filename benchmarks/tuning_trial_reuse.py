"""What a tuning trial costs on Ray Tune beyond its own training: worker processes and per-trial setup.

One tuning job on ../shared/data/dogs-mini: random search over the default space (learning rate x batch size),
--trials trials x --epochs epochs, MobileNetV2 with the shared weights at --image-size px, 2 trials at once,
the feature cache warmed before the clock starts, debugger and profiler off. Trials run as Ray Tune function
trials, one training job each (the batched-heads path, where the tree has one, is switched off here: this
measures Ray Tune's trials). Prints the tuning job's wall time, the wall per trial (wall x parallel / trials),
each trial job's own total and initialization seconds (mean), and how many worker processes ran trials (the
trial jobs' recorded pids) and Ray started (worker logs in the session directory).

    python benchmarks/tuning_trial_reuse.py | tee benchmarks/results/tuning_trial_reuse.txt
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from overhead import MOBILENET_WEIGHTS, SHARED, machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=24)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--data", type=Path, default=SHARED / "data" / "dogs-mini")
    parser.add_argument("--weights", type=Path, default=MOBILENET_WEIGHTS)
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="trial-reuse-"))
    os.environ["IMGTUNE_CACHE"] = str(root / "cache")
    os.environ["RAY_TMPDIR"] = str(root / "ray")  # this run's Ray session (and worker logs) only

    import imgtune.runs.tune as tune_run
    from imgtune.config import TuneOptions, build_config
    from imgtune.training.setup import warm_feature_cache
    from imgtune.tuning.space import DEFAULT_SPACE

    if hasattr(tune_run, "_trains_batches"):
        tune_run._trains_batches = lambda *_: False  # measure Ray Tune's function trials

    base = {
        "data": {"path": str(args.data), "num_workers": 0, "image_size": args.image_size},
        "model": {"backbone": "mobilenet_v2", "weights": str(args.weights)},
        "train": {"epochs": args.epochs, "early_stopping": {"enabled": False}},
        "debugger": {"enabled": False},
        "profiler": {"enabled": False, "report": False},
    }
    warm_feature_cache(build_config(base), progress=False)
    options = TuneOptions(
        base=base, space=DEFAULT_SPACE, strategy="random", max_trials=args.trials, max_parallel=args.parallel, seed=0
    )
    started = time.perf_counter()
    job = tune_run.run_tuning_job(options, workspace=root / "runs", progress=False)
    wall = time.perf_counter() - started

    record = job.read()
    trials = [json.loads(p.read_text()) for p in (job.path / "trials").glob("*/job.json")]
    by_worker: dict[int, list[dict]] = {}
    for trial in sorted(trials, key=lambda r: r["started"]):
        by_worker.setdefault(trial["pid"], []).append(trial)
    first = [ts[0]["timings"]["initialization"] for ts in by_worker.values()]
    later = [t["timings"]["initialization"] for ts in by_worker.values() for t in ts[1:]]
    worker_logs = list((root / "ray").rglob("session_2*/logs/worker-*.out"))  # one per worker process
    statuses = [t["status"] for t in record["trials"]]

    def mean(values: list[float]) -> str:
        return f"{statistics.mean(values):8.2f} s" if values else "       - s"

    print(machine())
    print(f"{args.trials} random trials x {args.epochs} epochs, {args.image_size} px, {args.parallel} at once, warm")
    print(f"tuning job wall                {wall:8.1f} s  ({record['status']}, trials {dict(Counter(statuses))})")
    print(f"wall per trial                 {wall * args.parallel / args.trials:8.2f} s  (wall x parallel / trials)")
    print(f"trial job total, mean          {mean([t['timings']['total'] for t in trials])}  (its own timings)")
    print(f"  initialization, first/worker {mean(first)}  (data, model, feature cache)")
    print(f"  initialization, later trials {mean(later)}")
    print(f"  training loop, mean          {mean([t['timings']['training_loop'] for t in trials])}")
    print(f"processes that ran trials      {len(by_worker):8d}    (distinct pids in the trial jobs' records)")
    print(f"Ray worker processes started   {len(worker_logs):8d}    (worker logs in the Ray session directory)")
    print(f"best valid_accuracy            {record['best']['objective']:8.4f}")


if __name__ == "__main__":
    main()
