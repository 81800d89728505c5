"""Time to write report.html for an hour-long job (target: under 10 s).

A real job is trained on dogs-mini (feature cache, MobileNetV2), then its records are stretched to what an
hour of training writes at the default settings: a system sample every 500 ms (7,200), 10 training steps a
second (36,000 step records plus the validation steps), a loss record per step in the debugger's store,
and 60 epochs of metrics. The report is then written with `imgtune report` (rules re-evaluated), timed.

    python benchmarks/report_speed.py | tee benchmarks/results/report_speed.txt
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from overhead import DOGS_MINI, MOBILENET_WEIGHTS, machine

from imgtune.config import build_config
from imgtune.profiler import analyze_job
from imgtune.report import write_report
from imgtune.runs.train import run_training_job
from imgtune.storage.jobs import Job

HOUR = 3600.0


def stretch_jsonl(path: Path, count: int, make) -> None:
    """Rewrite `path` with `count` records, the i-th made by `make(i, template)` from the file's records."""
    templates = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    with path.open("w") as out:
        for i in range(count):
            out.write(json.dumps(make(i, templates[i % len(templates)])) + "\n")


def stretch_to_an_hour(job: Job, steps_per_second: float, sample_interval: float) -> dict[str, int]:
    profiler = job.path / "profiler"
    start = json.loads((profiler / "system.jsonl").read_text().splitlines()[0])["t"]
    samples = int(HOUR / sample_interval)
    stretch_jsonl(profiler / "system.jsonl", samples, lambda i, r: {**r, "t": start + i * sample_interval})
    train_steps = int(HOUR * steps_per_second)
    per_epoch = train_steps // 60

    def step(i: int, r: dict) -> dict:
        phase = "train" if i % (per_epoch + per_epoch // 5) < per_epoch else "valid"
        return {**r, "phase": phase, "epoch": 1 + i // (per_epoch + per_epoch // 5), "batch": i, "step": i}

    step_records = train_steps + train_steps // 5
    stretch_jsonl(profiler / "steps.jsonl", step_records, step)
    tensors = job.path / "debugger" / "tensors.jsonl"
    stretch_jsonl(tensors, train_steps, lambda i, r: {**r, "mode": "train", "step": i, "mode_step": i, "name": "loss",
                                                       "collection": "losses", "v": 2.0 / (1 + i / 1000)})  # fmt: skip
    metrics = [json.loads(line) for line in job.metrics_file.read_text().splitlines()]
    with job.metrics_file.open("w") as out:
        for epoch in range(1, 61):
            out.write(json.dumps({**metrics[(epoch - 1) % len(metrics)], "epoch": epoch}) + "\n")
    timings = job.read()["timings"]
    job.update(timings={**timings, "training_loop": HOUR, "total": HOUR + timings["initialization"]})
    return {"system samples": samples, "step records": step_records, "loss records": train_steps, "epochs": 60}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps-per-second", type=float, default=10.0)
    args = parser.parse_args()
    print("report speed: an hour-long job's records, report written by `imgtune report`'s code path")
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IMGTUNE_CACHE"] = str(Path(tmp) / "cache")
        config = build_config(
            {
                "data": {"path": str(DOGS_MINI)},
                "model": {"backbone": "mobilenet_v2", "weights": str(MOBILENET_WEIGHTS)},
                "train": {"epochs": 5},
            }
        )
        job = run_training_job(config, workspace=Path(tmp) / "ws", progress=False)
        started = time.perf_counter()
        write_report(job)
        short = time.perf_counter() - started
        sizes = stretch_to_an_hour(job, args.steps_per_second, 0.5)
        print("stretched to one hour: " + ", ".join(f"{v:,} {k}" for k, v in sizes.items()))
        started = time.perf_counter()
        analyze_job(job)
        rules = time.perf_counter() - started
        started = time.perf_counter()
        path = write_report(job)
        report = time.perf_counter() - started
        print(f"  the real {job.read()['epochs_run']}-epoch job's report:  {short:6.2f} s")
        print(f"  hour-long job: profiler rules {rules:6.2f} s, report {report:6.2f} s, "
              f"total {rules + report:6.2f} s (target under 10 s; {path.stat().st_size / 1e6:.1f} MB)")  # fmt: skip


if __name__ == "__main__":
    main()
