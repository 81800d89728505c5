"""Reading what the profiler wrote under `JOB/profiler/` (samples, steps, meta, operators) for rules and reports.

A data-parallel job's profile has every rank's steps and meta (`rank_steps`, `rank_meta`) and each node's
samples (`node_samples`, by the rank that sampled the node). What the rules read as one job, `steps` and `meta`,
are then rank 0's (the rank whose trace window the job keeps), and `samples` those of rank 0's node (a node
that trained: the job's own process, which also samples, may run on a node that only drives the workers); the
job process's own samples (`system.jsonl`) are read where no rank sampled (workers that never started).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np

from imgtune.core.io import read_jsonl
from imgtune.profiler.monitor import SYSTEM_FILE
from imgtune.profiler.timeline import META_FILE, OPERATORS_FILE, SEGMENTS, STEPS_FILE, TRACE_FILE

PROFILER_DIR = "profiler"


def rank_files(directory: Path, name: str) -> dict[int, Path]:
    """The ranks' files of a data-parallel job named after `name` (`steps.jsonl`: `steps.rank0.jsonl`, ...)."""
    stem, _, suffix = name.partition(".")
    pattern = re.compile(rf"{re.escape(stem)}\.rank(\d+)\.{re.escape(suffix)}")
    found = {}
    for path in directory.glob(f"{stem}.rank*.{suffix}") if directory.is_dir() else ():
        match = pattern.fullmatch(path.name)
        if match:
            found[int(match.group(1))] = path
    return dict(sorted(found.items()))


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


@dataclass
class ProfileData:
    """A job's profile: system samples as arrays, step records, and the run's facts (see the module docstring
    for which rank's and node's a data-parallel job's are)."""

    samples: list[dict[str, Any]] = field(default_factory=list)
    steps: list[dict[str, Any]] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    operators: dict[str, Any] = field(default_factory=dict)
    timings: dict[str, float] = field(default_factory=dict)
    trace: Path | None = None
    rank_steps: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # data-parallel: every rank's steps
    rank_meta: dict[int, dict[str, Any]] = field(default_factory=dict)
    node_samples: dict[int, list[dict[str, Any]]] = field(default_factory=dict)  # by the rank that sampled

    @classmethod
    def load(cls, job_path: Path, timings: dict[str, float] | None = None) -> ProfileData:
        directory = job_path / PROFILER_DIR
        meta_path, ops_path, trace = directory / META_FILE, directory / OPERATORS_FILE, directory / TRACE_FILE
        rank_steps = {rank: list(read_jsonl(path)) for rank, path in rank_files(directory, STEPS_FILE).items()}
        rank_meta = {rank: _read_json(path) for rank, path in rank_files(directory, META_FILE).items()}
        node_samples = {rank: list(read_jsonl(path)) for rank, path in rank_files(directory, SYSTEM_FILE).items()}
        if rank_steps:  # data-parallel: rank 0's steps and meta, rank 0's node's samples
            first = min(rank_steps)
            steps, meta = rank_steps[first], rank_meta.get(first, {})
        else:
            steps = list(read_jsonl(directory / STEPS_FILE))
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        return cls(
            samples=node_samples[min(node_samples)] if node_samples else list(read_jsonl(directory / SYSTEM_FILE)),
            steps=steps,
            meta=meta,
            operators=json.loads(ops_path.read_text()) if ops_path.exists() else {},
            timings=dict(timings or {}),
            trace=trace if trace.exists() else None,
            rank_steps=rank_steps,
            rank_meta=rank_meta,
            node_samples=node_samples,
        )

    @property
    def world_size(self) -> int:
        """The ranks the job trained on (1: a single process)."""
        return int(self.meta.get("world_size") or max(len(self.rank_steps), 1))

    # -- system samples ---------------------------------------------------------------------------------

    def series(self, key: str) -> np.ndarray:
        """A scalar metric over the samples (NaN where a sample lacks it)."""
        return np.array([float(s.get(key, np.nan)) for s in self.samples], dtype=float)

    @property
    def times(self) -> np.ndarray:
        return self.series("t")

    @property
    def gpu_count(self) -> int:
        return max((len(s.get("gpus", [])) for s in self.samples), default=0)

    def gpu_series(self, index: int, key: str) -> np.ndarray:
        out = []
        for s in self.samples:
            gpus = s.get("gpus", [])
            out.append(float(gpus[index][key]) if index < len(gpus) else np.nan)
        return np.array(out, dtype=float)

    def gpu_memory_percent(self, index: int) -> np.ndarray:
        return 100 * self.gpu_series(index, "mem_used") / self.gpu_series(index, "mem_total")

    def least_busy_gpu(self) -> np.ndarray:
        """Per sample, the lowest utilisation of any GPU (%)."""
        return np.nanmin([self.gpu_series(i, "util") for i in range(self.gpu_count)], axis=0)

    def core_matrix(self) -> np.ndarray:
        """Utilisation per core: [samples, cores] (%)."""
        width = max((len(s.get("cpu", [])) for s in self.samples), default=0)
        matrix = np.full((len(self.samples), width), np.nan)
        for i, s in enumerate(self.samples):
            cores = s.get("cpu", [])
            matrix[i, : len(cores)] = cores
        return matrix

    # -- steps ------------------------------------------------------------------------------------------

    @cached_property
    def _step_columns(self) -> dict[str, np.ndarray]:
        """The step records as columns, made once: reports and rules slice them many times."""
        columns = {k: np.array([float(s.get(k, 0.0)) for s in self.steps]) for k in (*SEGMENTS, "total")}
        columns["phase"] = np.array([s["phase"] for s in self.steps], dtype=object)
        columns["epoch"] = np.array([s.get("epoch", -1) for s in self.steps])
        return columns

    def step_array(self, key: str, phase: str | None = "train", epoch: int | None = None) -> np.ndarray:
        columns = self._step_columns
        values = columns[key] if key in columns else np.array([float(s.get(key, 0.0)) for s in self.steps])
        mask = np.ones(len(self.steps), dtype=bool)
        if phase is not None:
            mask &= columns["phase"] == phase
        if epoch is not None:
            mask &= columns["epoch"] == epoch
        return values[mask]

    def epochs(self) -> list[int]:
        columns = self._step_columns
        return sorted({int(e) for e in columns["epoch"][columns["phase"] == "train"]})

    def phases(self) -> list[str]:
        return list(dict.fromkeys(s["phase"] for s in self.steps))

    def segment_totals(self, phase: str | None = None, epoch: int | None = None) -> dict[str, float]:
        """Seconds per step segment summed over a phase's batches (of one epoch); 'other' is callbacks and
        bookkeeping."""
        totals = {k: float(self.step_array(k, phase, epoch).sum()) for k in SEGMENTS}
        totals["other"] = max(float(self.step_array("total", phase, epoch).sum()) - sum(totals.values()), 0.0)
        return totals


def percentiles(values: np.ndarray) -> dict[str, float]:
    """min, p50, p95, p99, max of the finite values (NaN when there are none)."""
    finite = values[np.isfinite(values)]
    if finite.size == 0:
        return dict.fromkeys(("min", "p50", "p95", "p99", "max"), float("nan"))
    p50, p95, p99 = np.percentile(finite, [50, 95, 99])
    return {
        "min": float(finite.min()),
        "p50": float(p50),
        "p95": float(p95),
        "p99": float(p99),
        "max": float(finite.max()),
    }
