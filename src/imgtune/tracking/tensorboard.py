"""TensorBoard event files from what a job directory holds (`imgtune tensorboard JOB`, and live with
`tracking.tensorboard`, as the epochs end):

* `epoch/...`: every epoch's metrics (step = epoch) and, at the end, `test/...`;
* `debugger/NAME`: the debugger's saved tensors as histograms, rebuilt from their stored reductions and bins
  (`add_histogram_raw`; step = the training step the tensor was saved at), and its scalars (loss, metrics, lr);
* `profiler/PHASE/SEGMENT_ms`: each batch's step segments (data, h2d, forward, backward, optimizer, total),
  per rank for a data-parallel job (`profiler/rankR/...`).

Each file is read from where the last export stopped (offsets kept in OUT/.imgtune-export.json), so an export
run again, or the job's own process after its workers, adds only what is new and never writes a point twice.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgtune.core.io import atomic_write_json
from imgtune.storage.jobs import Job
from imgtune.tracking import EPOCH_METRICS, finite_number, require
from imgtune.training.callbacks import Callback
from imgtune.training.plugin import JobPlugin, TrainingRun

TENSORBOARD_DIR = "tensorboard"  # JOB/tensorboard: the live plugin's, and `imgtune tensorboard`'s default
OFFSETS_FILE = ".imgtune-export.json"
SEGMENTS = ("data", "h2d", "forward", "backward", "optimizer", "total")


class TensorBoardExport:
    """Writes a job's records as TensorBoard events into `out` (default JOB/tensorboard); `update()` adds what
    the job wrote since the last update, whichever process made it."""

    def __init__(self, job: Job, out: str | Path | None = None):
        require("tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.job = job
        self.out = Path(out) if out else job.path / TENSORBOARD_DIR
        self.out.mkdir(parents=True, exist_ok=True)
        state_file = self.out / OFFSETS_FILE
        self.state: dict[str, Any] = json.loads(state_file.read_text()) if state_file.is_file() else {}
        self.state.setdefault("offsets", {})
        self.state.setdefault("counters", {})
        self.writer = SummaryWriter(log_dir=str(self.out))
        self.written = 0

    def _new_records(self, path: Path) -> list[dict[str, Any]]:
        """Whole lines of `path` past the last offset (a line still being written waits for the next update)."""
        if not path.is_file():
            return []
        key = str(path.relative_to(self.job.path))
        offset = self.state["offsets"].get(key, 0)
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
        end = data.rfind(b"\n") + 1
        self.state["offsets"][key] = offset + end
        records = []
        for line in data[:end].splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut by a kill
        return records

    def _scalar(self, tag: str, value: Any, step: int, wall: float | None = None) -> None:
        if finite_number(value):
            self.writer.add_scalar(tag, value, step, walltime=wall)
            self.written += 1

    def update(self) -> int:
        """Export what is new; returns how many points were written."""
        before = self.written
        self._metrics()
        self._debugger()
        self._profiler()
        self.writer.flush()
        atomic_write_json(self.out / OFFSETS_FILE, self.state, durable=False)
        return self.written - before

    def _metrics(self) -> None:
        for record in self._new_records(self.job.metrics_file):
            for key in EPOCH_METRICS:
                self._scalar(f"epoch/{key}", record.get(key), int(record["epoch"]))

    def test_metrics(self) -> None:
        record = self.job.record()
        if record.test and not self.state.get("test_written"):
            for key, value in record.test.items():
                self._scalar(f"test/{key}", value, int(record.epochs_run or 0))
            self.state["test_written"] = True

    def _debugger(self) -> None:
        from imgtune.debugger.store import TENSORS_FILE

        for record in self._new_records(self.job.path / "debugger" / TENSORS_FILE):
            step, name = int(record.get("step", 0)), record.get("name", "")
            if "v" in record:
                self._scalar(f"debugger/{record.get('mode', 'train')}/{name}", record["v"], step, record.get("t"))
            elif record.get("h") and record.get("r"):
                self._histogram(f"debugger/{name}", record["r"], record["h"], step)

    def _histogram(self, tag: str, reductions: dict[str, float], histogram: dict[str, Any], step: int) -> None:
        counts = [int(c) for c in histogram["counts"]]
        finite = sum(counts)
        lo, hi = float(histogram["min"]), float(histogram["max"])
        mean, std = reductions.get("mean"), reductions.get("std")
        if not finite or not all(finite_number(x) for x in (lo, hi, mean, std)):
            return
        width = (hi - lo) / len(counts) if hi > lo else 1e-12
        limits = [lo + width * (i + 1) for i in range(len(counts))]
        self.writer.add_histogram_raw(
            tag, min=lo, max=hi, num=finite, sum=mean * finite, sum_squares=(std * std + mean * mean) * finite,
            bucket_limits=limits, bucket_counts=counts, global_step=step,
        )  # fmt: skip
        self.written += 1

    def _profiler(self) -> None:
        from imgtune.profiler.data import PROFILER_DIR, rank_files
        from imgtune.profiler.timeline import STEPS_FILE

        directory = self.job.path / PROFILER_DIR
        ranks = rank_files(directory, STEPS_FILE)
        sources = {f"rank{rank}/": path for rank, path in ranks.items()} or {"": directory / STEPS_FILE}
        counters = self.state["counters"]
        for prefix, path in sources.items():
            for record in self._new_records(path):
                where = f"{prefix}{record.get('phase', 'train')}"
                index = counters.get(where, 0)
                counters[where] = index + 1
                for segment in SEGMENTS:
                    value = record.get(segment)
                    self._scalar(
                        f"profiler/{where}/{segment}_ms", value * 1000 if finite_number(value) else None, index
                    )

    def close(self) -> None:
        self.writer.close()


class _ExportAfterEachEpoch(Callback):
    order = 85

    def __init__(self, export: TensorBoardExport):
        self.export = export

    def on_epoch_end(self, trainer: Any) -> None:
        self.export.update()

    def on_fit_end(self, trainer: Any) -> None:
        self.export.update()
        self.export.close()


class TensorBoardPlugin(JobPlugin):
    """`tracking.tensorboard`: event files in JOB/tensorboard, written as the epochs end and completed when the
    job ends."""

    name = "tensorboard"

    @classmethod
    def check(cls, config: Any) -> None:
        require("tensorboard", "tensorboard")

    def callbacks(self, run: TrainingRun) -> list[Callback]:
        export = run.extras["tensorboard"] = TensorBoardExport(run.job)
        return [_ExportAfterEachEpoch(export)]

    def on_fit_abort(self, run: TrainingRun) -> None:
        export = run.extras.get("tensorboard")
        if export is not None:
            export.close()  # its writer's thread, in a process that may live on (a reused Ray worker)

    def on_job_end(self, job: Job, status: str) -> None:
        export = TensorBoardExport(job)
        try:
            export.update()
            export.test_metrics()
            export.update()
        finally:
            export.close()
        job.log(f"tensorboard: event files in {export.out} (view: tensorboard --logdir {export.out})")


def export_job(job: Job, out: str | Path | None = None) -> tuple[Path, int]:
    """Everything a job holds as TensorBoard events in `out`; returns the folder and the points written."""
    export = TensorBoardExport(job, out)
    try:
        written = export.update()
        export.test_metrics()
        written += export.update()
    finally:
        export.close()
    return export.out, written
