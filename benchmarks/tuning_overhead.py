"""What a tuning trial costs beyond its own work, in one run, each side from an empty feature cache:

- naive: the managed platform's recipe, 2 trials x 5 epochs, every epoch recomputing the frozen backbone on
  every image (train.feature_cache off; trials one by one on Ray Tune);
- imgtune: 100 trials x 5 epochs, then 1,000 trials x 5 epochs, on one shared feature cache (trials trained as
  batches of heads on long-lived Ray workers).

Random search over the default space (learning rate 0.001-0.1 log x batch size {16..256}), seed 0, 2 trials (or
workers) at once; MobileNetV2 with the shared weights, 224 px, on a stated subset of ../shared/data/imagewoof:
the first 60 train and 20 val photos of each of its 10 breeds (800 photos). Early stopping inside a trial is off
(each trial runs its 5 epochs).

Per trial it prints the overhead, the wall time a trial takes beyond its own work:
- in its worker: the trial's share of its worker's wall time while it ran (split evenly among the trials the
  worker held at each step: their work, writing their files, waiting for the driver) minus its own work, its
  share of its batch's training epochs (the median over trials; the target: at most 0.1 s);
- of the whole job: (job wall - feature cache) x workers / trials - the mean own work: Ray's and the workers'
  start-up, the driver's searcher, writing the trials' files, everything.
It also times the three views of the 1,000-trial job (tune show, the tuning report, the jobs list) and the
peak memory of the driver and of the workers.

    python benchmarks/tuning_overhead.py | tee benchmarks/results/tuning_overhead.txt
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import tempfile
import threading
import time
from pathlib import Path

import psutil
from overhead import MOBILENET_WEIGHTS, SHARED, machine
from tuning_shared_cache import subset

import imgtune
from imgtune.config import TuneOptions
from imgtune.runs.tune import run_tuning_job
from imgtune.storage.jobs import Job
from imgtune.tuning.space import DEFAULT_SPACE


class WorkerMemory:
    """Peak resident memory of the Ray workers that train trials, sampled every 0.2 s."""

    def __init__(self) -> None:
        self.peak: dict[int, int] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.2):
            for process in psutil.process_iter(["pid", "cmdline", "memory_info"]):
                cmdline = " ".join(process.info["cmdline"] or [])
                if cmdline.startswith("ray::") and ("TrialBatchWorker" in cmdline or "_trial" in cmdline):
                    rss = process.info["memory_info"].rss if process.info["memory_info"] else 0
                    self.peak[process.info["pid"]] = max(self.peak.get(process.info["pid"], 0), rss)

    def __enter__(self) -> WorkerMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def tune(data: Path, workspace: Path, cache: Path, trials: int, naive: bool, epochs: int) -> dict:
    os.environ["IMGTUNE_CACHE"] = str(cache)
    base = {
        "data": {"path": str(data), "num_workers": 0},
        "model": {"backbone": "mobilenet_v2", "weights": str(MOBILENET_WEIGHTS)},
        "train": {"epochs": epochs, "feature_cache": not naive, "early_stopping": {"enabled": False}},
        "debugger": {"enabled": False},
        "profiler": {"enabled": False, "report": False},
    }
    options = TuneOptions(base=base, space=DEFAULT_SPACE, strategy="random", max_trials=trials, max_parallel=2, seed=0)
    import plotly  # noqa: F401  (imported before the clock starts, as a view would find it)

    with WorkerMemory() as memory:
        started = time.perf_counter()
        job = run_tuning_job(options, workspace=workspace, progress=False)
        seconds = time.perf_counter() - started
    record = job.read()
    assert record["status"] == "completed" and record["trials_count"] == trials, record.get("error")
    own, in_worker = [], []
    for trial in record["trials"]:
        trial_record = Job(job.path / trial["job"]).read()
        timings = trial_record["timings"]
        if naive:  # its own work is the whole training job: the backbone on every image, every epoch
            own.append(timings["total"])
            continue
        own.append(timings["training_loop"])
        in_worker.append(timings["worker_share"] - timings["training_loop"])
    cache_seconds = record.get("feature_cache_seconds") or 0.0
    workers = options.max_parallel
    return {
        "seconds": seconds,
        "record": record,
        "job": job,
        "cache_seconds": cache_seconds,
        "own_median": statistics.median(own),
        "in_worker_median": statistics.median(in_worker) if in_worker else None,
        "whole_job": (seconds - cache_seconds) * workers / trials - statistics.mean(own),
        "worker_peak_mib": max(memory.peak.values(), default=0) / 2**20,
        "workers": len(memory.peak),
    }


def timed(call) -> float:
    started = time.perf_counter()
    call()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(SHARED / "data/imagewoof"))
    parser.add_argument("--train-per-class", type=int, default=60)
    parser.add_argument("--valid-per-class", type=int, default=20)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--sides", default="imgtune:100,imgtune:1000,naive:2")
    args = parser.parse_args()
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "imagewoof-subset"
        photos = subset(Path(args.data), data, {"train": args.train_per_class, "val": args.valid_per_class})
        print(f"tuning: random search over lr x batch size (seed 0), {args.epochs} epochs per trial, 2 at once; "
              f"imagewoof subset of {photos} photos ({args.train_per_class} train + {args.valid_per_class} val per "
              "breed), mobilenet_v2 224 px; each side from an empty feature cache")  # fmt: skip
        print(f"  {'side':34s} {'wall':>9s} {'cache':>7s} {'own work':>9s} {'overhead/trial':>15s} "
              f"{'(whole job)':>12s} {'best valid acc':>15s} {'worker peak':>12s}")  # fmt: skip
        results = {}
        for side in args.sides.split(","):
            kind, count = side.split(":")
            naive = kind == "naive"
            label = f"{kind}, {count} trials" + (" (backbone every epoch)" if naive else " (batched heads)")
            workspace, cache = Path(tmp) / side.replace(":", "-"), Path(tmp) / f"cache-{side}"
            r = tune(data, workspace, cache, int(count), naive, args.epochs)
            results[side] = r
            overhead = "-" if r["in_worker_median"] is None else f"{r['in_worker_median']:.3f} s"
            print(f"  {label:34s} {r['seconds']:7.1f} s {r['cache_seconds']:5.1f} s {r['own_median']:7.3f} s "
                  f"{overhead:>15s} {r['whole_job']:10.3f} s {r['record']['best']['objective']:15.4f} "
                  f"{r['worker_peak_mib']:8.0f} MiB", flush=True)  # fmt: skip
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"  driver peak memory (this process, all sides): {peak:.0f} MiB")
        naive = results.get("naive:2")
        for side, r in results.items():
            if naive is not None and side != "naive:2":
                print(f"  {side}: {r['seconds'] / naive['seconds']:.3f}x the naive 2 trials' wall time")
        if naive is not None and "imgtune:100" in results:
            ratio = results["imgtune:100"]["seconds"] / naive["seconds"]
            verdict = "met" if ratio <= 0.25 else "NOT met"
            print(f"  target 100 trials <= 0.25x naive 2 trials: {verdict} ({ratio:.3f}x)")
        if naive is not None and "imgtune:1000" in results:
            ratio = results["imgtune:1000"]["seconds"] / naive["seconds"]
            print(f"  target 1000 trials < 1x naive 2 trials: {'met' if ratio < 1 else 'NOT met'} ({ratio:.3f}x)")
        medians = [r["in_worker_median"] for r in results.values() if r["in_worker_median"] is not None]
        if medians:
            print(f"  target median per-trial overhead <= 0.1 s: {'met' if max(medians) <= 0.1 else 'NOT met'} "
                  f"({', '.join(f'{m:.3f} s' for m in medians)})")  # fmt: skip
        big = results.get("imgtune:1000")
        if big is not None:
            job, workspace = big["job"], big["job"].path.parent
            print("  views of the 1,000-trial job:")
            print(f"    tune show (tuning_summary)   {timed(lambda: imgtune.tuning_summary(job)):6.2f} s")
            seconds = timed(lambda: imgtune.write_report(job.name, workspace=workspace))
            size = (job.path / "report.html").stat().st_size / 1e6
            print(f"    tuning report (write_report) {seconds:6.2f} s, {size:.2f} MB (4.8 MB of it Plotly's script)")
            print(f"    jobs list (jobs_overview)    {timed(lambda: imgtune.jobs_overview(workspace)):6.2f} s")


if __name__ == "__main__":
    main()
