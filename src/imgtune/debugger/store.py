"""The debugger's tensor store under `JOB/debugger/`, and the reader over it (`open_trial`).

Layout::

    debugger/
      tensors.jsonl            one line per saved tensor and step: mode, step, mode_step, name, collection,
                               reductions "r" (min, max, mean, std, l1, l2, zeros, nan, inf, numel) and a
                               histogram "h"; a scalar (loss, metric, lr) is stored as its value "v"
      raw/STEP.safetensors     raw tensors of a step, when `save_raw` is on
      rules.json               rule results (written by the rule runner)

Non-finite numbers appear as NaN/Infinity (Python's json reads them; the JSON files imgtune shows users
elsewhere, rules.json and --json output, hold null instead). Lines are appended as training goes and flushed at
least every second and at the end of each phase, so a killed job keeps all but its last second,
and the reader works on a job that is still running (a line cut short by a kill is skipped).
"""

from __future__ import annotations

import bisect
import json
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from imgtune.core.errors import JobError
from imgtune.core.io import atomic_output, atomic_write_text, read_jsonl

TENSORS_FILE = "tensors.jsonl"
RAW_DIR = "raw"
RULES_FILE = "rules.json"
FLUSH_SECONDS = 1.0  # records reach the file at least this often, and at the end of every phase
MODES = ("train", "eval", "predict")
REDUCTIONS = ("min", "max", "mean", "std", "l1", "l2", "zeros", "nan", "inf", "numel")


def reduce_tensor(tensor: torch.Tensor, bins: int = 16) -> tuple[dict[str, float], dict[str, list] | None]:
    """Reductions of a tensor over its finite values, and a histogram; one device sync for all of them.

    The common case (all values finite, known from the sum being finite) takes six passes over the data;
    only a tensor holding NaN or infinities pays for masking them out.
    """
    t = tensor.detach().reshape(-1)
    if t.dtype != torch.float32:
        t = t.float()
    n = t.numel()
    if n == 0:
        return dict.fromkeys(REDUCTIONS, 0.0), None
    total = float(t.sum())
    nan = inf = 0.0
    values = t
    if not math.isfinite(total):
        finite = torch.isfinite(t)
        nan = float(torch.isnan(t).sum())
        inf = float(n - finite.sum()) - nan
        values = t[finite]
        if values.numel() == 0:
            return {**dict.fromkeys(REDUCTIONS, math.nan), "nan": nan, "inf": inf, "numel": float(n)}, None
        total = float(values.sum())
    m = values.numel()
    lo, hi = values.aminmax()
    absolute = values.abs()
    # Counting non-zeros as a float sum of signs is twice as fast as count_nonzero, and exact below 2**24.
    nonzero = absolute.sign().sum() if m < 2**24 else torch.count_nonzero(values)
    l1, sumsq, nonzero, lo, hi = torch.stack([absolute.sum(), values.dot(values), nonzero, lo, hi]).tolist()
    zeros = n - nonzero - nan - inf
    mean = total / m
    reductions = {
        "min": lo,
        "max": hi,
        "mean": mean,
        "std": math.sqrt(max(sumsq / m - mean * mean, 0.0)),
        "l1": l1,
        "l2": math.sqrt(sumsq),
        "zeros": zeros / n,
        "nan": nan,
        "inf": inf,
        "numel": float(n),
    }
    histogram = None
    if bins:
        histogram = {"min": lo, "max": hi, "counts": _histogram(values, bins, lo, hi)}
    return reductions, histogram


HISTOGRAM_SAMPLE = 16_384


def _histogram(values: torch.Tensor, bins: int, lo: float, hi: float) -> list[int]:
    """Bin counts over [lo, hi]. Past HISTOGRAM_SAMPLE values they are estimated from an evenly strided
    sample (histograms cost far more than the other reductions) and scaled to sum to the true count."""
    n = values.numel()
    sample = values[:: -(-n // HISTOGRAM_SAMPLE)] if n > HISTOGRAM_SAMPLE else values
    counts = torch.histc(sample, bins=bins, min=lo, max=hi if hi > lo else lo + 1e-12).tolist()
    if sample.numel() == n:
        return [int(c) for c in counts]
    scaled = [round(c * n / sample.numel()) for c in counts]
    scaled[max(range(bins), key=scaled.__getitem__)] += n - sum(scaled)  # rounding left over
    return scaled


def scalar_reductions(value: float) -> dict[str, float]:
    finite = math.isfinite(value)
    v = value if finite else math.nan
    return {
        "min": v,
        "max": v,
        "mean": v,
        "std": 0.0 if finite else math.nan,
        "l1": abs(v),
        "l2": abs(v),
        "zeros": float(value == 0),
        "nan": float(math.isnan(value)),
        "inf": float(math.isinf(value)),
        "numel": 1.0,
    }


class TensorWriter:
    """Appends tensor records to the store; keeps them in memory too, for rules that run online."""

    def __init__(self, directory: Path):
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self._file = (directory / TENSORS_FILE).open("a")
        self._pending: list[str] = []
        self._flushed = time.monotonic()
        self.trial = Trial(directory, load=False)

    def write(self, record: dict[str, Any]) -> None:
        """Keep a record (in memory at once, for online rules; on disk within FLUSH_SECONDS)."""
        self._pending.append(json.dumps(record) + "\n")
        self.trial.add(record)
        if time.monotonic() - self._flushed > FLUSH_SECONDS:
            self.flush()

    def flush(self) -> None:
        """Write what is pending (the capture calls this at each phase's end too)."""
        if self._pending:
            self._file.write("".join(self._pending))
            self._pending.clear()
        self._file.flush()
        self._flushed = time.monotonic()

    def write_raw(self, mode: str, step: int, tensors: dict[str, torch.Tensor]) -> None:
        from safetensors.torch import save_file

        with atomic_output(self.directory / RAW_DIR / f"{mode}-{step:08d}.safetensors") as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp))

    def truncate_after(self, step: int) -> None:
        """Drop records after global `step` (a resumed job redoes them)."""
        self.flush()
        self._file.close()
        path = self.directory / TENSORS_FILE
        kept = [r for r in read_jsonl(path) if r["step"] <= step]
        atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in kept))
        for raw in (self.directory / RAW_DIR).glob("*.safetensors"):
            if int(raw.stem.rsplit("-", 1)[1]) > step:
                raw.unlink()
        self._file = path.open("a")
        self.trial = Trial(self.directory)

    def close(self) -> None:
        self.flush()
        self._file.close()


@dataclass
class TensorSeries:
    """One tensor's saved values: per mode, step -> record."""

    name: str
    collection: str
    by_mode: dict[str, dict[int, dict[str, Any]]] = field(default_factory=lambda: defaultdict(dict))

    def steps(self, mode: str | None = None) -> list[int]:
        modes = [mode] if mode else list(self.by_mode)
        return sorted(step for m in modes for step in self.by_mode.get(m, {}))

    def has(self, step: int, mode: str | None = None) -> bool:
        """Was this tensor saved at `step` (in `mode`)? Constant time, unlike `step in steps()`."""
        if mode is not None:
            return step in self.by_mode.get(mode, {})
        return any(step in records for records in self.by_mode.values())

    def reduction(self, step: int, name: str = "mean", mode: str | None = None) -> float:
        return self._record(step, mode)["r"][name]

    def value(self, step: int, mode: str | None = None) -> float:
        """The scalar value (mean) at a step: a loss, a metric, a learning rate."""
        return self.reduction(step, "mean", mode)

    def reductions(self, name: str = "mean", mode: str = "train") -> dict[int, float]:
        return {step: rec["r"][name] for step, rec in sorted(self.by_mode.get(mode, {}).items())}

    def histogram(self, step: int, mode: str | None = None) -> dict[str, Any] | None:
        return self._record(step, mode).get("h")

    def mode_step(self, step: int, mode: str | None = None) -> int:
        return self._record(step, mode)["mode_step"]

    def _record(self, step: int, mode: str | None) -> dict[str, Any]:
        modes = [mode] if mode else list(self.by_mode)
        for m in modes:
            if step in self.by_mode.get(m, {}):
                return self.by_mode[m][step]
        raise KeyError(f"{self.name} has no value at step {step}" + (f" in mode {mode}" if mode else ""))


class Trial:
    """The reader: tensor names by collection, steps by mode, values, reductions, a pandas frame.

    `refresh()` reads lines appended since the last read, so a Trial follows a running job.
    """

    def __init__(self, directory: Path, load: bool = True):
        self.directory = directory
        self.tensors: dict[str, TensorSeries] = {}
        self._offset = 0
        self._steps: list[int] = []  # every step with data, ascending (records arrive in step order)
        if load:
            self.refresh()

    def add(self, record: dict[str, Any]) -> None:
        if "r" not in record:  # a scalar: stored as its value
            record["r"] = scalar_reductions(record["v"])
        series = self.tensors.get(record["name"])
        if series is None:
            series = self.tensors[record["name"]] = TensorSeries(record["name"], record["collection"])
        series.by_mode[record["mode"]][record["step"]] = record
        step = record["step"]
        if not self._steps or step > self._steps[-1]:
            self._steps.append(step)
        elif step not in self._steps:  # out of order (not written by imgtune): keep the list sorted
            bisect.insort(self._steps, step)

    def refresh(self) -> Trial:
        path = self.directory / TENSORS_FILE
        if not path.exists():
            return self
        with path.open() as f:
            f.seek(self._offset)
            while True:
                line = f.readline()
                if not line.endswith("\n"):
                    break  # nothing more, or a line still being written
                self._offset = f.tell()
                try:
                    self.add(json.loads(line))
                except json.JSONDecodeError:
                    continue
        return self

    def tensor_names(self, collection: str | None = None, regex: str | None = None) -> list[str]:
        import re

        pattern = re.compile(regex) if regex else None
        return sorted(
            name
            for name, s in self.tensors.items()
            if (collection is None or s.collection == collection) and (pattern is None or pattern.fullmatch(name))
        )

    def collections(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = defaultdict(list)
        for name, series in sorted(self.tensors.items()):
            out[series.collection].append(name)
        return dict(out)

    def tensor(self, name: str) -> TensorSeries:
        try:
            return self.tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r}; known: {', '.join(sorted(self.tensors)[:10])}") from None

    def has_tensor(self, name: str) -> bool:
        return name in self.tensors

    def steps(self, mode: str | None = None) -> list[int]:
        if mode is None:
            return list(self._steps)
        return sorted({step for s in self.tensors.values() for step in s.steps(mode)})

    def steps_after(self, step: int) -> list[int]:
        """Steps with data after `step`, ascending (cheap: for following a running job)."""
        return self._steps[bisect.bisect_right(self._steps, step) :]

    def modes(self) -> list[str]:
        return [m for m in MODES if any(m in s.by_mode for s in self.tensors.values())]

    def raw(self, mode: str, step: int) -> dict[str, torch.Tensor]:
        from safetensors.torch import load_file

        path = self.directory / RAW_DIR / f"{mode}-{step:08d}.safetensors"
        if not path.exists():
            raise KeyError(f"no raw tensors saved at {mode} step {step} (is debugger.save_raw on?)")
        return load_file(str(path))

    def to_frame(self):
        """A pandas DataFrame: one row per tensor, mode and step, with every reduction as a column."""
        import pandas as pd

        rows = [
            {
                "name": s.name,
                "collection": s.collection,
                "mode": mode,
                "step": step,
                "mode_step": rec["mode_step"],
                **rec["r"],
            }
            for s in self.tensors.values()
            for mode, steps in s.by_mode.items()
            for step, rec in steps.items()
        ]
        columns = ["name", "collection", "mode", "step", "mode_step", *REDUCTIONS]
        return pd.DataFrame(rows, columns=columns).sort_values(["name", "mode", "step"], ignore_index=True)


def open_trial(job: str | Path, workspace: str | Path | None = None) -> Trial:
    """The debugger data of a job (by name or path), also while it is running."""
    from imgtune.storage.jobs import Job

    directory = Job.open(job, workspace).path / "debugger"
    if not (directory / TENSORS_FILE).exists():
        raise JobError(f"job {Path(job).name} has no debugger data", "was it trained with --no-debugger?")
    return Trial(directory)
