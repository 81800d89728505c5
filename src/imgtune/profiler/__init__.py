"""The profiler: a system monitor, a step timeline with a torch.profiler trace window, and profiler rules.

`ProfilerSession` ties them to a job: `start()` when the job starts (so initialisation is sampled),
`callback()` for the Trainer, `finish()` when the job ends, which evaluates the rules into
`JOB/profiler/rules.json`. `analyze_job()` evaluates them again over a stored job (`imgtune report`).

In a data-parallel job the Trainer runs on the ranks, not in the job's process: there each rank has a
`RankSession` (its own step timeline, rank 0's trace window, and on the first rank of each node that node's
system samples), closed when the rank's training ends; the job's process still samples from the job's start
and evaluates the rules over every rank's files at its end.
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

from imgtune.config import ProfilerConfig
from imgtune.core.io import atomic_write_json
from imgtune.profiler.data import PROFILER_DIR, ProfileData
from imgtune.profiler.monitor import SYSTEM_FILE, SystemMonitor
from imgtune.profiler.operators import top_operators
from imgtune.profiler.rules import ISSUES, evaluate_rules, make_profiler_rules
from imgtune.profiler.timeline import OPERATORS_FILE, TRACE_FILE, TRACE_META_FILE, StepTimeline, rank_file
from imgtune.storage.jobs import Job

RULES_FILE = "rules.json"


class ProfilerSession:
    """The profiler's part of one job run (see the module docstring)."""

    def __init__(self, job: Job, config: ProfilerConfig):
        self.job = job
        self.config = config
        self.directory = job.path / PROFILER_DIR
        self.monitor = SystemMonitor(self.directory, config.interval_ms / 1000)
        self.timeline: StepTimeline | None = None

    def start(self) -> ProfilerSession:
        self.monitor.start()
        return self

    def callback(self, meta: dict[str, Any], steps_per_epoch: int | None = None) -> StepTimeline:
        """The Trainer callback; `steps_per_epoch`: its training steps an epoch (the trace window fits them)."""
        self.timeline = StepTimeline(
            self.directory,
            trace=self.config.trace,
            trace_start_step=self.config.trace_start_step,
            trace_steps=self.config.trace_steps,
            trace_max_share=self.config.trace_max_share,
            steps_per_epoch=steps_per_epoch,
            meta=meta,
        )
        return self.timeline

    def finish(self) -> dict[str, Any]:
        """Stop sampling, close the timeline, evaluate the rules; returns the summary for job.json."""
        self.monitor.stop()
        if self.timeline is not None:
            self.timeline.close()
        return analyze_job(self.job, self.config)


def local_rank(rank: int) -> int:
    """This process's rank among the ranks on its node: LOCAL_RANK, which torchrun and Ray Train's torch backend
    set for every worker; without it, `rank` (every rank is taken to share one node)."""
    try:
        return int(os.environ["LOCAL_RANK"])
    except (KeyError, ValueError):
        return rank


class RankSession:
    """The profiler on one rank of a data-parallel job: `start()` when the rank's training is set up,
    `callback()` for its Trainer, `close()` when its training ends (see the module docstring)."""

    def __init__(self, job: Job, config: ProfilerConfig, rank: int, world_size: int):
        self.job = job
        self.config = config
        self.rank = rank
        self.directory = job.path / PROFILER_DIR
        host = socket.gethostname()
        self.where = {"rank": rank, "world_size": world_size, "local_rank": local_rank(rank), "host": host}
        self.monitor: SystemMonitor | None = None
        if self.where["local_rank"] == 0:  # one monitor per node
            name, fields = rank_file(SYSTEM_FILE, rank), {"rank": rank, "host": host}
            self.monitor = SystemMonitor(self.directory, config.interval_ms / 1000, name=name, fields=fields)
        self.timeline: StepTimeline | None = None

    def start(self) -> RankSession:
        if self.monitor is not None:
            self.monitor.start()
        return self

    def callback(self, meta: dict[str, Any], steps_per_epoch: int | None = None) -> StepTimeline:
        self.timeline = StepTimeline(
            self.directory,
            trace=self.config.trace and self.rank == 0,  # one trace window per job: rank 0's
            trace_start_step=self.config.trace_start_step,
            trace_steps=self.config.trace_steps,
            trace_max_share=self.config.trace_max_share,
            steps_per_epoch=steps_per_epoch,
            meta={**meta, **self.where},
            rank=self.rank,
        )
        return self.timeline

    def close(self) -> None:
        """Stop sampling and close the timeline (its trace written); safe to call twice."""
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.timeline is not None:
            self.timeline.close()
            self.timeline = None


def analyze_job(job: Job, config: ProfilerConfig | None = None) -> dict[str, Any]:
    """Evaluate the profiler rules over a job's stored profile into `profiler/rules.json`; returns a summary."""
    record = job.record()
    if config is None:
        config = ProfilerConfig.model_validate((record.config or {}).get("profiler", {}))
    directory = job.path / PROFILER_DIR
    trace = directory / TRACE_FILE
    if trace.exists():
        meta = directory / TRACE_META_FILE
        operators = {"steps": json.loads(meta.read_text())["steps"] if meta.exists() else None, **top_operators(trace)}
        atomic_write_json(directory / OPERATORS_FILE, operators, durable=False)
    data = ProfileData.load(job.path, record.timings)
    results = evaluate_rules(make_profiler_rules(config.rules, config.rule_parameters), data)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_json(directory / RULES_FILE, results, durable=False)
    summary = {
        "samples": len(data.samples),
        "steps": len(data.steps),
        "trace": str(data.trace.relative_to(job.path)) if data.trace else None,
        "issues": sorted(name for name, r in results.items() if r["status"] == ISSUES),
    }
    if data.rank_steps:  # data-parallel: `samples` and `steps` are rank 0's node's and rank 0's
        summary["ranks"] = len(data.rank_steps)
        summary["nodes"] = len(data.node_samples)
    return summary


def read_rule_results(job_path: Path) -> dict[str, dict[str, Any]]:
    path = job_path / PROFILER_DIR / RULES_FILE
    return json.loads(path.read_text()) if path.exists() else {}
