"""job.json's typed model: what a job directory records, for every kind of job.

`Job.record()` reads it (validated), `Job.update(**fields)` writes fields of it (a field this model does not
know is refused, so a typo cannot create a second key). Commands, reports and trackers read this model, never
the raw JSON. Fields a kind of job does not use stay None. Keys written by a newer imgtune are kept (extra).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["running", "completed", "failed", "stopped", "interrupted", "unknown"]
Kind = Literal["training", "tuning", "pipeline"]


class JobRecord(BaseModel):
    """Everything job.json holds. The lifecycle (imgtune.runs.lifecycle) writes the common part; each kind of
    job adds its results."""

    model_config = ConfigDict(extra="allow")

    # -- every job: identity and lifecycle (written by imgtune.runs.lifecycle only) ----------------------
    name: str = ""
    kind: Kind = "training"
    created: str | None = None
    updated: str | None = None
    status: Status = "unknown"
    started: str | None = None
    finished: str | None = None
    pid: int | None = None
    pid_started: float | None = None  # the running process's start time (a pid alive later may be another's)
    host: str | None = None
    heartbeat: str | None = None  # a running job's last sign of life (ISO time, pushed with its job.json)
    heartbeat_every: float | None = None  # seconds between its heartbeats (the running machine's push interval)
    error: str | None = None
    versions: dict[str, str] | None = None
    timings: dict[str, float] = Field(default_factory=dict)
    seconds: float | None = None  # wall time from the (last) start to the end
    plugin_failures: list[dict[str, str]] | None = None  # optional plugins that failed and were switched off
    mlflow: dict[str, Any] | None = None  # the job's MLflow run: tracking_uri, experiment_id, run_id, model, ...
    tracking_gaps: list[str] | None = None  # what a failing tracker could not log

    # -- a training job -----------------------------------------------------------------------------------
    config: dict[str, Any] | None = None  # the resolved JobConfig (model_dump)
    dataset: dict[str, Any] | None = None
    weights: dict[str, Any] | None = None  # how the backbone's pretrained weights loaded
    warnings: list[str] | None = None
    training_mode: Literal["features", "images"] | None = None
    feature_backend: str | None = None  # the inference backend that computed the backbone's features
    feature_extraction: dict[str, float] | None = None  # data wait vs backbone time, when features were computed
    resumed_from_epoch: int | None = None
    trained_in_batch_of: int | None = None  # a tuning trial trained with others as one batch of heads: how many
    world_size: int | None = None  # data-parallel workers the job trained on (imgtune.runs.distributed)
    workers: list[dict[str, Any]] | None = None  # where each rank ran: rank, node, host, pid, device
    worker_starts: int | None = None  # times the workers started (more than 1: restarted after a failure)
    head_trained_on: str | None = None  # data-parallel job with cached features: the one process that trained
    epochs_run: int | None = None
    stop_reason: str | None = None
    best_epoch: int | None = None
    restored_best: bool | None = None
    best: dict[str, Any] | None = None  # training: the epoch record kept; tuning: the best trial
    callback_failures: list[dict[str, str]] | None = None
    compile: dict[str, Any] | None = None  # train.compile: what trained compiled and why (training.compiled)
    test: dict[str, Any] | None = None
    debugger: dict[str, Any] | None = None  # rule -> status and finding count
    profiler: dict[str, Any] | None = None  # samples, steps, trace, issues
    evaluations: list[dict[str, Any]] | None = None  # `imgtune evaluate` results, oldest first

    # -- a tuning job ---------------------------------------------------------------------------------------
    options: dict[str, Any] | None = None  # tuning and pipeline jobs: their options (TuneOptions, PipelineOptions)
    warm_start_points: int | None = None
    feature_cache_seconds: float | None = None
    ray: dict[str, Any] | None = None
    trials_batched: bool | None = None  # trials trained as batches of heads (imgtune.tuning.batched), not one by one
    trials: list[dict[str, Any]] | None = None
    trials_count: int | None = None
    final_job: str | None = None  # tuning and pipeline jobs: the final training job's name

    # -- a pipeline job -------------------------------------------------------------------------------------
    step_seconds: dict[str, float] | None = None
    data_check: dict[str, Any] | None = None
    tuning_job: str | None = None
    best_hyperparameters: dict[str, Any] | None = None
    endpoint: str | None = None
    sample_predictions: list[dict[str, Any]] | None = None
    artifacts: dict[str, str] | None = None

    @property
    def base_config(self) -> dict[str, Any]:
        """The job config: a training job's own, or the one a tuning job's trials start from."""
        return self.config or (self.options or {}).get("base") or {}


KNOWN_FIELDS = frozenset(JobRecord.model_fields)
