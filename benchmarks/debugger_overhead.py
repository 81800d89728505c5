"""Time of the same training job with and without the default debugger, in one process run.

The job is `imgtune train` on dogs-mini with the shared MobileNetV2 weights and default settings (frozen
backbone, feature cache, 10 epochs, the default collections and five default rules). The feature cache is
built once by a warm-up job, then jobs with and without the debugger alternate, `--repeats` times each.
Two ratios are printed: whole job (what a user waits for) and training loop only (where the debugger works).
A second pair runs the same job for 50 epochs, where the debugger's fixed cost (the dense capture of the
first steps that PoorWeightInitialization needs) is spread over more steps. A third pair trains on images
(`--set train.feature_cache=false`, all but the last stage frozen), where steps are heavier. The profiler is
off in all of them, so that only the debugger's cost is measured (benchmarks/profiler_overhead.py measures it).

    python benchmarks/debugger_overhead.py | tee benchmarks/results/debugger_overhead.txt
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from overhead import arguments, compare, machine


def main() -> None:
    args = arguments(__doc__)
    model = {"backbone": "mobilenet_v2", "weights": args.weights}
    off = {"profiler": {"enabled": False}}
    print(f"debugger overhead: {args.data}, mobilenet_v2, {args.repeats} alternating runs each")
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IMGTUNE_CACHE"] = str(Path(tmp) / "cache")
        compare(
            "frozen backbone, feature cache, 224 px, 10 epochs (the default job)",
            {"data": {"path": args.data}, "model": model, "train": {"epochs": 10}, **off},
            "debugger",
            args.repeats,
            Path(tmp) / "ws",
        )
        compare(  # the same job, longer: the debugger's fixed cost (dense capture of the first steps) amortised
            "frozen backbone, feature cache, 224 px, 50 epochs",
            {
                "data": {"path": args.data},
                "model": model,
                "train": {"epochs": 50, "early_stopping": {"enabled": False}},
                **off,
            },
            "debugger",
            max(1, args.repeats // 2),
            Path(tmp) / "ws",
        )
        compare(
            "images, all but the last stage frozen, 96 px, 2 epochs",
            {
                "data": {"path": args.data, "image_size": 96},
                "model": {**model, "freeze": "all_but_last"},
                "train": {"epochs": 2, "feature_cache": False},
                **off,
            },
            "debugger",
            max(1, args.repeats // 2),
            Path(tmp) / "ws",
        )


if __name__ == "__main__":
    main()
