"""The profiler: a system monitor, a step timeline with a torch.profiler trace window, and profiler rules.

`ProfilerSession` ties them to a job: `start()` when the job starts (so initialisation is sampled),
`callback()` for the Trainer, `finish()` when the job ends, which evaluates the rules into
`JOB/profiler/rules.json`. `analyze_job()` evaluates them again over a stored job (`imgtune report`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgtune.config import ProfilerConfig
from imgtune.core.io import atomic_write_json
from imgtune.profiler.data import PROFILER_DIR, ProfileData
from imgtune.profiler.monitor import SystemMonitor
from imgtune.profiler.operators import top_operators
from imgtune.profiler.rules import ISSUES, evaluate_rules, make_profiler_rules
from imgtune.profiler.timeline import OPERATORS_FILE, TRACE_FILE, TRACE_META_FILE, StepTimeline
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

    def callback(self, meta: dict[str, Any]) -> StepTimeline:
        self.timeline = StepTimeline(
            self.directory,
            trace=self.config.trace,
            trace_start_step=self.config.trace_start_step,
            trace_steps=self.config.trace_steps,
            meta=meta,
        )
        return self.timeline

    def finish(self) -> dict[str, Any]:
        """Stop sampling, close the timeline, evaluate the rules; returns the summary for job.json."""
        self.monitor.stop()
        if self.timeline is not None:
            self.timeline.close()
        return analyze_job(self.job, self.config)


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
    return {
        "samples": len(data.samples),
        "steps": len(data.steps),
        "trace": str(data.trace.relative_to(job.path)) if data.trace else None,
        "issues": sorted(name for name, r in results.items() if r["status"] == ISSUES),
    }


def read_rule_results(job_path: Path) -> dict[str, dict[str, Any]]:
    path = job_path / PROFILER_DIR / RULES_FILE
    return json.loads(path.read_text()) if path.exists() else {}
