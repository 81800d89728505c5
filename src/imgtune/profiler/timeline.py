"""The step timeline and the torch.profiler trace window: a Trainer callback writing under `JOB/profiler/`.

* ``steps.jsonl``: one line per batch of every phase: ``phase``, ``epoch``, ``batch``, ``step`` (optimizer
  steps so far), ``t`` (Unix time the batch's fetch began), and seconds of ``data`` (waiting for the loader),
  ``h2d`` (copy to the device), ``forward``, ``backward``, ``optimizer`` and ``total`` (the whole batch, the
  callbacks' time included: ``total`` minus the segments is what callbacks and bookkeeping took), written at
  least every second and at the end of each phase, so a killed job loses at most its last second;
* ``trace.json``: a torch.profiler trace of `trace_steps` training steps after `trace_start_step` warm-up
  steps, in the Chrome trace format that Perfetto and chrome://tracing open; traced steps run slower (the
  profiler records every operator), so the window covers at most `trace_max_share` of the job's planned training
  steps: a short job traces fewer steps, or none (`fit_trace_window`; ``meta.json``'s ``trace`` says which and
  why);
* ``trace-meta.json``: how many steps the trace holds; ``operators.json``: its top operators by self time,
  made from the trace when the job ends (`imgtune.profiler.operators`);
* ``meta.json``: what the rules need to know about the run (cores, GPUs, loader settings).

In a job on Ray Train workers (data-parallel) every rank writes its own timeline: rank R writes
``steps.rankR.jsonl`` (each record with a ``rank`` field) and ``meta.rankR.json`` (with ``rank``,
``world_size``, ``local_rank`` and ``host``), rank 0 included; the trace window is rank 0's alone and keeps its
names. A single-process job writes the plain names above, without ``rank`` fields.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from imgtune.core.io import atomic_output, atomic_write_json
from imgtune.profiler.monitor import gpu_count
from imgtune.training.callbacks import Callback

if TYPE_CHECKING:
    from imgtune.training.trainer import Trainer

STEPS_FILE = "steps.jsonl"
TRACE_FILE = "trace.json"
TRACE_META_FILE = "trace-meta.json"
OPERATORS_FILE = "operators.json"
META_FILE = "meta.json"
SEGMENTS = ("data", "h2d", "forward", "backward", "optimizer")
FLUSH_SECONDS = 1.0


def rank_file(name: str, rank: int | None) -> str:
    """Rank `rank`'s file of a data-parallel job (`steps.jsonl` -> `steps.rank1.jsonl`); `name` itself for a
    single process (`rank` None)."""
    if rank is None:
        return name
    stem, _, suffix = name.partition(".")
    return f"{stem}.rank{rank}.{suffix}"


@contextlib.contextmanager
def _quiet_native_stderr() -> Iterator[None]:
    """Silence what the native profiler (Kineto) prints to the process's stderr when it starts and stops
    ("profiler_start", and on machines without a GPU "gpuGetDeviceCount failed"): noise, not news."""
    os.environ.setdefault("KINETO_LOG_LEVEL", "5")
    sys.stderr.flush()
    saved, devnull = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 2)
    try:
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def fit_trace_window(planned_steps: int | None, start: int, steps: int, max_share: float) -> dict[str, Any]:
    """The trace window a job of `planned_steps` training steps gets: at most `max_share` of them traced, starting
    after `start` warm-up steps (earlier when the job is too short for that, so the window still fits). Returns
    ``start``, ``steps`` (0: no trace) and ``reason`` (why the window is not the configured one; None when it is).
    `planned_steps` None (not known): the configured window."""
    window = {"planned_steps": planned_steps, "start": start, "steps": steps, "reason": None}
    if planned_steps is None:
        return window
    allowed = min(steps, int(planned_steps * max_share))
    if allowed < 1:
        reason = f"{planned_steps} planned training steps: tracing one would take over {max_share:.0%} of them"
        return {**window, "start": None, "steps": 0, "reason": reason}
    start = max(0, min(start, planned_steps - allowed))
    if allowed < steps:
        window["reason"] = f"{allowed} of {steps} steps: at most {max_share:.0%} of {planned_steps} planned steps"
    elif start != window["start"]:
        window["reason"] = f"starts after {start} steps: the job plans {planned_steps}"
    return {**window, "start": start, "steps": allowed}


class StepTimeline(Callback):
    """Writes each batch's timing, and records the trace window (see the module docstring)."""

    order = 95  # last: a batch's total includes the other callbacks' work

    def __init__(
        self,
        directory: Path,
        *,
        trace: bool = True,
        trace_start_step: int = 5,
        trace_steps: int = 5,
        trace_max_share: float = 1.0,
        steps_per_epoch: int | None = None,
        meta: dict[str, Any] | None = None,
        rank: int | None = None,
    ):
        """`rank`: this process's rank in a data-parallel job (its files are named by it and its records carry
        it); None for a single-process job. `steps_per_epoch`: training steps an epoch (the trace window is
        fitted to the epochs this training runs, see `fit_trace_window`); None when not known."""
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.meta = dict(meta or {})
        self.trace = trace and not (directory / TRACE_FILE).exists()  # a resumed job keeps its first trace
        self.trace_start_step = trace_start_step
        self.trace_steps = trace_steps
        self.trace_max_share = trace_max_share
        self.steps_per_epoch = steps_per_epoch
        self.rank = rank
        self._tag = {} if rank is None else {"rank": rank}
        self._meta_path = directory / rank_file(META_FILE, rank)
        self._file = (directory / rank_file(STEPS_FILE, rank)).open("a")
        self._pending: list[str] = []  # written at least every FLUSH_SECONDS and at each phase's end
        self._flushed = time.perf_counter()
        self._train_batches = 0
        self._profile: torch.profiler.profile | None = None
        self._traced = 0
        self._trace_done = False
        self._finished_profile: torch.profiler.profile | None = None

    def on_fit_start(self, trainer: Trainer) -> None:
        trainer.sync_timing = True
        if self.trace:  # fitted to the epochs left (a resumed job runs fewer)
            planned = None if self.steps_per_epoch is None else self.steps_per_epoch * (trainer.epochs - trainer.epoch)
            window = fit_trace_window(planned, self.trace_start_step, self.trace_steps, self.trace_max_share)
            self.meta["trace"] = window
            self.trace = window["steps"] > 0
            self.trace_start_step, self.trace_steps = window["start"] or 0, max(window["steps"], 1)
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        meta = {
            "cpu_count": os.cpu_count(),
            "cpus_available": cpus,
            "gpu_count": gpu_count(),
            "device": str(trainer.device),
            "torch_threads": torch.get_num_threads(),
            **self.meta,
        }
        atomic_write_json(self._meta_path, meta)
        if self.trace and self.trace_start_step == 0:
            self._start_trace(trainer)

    def on_batch_end(self, trainer: Trainer) -> None:
        now = time.perf_counter()
        timing = trainer.step_timing
        record = {
            **self._tag,
            "phase": trainer.phase,
            "epoch": trainer.epoch,
            "batch": trainer.batch_index,
            "step": trainer.step,
            "t": round(time.time() - (now - trainer.batch_started), 4),
            **{k: round(timing.get(k, 0.0), 6) for k in SEGMENTS},
            "total": round(now - trainer.batch_started, 6),
        }
        self._pending.append(json.dumps(record) + "\n")
        if now - self._flushed > FLUSH_SECONDS:
            self._flush(now)
        if trainer.phase != "train":
            return
        self._train_batches += 1
        if self._profile is not None:
            self._traced += 1
            if self._traced >= self.trace_steps:
                self._stop_trace()
        elif self.trace and not self._trace_done and self._train_batches == self.trace_start_step:
            self._start_trace(trainer)

    def _flush(self, now: float | None = None) -> None:
        self._file.write("".join(self._pending))
        self._file.flush()
        self._pending.clear()
        self._flushed = time.perf_counter() if now is None else now

    def on_phase_end(self, trainer: Trainer) -> None:
        self._flush()

    def _start_trace(self, trainer: Trainer) -> None:
        activities = [torch.profiler.ProfilerActivity.CPU]
        if trainer.device.type == "cuda":
            activities.append(torch.profiler.ProfilerActivity.CUDA)
        self._profile = torch.profiler.profile(activities=activities)
        with _quiet_native_stderr():
            self._profile.start()

    def _stop_trace(self) -> None:
        """End the window; the trace is written by `close()`, after training, where it costs no step time."""
        profile, self._profile = self._profile, None
        self._trace_done = True
        if profile is not None:
            with _quiet_native_stderr():
                profile.stop()
            self._finished_profile = profile

    def _export_trace(self) -> None:
        profile, self._finished_profile = self._finished_profile, None
        if profile is None:
            return
        with atomic_output(self.directory / TRACE_FILE) as tmp:
            profile.export_chrome_trace(str(tmp))  # its operator table is made from this file after the job
        atomic_write_json(self.directory / TRACE_META_FILE, {"steps": self._traced}, durable=False)

    def on_fit_end(self, trainer: Trainer) -> None:
        if self._profile is not None:  # training ended inside the window: keep what it recorded
            self._stop_trace()
        trainer.sync_timing = False

    def close(self) -> None:
        """After training (also a failed or stopped one): end an open window and write the trace."""
        if self._profile is not None:
            with contextlib.suppress(Exception):
                self._stop_trace()
        self._export_trace()
        self._flush()
        self._file.close()
