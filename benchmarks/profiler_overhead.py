"""Time of the same training job with and without the default profiler, in one process run.

The job is `imgtune train` on dogs-mini with the shared MobileNetV2 weights and default settings (frozen
backbone, feature cache, 10 epochs, debugger on): jobs with the profiler on (system monitor every 500 ms,
step timeline, a torch.profiler trace of 5 steps after 5, profiler rules at the end) and off alternate.
Ratios of the whole job and of the training loop are printed, and the report's rendering time (written after
the job, by both). A second pair trains on images (all but the last stage frozen), where steps are heavier.

    python benchmarks/profiler_overhead.py | tee benchmarks/results/profiler_overhead.txt
"""

from __future__ import annotations

import os
import statistics
import tempfile
import time
from pathlib import Path

from overhead import arguments, compare, machine

from imgtune.report import write_report
from imgtune.storage.jobs import list_jobs


def main() -> None:
    args = arguments(__doc__)
    model = {"backbone": "mobilenet_v2", "weights": args.weights}
    no_report = {"profiler": {"report": False}}  # the report is timed on its own below
    print(f"profiler overhead: {args.data}, mobilenet_v2, {args.repeats} alternating runs each")
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IMGTUNE_CACHE"] = str(Path(tmp) / "cache")
        workspace = Path(tmp) / "ws"
        compare(
            "frozen backbone, feature cache, 224 px, 10 epochs (the default job)",
            {"data": {"path": args.data}, "model": model, "train": {"epochs": 10}, **no_report},
            "profiler",
            args.repeats,
            workspace,
        )
        compare(
            "images, all but the last stage frozen, 96 px, 2 epochs",
            {
                "data": {"path": args.data, "image_size": 96},
                "model": {**model, "freeze": "all_but_last"},
                "train": {"epochs": 2, "feature_cache": False},
                **no_report,
            },
            "profiler",
            max(1, args.repeats // 2),
            workspace,
        )
        seconds = []
        for job in list(list_jobs(workspace))[-6:]:
            started = time.perf_counter()
            write_report(job)
            seconds.append(time.perf_counter() - started)
        print(
            f"report.html rendering (after the job): median {statistics.median(seconds):.2f} s over {len(seconds)} jobs"
        )


if __name__ == "__main__":
    main()
