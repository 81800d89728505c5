"""`imgtune demo` from nothing: an empty cache and workspace, a new process, as on a fresh clone right after
`pip install`. The issue's target is under 5 minutes on a 2-core CPU; prints the wall time, its ratio to
the target, the pipeline's own step times and the peak memory of the process tree.

    python benchmarks/demo_time.py | tee benchmarks/results/demo_time.txt
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from overhead import machine

TARGET_SECONDS = 300.0


def main() -> None:
    print(machine())
    with tempfile.TemporaryDirectory(prefix="imgtune-demo-") as tmp:
        env = {**os.environ, "IMGTUNE_CACHE": str(Path(tmp) / "cache"), "IMGTUNE_WORKSPACE": str(Path(tmp) / "ws")}
        started = time.perf_counter()
        result = subprocess.run(
            [sys.executable, "-m", "imgtune", "demo", "--json"], env=env, capture_output=True, text=True, check=False
        )
        seconds = time.perf_counter() - started
    if result.returncode != 0:
        sys.exit(f"imgtune demo failed ({result.returncode}):\n{result.stderr[-3000:]}")
    summary = json.loads(result.stdout)
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print("imgtune demo, empty cache and workspace, one new process")
    share = seconds / TARGET_SECONDS
    print(f"  wall time            {seconds:7.1f} s   (target {TARGET_SECONDS:.0f} s; ratio to it {share:.2f})")
    print(f"  pipeline (in-job)    {summary['seconds']:7.1f} s   (the rest: interpreter, imports, sample data)")
    for step, step_seconds in summary["step_seconds"].items():
        print(f"    {step:<20} {step_seconds:7.1f} s")
    correct = sum(p["correct"] for p in summary["sample_predictions"])
    print(f"  test accuracy {summary['test_accuracy']:.4f}; endpoint samples right: {correct} of "
          f"{len(summary['sample_predictions'])}")  # fmt: skip
    print(f"  peak RSS of the largest process: {peak_mb:.0f} MB")


if __name__ == "__main__":
    main()
