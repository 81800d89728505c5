"""A job as an MLflow run (`--mlflow`, config `tracking.mlflow`).

A training job's run holds: the resolved config as params; every epoch's metrics (step = epoch: train and
valid loss and accuracy, valid top-5, lr, epoch time) as the epochs end, and the test metrics at the end; the
profiler's system samples as MLflow system metrics (`system/...`); tags (the imgtune job, its status, kind,
backbone, excluded files, each rule's status); the debugger's and profiler's rule results as a table
(`imgtune/rules.json`); artifacts (report.html, the rule files, logs.txt, job.json); and the model bundle as an
MLflow model with a pyfunc flavour (imgtune.tracking.pyfunc), optionally registered (`tracking.registered_model`) with
an alias (`tracking.alias`).

A tuning job is a parent run; each trial is a training job whose run nests under it (`tracking.parent_run_id`,
put into the trials' config by the tuning job, so it reaches trials on Ray workers in other processes or on
other nodes). The best trial's run is tagged when the tuning job ends.

Where the runs go: `tracking.mlflow_uri`, else $MLFLOW_TRACKING_URI, else MLflow's own default (a local store);
the job resolves it once and records it (job.json `mlflow`), so its trials and a resumed job use the same store.
Everything goes through an `MlflowClient` bound to that URI (no global state), except logging the model, which
MLflow does through its active run.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgtune.config import JobConfig
from imgtune.storage.jobs import Job
from imgtune.tracking import EPOCH_METRICS, finite_number, require
from imgtune.training.callbacks import Callback
from imgtune.training.plugin import JobPlugin, TrainingRun

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from imgtune.training.trainer import Trainer

MODEL_ARTIFACT = "model"
PARAM_VALUE_LIMIT = 6000  # MLflow's longest param value
STATUS = {"completed": "FINISHED", "failed": "FAILED", "stopped": "KILLED"}
# the profiler's sample fields -> MLflow's system metric names (and a scale)
SYSTEM_METRICS = {
    "cpu_total": ("system/cpu_utilization_percentage", 1.0),
    "mem_used": ("system/system_memory_usage_percentage", 1.0),
    "proc_rss": ("system/process_memory_rss_megabytes", 1e-6),
    "disk_read": ("system/disk_read_megabytes_per_second", 1e-6),
    "disk_write": ("system/disk_write_megabytes_per_second", 1e-6),
    "net_recv": ("system/network_receive_megabytes_per_second", 1e-6),
    "net_sent": ("system/network_transmit_megabytes_per_second", 1e-6),
}


def resolve_uri(uri: str | None) -> str:
    """The tracking URI a job uses: its own, else $MLFLOW_TRACKING_URI, else MLflow's default local store (made
    absolute, so trials in other working directories find the same store)."""
    import mlflow

    if uri:
        return uri
    resolved = mlflow.get_tracking_uri()
    prefix = "sqlite:///"
    if resolved.startswith(prefix) and not resolved.startswith(prefix + "/"):
        resolved = prefix + str(Path(resolved[len(prefix) :]).resolve())
    return resolved


# MLflow retries a failing request 7 times with exponential backoff, 120 s each: minutes per request against a
# server that is down, which would hold a job (and a tuning trial's wrap-up) for as long. imgtune's default is
# a short budget; a user's own setting of these variables wins.
BOUNDED_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_TIMEOUT": "30"}


def client_for(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    for name, value in BOUNDED_RETRIES.items():
        os.environ.setdefault(name, value)
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def _unreachable(exc: BaseException) -> bool:
    text = str(exc)
    return any(sign in text for sign in ("Max retries exceeded", "Connection refused", "timed out", "Read timed"))


def experiment_id(client: MlflowClient, name: str) -> str:
    """The experiment's id, created when missing (two jobs creating it at once both get it)."""
    from mlflow.exceptions import MlflowException

    found = client.get_experiment_by_name(name)
    if found is not None:
        return found.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:
        found = client.get_experiment_by_name(name)
        if found is None:
            raise
        return found.experiment_id


def flat_params(config: dict[str, Any], prefix: str = "") -> dict[str, str]:
    """A nested config as MLflow params: `train.lr` -> "0.001" (values cut to MLflow's limit)."""
    params: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            params.update(flat_params(value, f"{name}."))
        else:
            text = value if isinstance(value, str) else json.dumps(value)
            params[name] = text[:PARAM_VALUE_LIMIT]
    return params


def without_secrets(params: dict[str, str]) -> dict[str, str]:
    """The tracking URI without a user and password in it (params are readable by everyone on the server)."""
    from urllib.parse import urlsplit, urlunsplit

    uri = params.get("tracking.mlflow_uri", "")
    parts = urlsplit(uri) if uri else None
    if parts and parts.password:
        params["tracking.mlflow_uri"] = urlunsplit(
            parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else ""))
        )
    return params


def _chunks(items: list, size: int) -> Iterator[list]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def log_params(client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    for chunk in _chunks([Param(k, v) for k, v in params.items()], 100):
        client.log_batch(run_id, params=chunk)


def log_metrics(client: MlflowClient, run_id: str, points: list[tuple[str, float, int, int]]) -> None:
    """(name, value, timestamp ms, step) points; non-finite values are left out (MLflow refuses NaN in some
    stores)."""
    from mlflow.entities import Metric

    metrics = [Metric(k, float(v), t, s) for k, v, t, s in points if finite_number(v)]
    for chunk in _chunks(metrics, 1000):
        client.log_batch(run_id, metrics=chunk)


def epoch_points(record: dict[str, Any], timestamp: int | None = None) -> list[tuple[str, float, int, int]]:
    stamp = timestamp or int(time.time() * 1000)
    return [(key, record[key], stamp, int(record["epoch"])) for key in EPOCH_METRICS if finite_number(record.get(key))]


def run_of(job: Job) -> tuple[MlflowClient, str] | None:
    """The client and run id a job records (job.json `mlflow`), or None before its run exists."""
    record = job.record().mlflow or {}
    if not record.get("run_id"):
        return None
    return client_for(record["tracking_uri"]), record["run_id"]


class _Gaps:
    """What could not be logged: each part is tried on its own; the job's log and `tracking_gaps` say which
    parts failed, and the plugin hook then raises so that the job's plugin_failures name the tracker too."""

    def __init__(self, job: Job):
        self.job = job
        self.missing: list[str] = []
        self.unreachable = False

    def part(self, what: str, log: Callable[[], Any]) -> None:
        """Call `log`; its failure is recorded, not raised. Once the server proved unreachable, the remaining
        parts are recorded without being tried (each would wait for its own timeouts)."""
        if self.unreachable:
            self.missing.append(f"mlflow: {what} not logged: the tracking server was unreachable")
            return
        try:
            log()
        except Exception as exc:
            self.unreachable = _unreachable(exc)
            self.missing.append(f"mlflow: {what} not logged: {type(exc).__name__}: {str(exc)[:300]}")

    def settle(self) -> None:
        if not self.missing:
            return
        for line in self.missing:
            self.job.log(line)
        self.job.update(tracking_gaps=[*(self.job.record().tracking_gaps or []), *self.missing])
        raise RuntimeError(f"{len(self.missing)} part(s) of the MLflow run not logged (see tracking_gaps)")


class EpochMetricsToMlflow(Callback):
    """Logs each epoch's record to the job's run as the epoch ends (on the process that trains: rank 0)."""

    order = 80

    def __init__(self, client: MlflowClient, run_id: str):
        self.client, self.run_id = client, run_id

    def on_epoch_end(self, trainer: Trainer) -> None:
        log_metrics(self.client, self.run_id, epoch_points(trainer.epoch_record))


class _RunPlugin(JobPlugin):
    """What both kinds of run share: making the run at the job's start (or continuing a resumed job's), and
    ending it with the parts that could not be logged recorded."""

    name = "mlflow"
    kind = ""
    tracking: Any

    def on_job_start(self, job: Job) -> None:
        try:
            known = job.record().mlflow or {}
            uri = resolve_uri(self.tracking.mlflow_uri or known.get("tracking_uri"))
            client = client_for(uri)
            if known.get("run_id") and known.get("tracking_uri") == uri:  # a resumed job continues its run
                client.update_run(known["run_id"], status="RUNNING")
                job.log(f"mlflow: continuing run {known['run_id']} at {uri}")
                return
            experiment = experiment_id(client, self.tracking.experiment)
            tags = {"imgtune.job": job.name, "imgtune.kind": self.kind, **self.run_tags()}
            run_id = client.create_run(experiment, tags=tags, run_name=job.name).info.run_id
            job.update(mlflow={"tracking_uri": uri, "experiment_id": experiment, "run_id": run_id})
            log_params(client, run_id, without_secrets(flat_params(self.params(job))))
            job.log(f"mlflow: {self.kind} run {run_id} in experiment {self.tracking.experiment!r} at {uri}")
        except Exception as exc:  # the job goes on without its run: say so in job.json
            gap = f"mlflow: nothing logged, the run could not be made: {type(exc).__name__}: {str(exc)[:300]}"
            job.update(tracking_gaps=[*(job.record().tracking_gaps or []), gap])
            raise

    def run_tags(self) -> dict[str, str]:
        return {}

    def params(self, job: Job) -> dict[str, Any]:
        raise NotImplementedError

    def on_job_end(self, job: Job, status: str) -> None:
        found = run_of(job)
        if found is None:
            return
        client, run_id = found
        gaps = _Gaps(job)
        self.log_end(gaps, client, run_id, job, status)
        gaps.part("the run's status", lambda: end_run(client, run_id, status))
        gaps.settle()

    def log_end(self, gaps: _Gaps, client: MlflowClient, run_id: str, job: Job, status: str) -> None:
        raise NotImplementedError


class MlflowPlugin(_RunPlugin):
    """A training job (a tuning trial included) as an MLflow run; see the module docstring."""

    kind = "training"

    def __init__(self, config: JobConfig):
        self.tracking = config.tracking
        self.config = config

    @classmethod
    def check(cls, config: JobConfig) -> None:
        require("mlflow", "mlflow")

    def run_tags(self) -> dict[str, str]:
        tags = {"imgtune.backbone": self.config.model.backbone}
        if self.tracking.parent_run_id:
            tags["mlflow.parentRunId"] = self.tracking.parent_run_id
        return tags

    def params(self, job: Job) -> dict[str, Any]:
        return job.record().config or self.config.model_dump(mode="json")

    def callbacks(self, run: TrainingRun) -> list[Callback]:
        found = run_of(run.job)
        return [EpochMetricsToMlflow(*found)] if found else []

    def log_end(self, gaps: _Gaps, client: MlflowClient, run_id: str, job: Job, status: str) -> None:
        record = job.record()
        gaps.part("epoch metrics", lambda: log_missing_epochs(client, run_id, job))
        stamp, step = int(time.time() * 1000), int(record.epochs_run or 0)
        test = [(f"test_{k}", v, stamp, step) for k, v in (record.test or {}).items() if finite_number(v)]
        gaps.part("test metrics", lambda: log_metrics(client, run_id, test))
        gaps.part("system metrics", lambda: log_metrics(client, run_id, system_points(job)))
        gaps.part("tags", lambda: set_tags(client, run_id, job_tags(job, status)))
        gaps.part("rule results", lambda: log_rule_table(client, run_id, job))
        gaps.part("artifacts", lambda: log_job_files(client, run_id, job))
        # a tuning trial's model stays in its job: the tuning job's final training job logs (and registers) one
        is_trial = bool(self.tracking.parent_run_id)
        if status == "completed" and not is_trial and (job.model_dir / "manifest.json").is_file():
            gaps.part("the model", lambda: self._log_model(job, run_id))

    def _log_model(self, job: Job, run_id: str) -> None:
        logged = log_model(job, run_id, self.tracking.registered_model, self.tracking.alias)
        job.update(mlflow={**(job.record().mlflow or {}), **logged})
        job.log(f"mlflow: model {logged['model_uri']}" + _registered(logged))


def end_run(client: MlflowClient, run_id: str, status: str) -> None:
    with contextlib.redirect_stdout(sys.stderr):  # MLflow prints the run's link; stdout is for --json
        client.set_terminated(run_id, STATUS.get(status, "FAILED"))


def set_tags(client: MlflowClient, run_id: str, tags: dict[str, str]) -> None:
    from mlflow.entities import RunTag

    client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])


def log_rule_table(client: MlflowClient, run_id: str, job: Job) -> None:
    table = rule_table(job)
    if table["rule"]:
        client.log_table(run_id, data=table, artifact_file="imgtune/rules.json")


def _registered(logged: dict[str, Any]) -> str:
    if not logged.get("registered_model"):
        return ""
    alias = f" (alias {logged['alias']})" if logged.get("alias") else ""
    return f", registered as {logged['registered_model']} version {logged['version']}{alias}"


def log_missing_epochs(client: MlflowClient, run_id: str, job: Job) -> None:
    """Epochs of metrics.jsonl the run lacks (trained where no callback logged them: batched trials, a killed
    process, a tracker down for a while)."""
    records = job.read_metrics() if job.metrics_file.exists() else []
    if not records:
        return
    logged = {(key, point.step) for key in EPOCH_METRICS for point in client.get_metric_history(run_id, key)}
    points = [p for r in records for p in epoch_points(r) if (p[0], p[3]) not in logged]
    log_metrics(client, run_id, points)


def system_points(job: Job) -> list[tuple[str, float, int, int]]:
    from imgtune.profiler.data import ProfileData

    points = []
    for step, sample in enumerate(ProfileData.load(job.path).samples):
        stamp = int(sample.get("t", time.time()) * 1000)
        for field, (name, scale) in SYSTEM_METRICS.items():
            if finite_number(sample.get(field)):
                points.append((name, sample[field] * scale, stamp, step))
        for index, gpu in enumerate(sample.get("gpus") or []):
            if finite_number(gpu.get("util")):
                points.append((f"system/gpu_{index}_utilization_percentage", gpu["util"], stamp, step))
            if finite_number(gpu.get("mem_used")):
                points.append((f"system/gpu_{index}_memory_usage_megabytes", gpu["mem_used"] / 1e6, stamp, step))
    return points


def _rule_results(job: Job) -> dict[str, dict[str, dict[str, Any]]]:
    from imgtune.debugger.store import RULES_FILE as DEBUGGER_RULES
    from imgtune.profiler import read_rule_results

    debugger_file = job.path / "debugger" / DEBUGGER_RULES
    stored = json.loads(debugger_file.read_text()) if debugger_file.is_file() else {}
    debugger = {result["rule"]: result for result in stored.get("rules", [])}  # {"updated", "rules": [...]}
    return {"debugger": debugger, "profiler": read_rule_results(job.path)}


def rule_table(job: Job) -> dict[str, list]:
    """The debugger's and profiler's rule results as one table (a column per field)."""
    table: dict[str, list] = {"tool": [], "rule": [], "status": [], "findings": [], "message": []}
    for tool, results in _rule_results(job).items():
        for rule, result in sorted(results.items()):
            table["tool"].append(tool)
            table["rule"].append(rule)
            table["status"].append(result.get("status"))
            table["findings"].append(result.get("finding_count", len(result.get("triggers") or [])))
            table["message"].append(result.get("message", ""))
    return table


def job_tags(job: Job, status: str) -> dict[str, str]:
    record = job.record()
    excluded = (record.dataset or {}).get("excluded") or []
    tags = {
        "imgtune.status": status,
        "imgtune.excluded_files": str(len(excluded) if isinstance(excluded, list) else excluded),
    }
    if record.world_size:
        tags["imgtune.world_size"] = str(record.world_size)
    if record.stop_reason:
        tags["imgtune.stop_reason"] = record.stop_reason[:5000]
    if record.error:
        tags["imgtune.error"] = record.error[:5000]
    for tool, results in _rule_results(job).items():
        for rule, result in results.items():
            tags[f"imgtune.{tool}.{rule}"] = str(result.get("status"))
    return tags


def log_job_files(client: MlflowClient, run_id: str, job: Job) -> None:
    from imgtune.debugger.store import RULES_FILE as DEBUGGER_RULES
    from imgtune.profiler import RULES_FILE as PROFILER_RULES

    files = {
        job.path / "report.html": "",
        job.log_file: "imgtune",
        job.job_file: "imgtune",
        job.metrics_file: "imgtune",
        job.path / "debugger" / DEBUGGER_RULES: "imgtune/debugger",
        job.path / "profiler" / PROFILER_RULES: "imgtune/profiler",
    }
    for path, folder in files.items():
        if path.is_file():
            client.log_artifact(run_id, str(path), folder or None)


def log_model(job: Job, run_id: str, register: str | None, alias: str | None) -> dict[str, Any]:
    """The job's bundle as an MLflow model in `run_id` (pyfunc flavour, signature, an input example), registered
    as `register` with `alias` when asked; returns what job.json records."""
    import mlflow
    from mlflow.tracking._tracking_service.utils import _use_tracking_uri

    from imgtune.tracking.pyfunc import pyfunc_model_arguments

    uri = (job.record().mlflow or {})["tracking_uri"]
    # MLflow logs a model only through its active run, which reads the process's tracking URI: this job's, for
    # the time it takes; the registry follows the tracking URI. Restoring an unset global URI also unsets
    # $MLFLOW_TRACKING_URI, so that is put back. MLflow prints links and registry progress on stdout, which
    # `--json` output keeps for its JSON alone.
    saved = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        with (
            _use_tracking_uri(uri),
            contextlib.redirect_stdout(sys.stderr),
            pyfunc_model_arguments(job) as arguments,
            mlflow.start_run(run_id=run_id, log_system_metrics=False, nested=mlflow.active_run() is not None),
        ):
            info = mlflow.pyfunc.log_model(name=MODEL_ARTIFACT, registered_model_name=register, **arguments)
    finally:
        if saved is not None:
            os.environ["MLFLOW_TRACKING_URI"] = saved
    logged: dict[str, Any] = {"model_uri": info.model_uri}
    if register:
        version = str(info.registered_model_version)
        logged.update(registered_model=register, version=version, model_version_uri=f"models:/{register}/{version}")
        if alias:
            client_for(uri).set_registered_model_alias(register, alias, version)
            logged["alias"] = alias
    return logged


# -- a tuning job -------------------------------------------------------------------------------------------


class MlflowTuningPlugin(_RunPlugin):
    """A tuning job as a parent run: its options as params, its trials nested under it, the best trial tagged."""

    kind = "tuning"

    def __init__(self, base: JobConfig, options: dict[str, Any]):
        require("mlflow", "mlflow")
        self.tracking = base.tracking
        self.options = options

    def params(self, job: Job) -> dict[str, Any]:
        return {k: v for k, v in self.options.items() if k != "base"}

    def log_end(self, gaps: _Gaps, client: MlflowClient, run_id: str, job: Job, status: str) -> None:
        gaps.part("the best trial", lambda: tag_best_trial(client, run_id, job))
        gaps.part("tags and artifacts", lambda: self._tags_and_files(client, run_id, job, status))

    @staticmethod
    def _tags_and_files(client: MlflowClient, run_id: str, job: Job, status: str) -> None:
        set_tags(client, run_id, {"imgtune.status": status, "imgtune.trials": str(len(job.record().trials or []))})
        for path in (job.path / "report.html", job.log_file, job.job_file):
            if path.is_file():
                client.log_artifact(run_id, str(path), None if path.suffix == ".html" else "imgtune")


def tag_best_trial(client: MlflowClient, run_id: str, job: Job) -> None:
    """Tag the best trial's run (and untag one an earlier end of a resumed tuning job tagged)."""
    best = job.record().best or {}
    trial = best.get("job")  # the trial's job, relative to the tuning job
    trial_record = Job(job.path / trial).record() if trial else None
    child = (trial_record.mlflow or {}).get("run_id") if trial_record else None
    earlier = client.get_run(run_id).data.tags.get("imgtune.best_trial_run")
    if earlier and earlier != child:
        client.delete_tag(earlier, "imgtune.best_trial")
    if child:
        set_tags(client, child, {"imgtune.best_trial": "true"})
        set_tags(client, run_id, {"imgtune.best_trial_run": child})
    objective = best.get("objective")
    if finite_number(objective):
        log_metrics(client, run_id, [("best_objective", objective, int(time.time() * 1000), 0)])
