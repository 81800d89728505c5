"""Reading jobs and data for people: summaries of jobs (from their typed record), data checks, the debugger's
stored results. The CLI renders these; `--json` prints them as they are."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from imgtune.config import MAX_IMAGE_PIXELS
from imgtune.core.errors import ImgtuneError
from imgtune.core.io import cache_dir
from imgtune.runs.api import Workspace, list_jobs, open_job
from imgtune.storage.jobs import Job


def job_summary(job: Job) -> dict[str, Any]:
    """A training job at a glance: status, epochs, best epoch, test results, excluded files, where things are."""
    record = job.record()
    report = job.path / "report.html"
    return {
        "job": job.name,
        "path": str(job.path),
        "remote": job.remote,
        "status": record.status,
        "epochs_run": record.epochs_run,
        "stop_reason": record.stop_reason,
        "best": record.best,
        "test": {k: v for k, v in (record.test or {}).items() if k != "confusion_matrix"} or None,
        "excluded_files": (record.dataset or {}).get("excluded_count", 0),
        "model": str(job.model_dir),
        "report": str(report) if report.exists() else None,
        "profiler": record.profiler,
        "timings": record.timings,
    }


def job_details(job: Job) -> dict[str, Any]:
    """Everything job.json holds, with the live status and the metrics of every epoch."""
    details = job.read()
    details["status"] = job.status()
    details["metrics"] = job.read_metrics()
    return details


def jobs_overview(workspace: Workspace = None) -> list[dict[str, Any]]:
    """One row per job in the workspace (newest first): kind, status, backbone, epochs, best and test accuracy."""
    rows = []
    for job in list_jobs(workspace):
        try:
            record = job.record()
        except ImgtuneError:
            continue  # a damaged job.json: `imgtune jobs show` on it says what is wrong
        best = record.best or {}
        if record.kind == "tuning" and best.get("objective_name") == "valid_accuracy":
            best = {"valid_accuracy": best.get("objective")}
        rows.append(
            {
                "name": job.name,
                "status": job.status(),
                "kind": record.kind,
                "backbone": record.base_config.get("model", {}).get("backbone"),
                "epochs_run": record.epochs_run,
                "trials": record.trials_count,
                "best_valid_accuracy": best.get("valid_accuracy"),
                "test_accuracy": (record.test or {}).get("accuracy"),
                "created": record.created,
                "path": str(job.path),
                "remote": job.remote,
            }
        )
    return rows


def tuning_summary(job: Job) -> dict[str, Any]:
    """A tuning job at a glance: every trial (best first, as job.json holds them), the best, where the report
    is. It reads the tuning job's job.json only, never its trials' directories: as fast with 1,000 trials."""
    record = job.record()
    options = record.options or {}
    report = job.path / "report.html"
    return {
        "job": job.name,
        "path": str(job.path),
        "status": job.status(),
        "strategy": options.get("strategy"),
        "objective": options.get("objective"),
        "seconds": record.seconds,
        "feature_cache_seconds": record.feature_cache_seconds,
        "best": record.best,
        "report": str(report) if report.exists() else None,
        "trials": record.trials or [],
    }


def pipeline_summary(job: Job) -> dict[str, Any]:
    record = job.record()
    return {
        "job": job.name,
        "status": record.status,
        "seconds": record.seconds,
        "test_accuracy": (record.test or {}).get("accuracy"),
        "best_hyperparameters": (record.best_hyperparameters or {}).get("hyperparameters"),
        "tuning_job": record.tuning_job,
        "final_job": record.final_job,
        "endpoint": record.endpoint,
        "sample_predictions": record.sample_predictions or [],
        "artifacts": record.artifacts or {},
        "step_seconds": record.step_seconds or {},
    }


def check_data(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS, progress: bool = True) -> Any:
    """Every image of a dataset (folder or s3:// prefix) checked: a `CheckReport` (counts per class and split,
    sizes, modes, each problem file with its reason; `.fatal` when training could not run)."""
    from imgtune.data.check import check_layout
    from imgtune.data.folders import discover
    from imgtune.data.sources import resolve_source

    root = resolve_source(str(path), progress=progress)
    return check_layout(discover(root), max_pixels=max_pixels, cache_dir=cache_dir(), progress=progress)


def download_dataset(name: str, dest: str | Path = "data", **options: Any) -> Path:
    """Download and unpack a dataset (resumable, size and checksum checked); returns its folder."""
    from imgtune.data.download import download_dataset as download

    return download(name, Path(dest), **options)


def parse_rule_parameters(params: list[str], rules: list[str]) -> dict[str, dict[str, str]]:
    """`Rule.key=value`, or `key=value` when a single rule is selected."""
    parsed: dict[str, dict[str, str]] = {}
    for item in params:
        key, sep, value = item.partition("=")
        rule, dot, name = key.rpartition(".")
        if not sep or not name:
            raise ImgtuneError(f"bad --param {item!r}", "write it as Rule.key=value, or key=value with one --rule")
        if not dot:
            if len(rules) != 1:
                raise ImgtuneError(f"--param {item!r} does not say which rule", "write it as Rule.key=value")
            rule = rules[0]
        if rule not in rules:
            raise ImgtuneError(f"--param {item!r} is for rule {rule}, which is not run", f"add --rule {rule}")
        parsed.setdefault(rule, {})[name] = value
    return parsed


def debug_rules(
    job: str | Path | Job,
    *,
    rules: list[str] | None = None,
    params: list[str] | None = None,
    rule_files: list[str] | None = None,
    workspace: Workspace = None,
) -> list[dict[str, Any]]:
    """Debugger rules run offline over a stored job (also one still running): each rule's result. Without
    `rules`, the job's own; `params` are `Rule.key=value`."""
    from imgtune.debugger.rules import make_rules
    from imgtune.debugger.runner import run_rules_offline
    from imgtune.debugger.store import open_trial
    from imgtune.runs.trust import trusted_debugger

    handle = job if isinstance(job, Job) else open_job(job, workspace)
    # the job's own rule files run, unless it comes from a bucket: then only those given here (runs.trust)
    debug_config = trusted_debugger(handle, handle.record().base_config.get("debugger", {}), rule_files)
    files = list(debug_config.get("rule_files") or [])
    names = list(rules or debug_config.get("rules") or [])
    parameters = {**debug_config.get("rule_parameters", {}), **parse_rule_parameters(params or [], names)}
    chosen = make_rules(names, parameters, files)
    return list(run_rules_offline(open_trial(handle.path), chosen).values())


def debug_results(job: str | Path, *, workspace: Workspace = None) -> dict[str, Any]:
    """The rule results recorded while the job trained, and what the debugger saved (collections, steps)."""
    from imgtune.debugger.store import RULES_FILE, open_trial

    handle = open_job(job, workspace)
    trial = open_trial(handle.path)
    rules_file = trial.directory / RULES_FILE
    return {
        "job": handle.name,
        "rules": json.loads(rules_file.read_text())["rules"] if rules_file.exists() else [],
        "collections": trial.collections(),
        "steps": {mode: len(trial.steps(mode)) for mode in trial.modes()},
    }


def plot_tensor(
    job: str | Path, tensor: str, out: str | Path, *, reduction: str = "mean", workspace: Workspace = None
) -> Path:
    """A PNG of one saved tensor's `reduction` over steps (train and eval each on their own step axis)."""
    from imgtune.debugger.plots import plot_tensor as plot
    from imgtune.debugger.store import open_trial

    return plot(open_trial(job, workspace), tensor, Path(out), reduction=reduction)
