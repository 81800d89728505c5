"""Options of tuning jobs, endpoints and the pipeline: pydantic models, every default here only.

Constructing one with a bad value raises a ConfigError that names the option (the CLI prints it in one line).
A tuning job's and a pipeline's options are stored in their job.json and read back when they resume.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from imgtune.core.errors import ConfigError

Strategy = Literal["bayesian", "random", "grid", "hyperband"]
Objective = Literal["valid_accuracy", "valid_loss"]
OBJECTIVE_MODES = {"valid_accuracy": "max", "valid_loss": "min"}
TrialStopping = Literal["none", "median", "asha"]


def config_error(exc: ValidationError, source: str) -> ConfigError:
    """pydantic's errors as one ConfigError: `unknown NAME 'value'` for a choice, else `where: what`."""
    problems, hints = [], []
    for err in exc.errors():
        where = ".".join(str(p) for p in err["loc"]) or source
        if err["type"] == "literal_error":
            problems.append(f"unknown {str(err['loc'][-1]).replace('_', ' ')} {err['input']!r}")
            hints.append(f"{where}: use one of {err['ctx']['expected']}")
        else:
            problems.append(f"{where}: {err['msg']}")
    return ConfigError(f"invalid {source}: {'; '.join(problems)}", "; ".join(hints) or None)


class Options(BaseModel):
    """Base of option models: unknown names refused, values checked on assignment too, ConfigError on bad ones."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def __init__(self, **values: Any):
        try:
            super().__init__(**values)
        except ValidationError as exc:
            raise config_error(exc, type(self).__name__) from None


class TuneOptions(Options):
    """What a tuning job does; stored in its job.json (a resumed job reads it back)."""

    base: dict[str, Any] = Field(description="The raw job config every trial starts from.")
    space: dict[str, dict[str, Any]] = Field(description="The search space (see imgtune.tuning.space).")
    strategy: Strategy = Field("bayesian", description="bayesian (Optuna TPE) | random | grid | hyperband (ASHA).")
    max_trials: int = Field(8, ge=1, description="Trials to run (grid: every combination).")
    max_parallel: int = Field(2, ge=1, description="Trials running at once.")
    objective: Objective = Field("valid_accuracy", description="valid_accuracy (maximised) or valid_loss (minimised).")
    early_stopping: TrialStopping = Field(
        "none", description="Stop poor trials early: none | median | asha (hyperband implies asha)."
    )
    heads_per_worker: int = Field(
        32,
        ge=1,
        le=1024,
        description="With a frozen backbone's cached features: trials a worker trains at once as one batch of heads.",
    )
    cpus_per_trial: float = Field(
        1.0,
        gt=0,
        description="CPUs each trial (on cached features: each worker; with --workers-per-trial: each of a "
        "trial's workers) takes.",
    )
    gpus_per_trial: float = Field(
        0.0, ge=0, description="GPUs each trial (with --workers-per-trial: each of its workers) reserves."
    )
    workers_per_trial: int = Field(
        1, ge=1, le=4096, description="Data-parallel workers per trial: each trial a Ray Train job (train.workers)."
    )
    time_budget_s: float | None = Field(None, gt=0, description="Stop starting trials after this many seconds.")
    stop_after_no_improvement: int | None = Field(
        None, ge=1, description="Stop after this many finished trials without a better objective."
    )
    seed: int = Field(0, description="Seed of the searcher.")
    ray_address: str | None = Field(
        None, description="An existing Ray cluster (e.g. 127.0.0.1:6379) [default: in-process Ray]."
    )
    warm_start: list[str] = Field(
        default_factory=list, description="Earlier tuning jobs whose trials seed the searcher."
    )
    name: str | None = Field(None, description="Tuning job name [default: tune-TIME].")

    @property
    def mode(self) -> str:
        return OBJECTIVE_MODES[self.objective]

    @model_validator(mode="after")
    def _one_whole_gpu_per_rank(self) -> TuneOptions:
        if self.workers_per_trial > 1 and 0 < self.gpus_per_trial < 1:
            raise ValueError(
                f"gpus_per_trial {self.gpus_per_trial:g} with {self.workers_per_trial} workers per trial: each "
                "data-parallel worker needs a whole GPU (NCCL cannot put two ranks on one); use 1 or more, or 0"
            )
        return self


SERVING_MAX_IMAGE_PIXELS = 25_000_000  # a request's image: 25 MP (a 16-bit 49 MP PNG of a few KB took 5.5 s, 2 GB)
SERVING_MAX_REQUEST_PIXELS = 100_000_000  # all of a request's images together: four at the cap, 100 photos of 1 MP


class ServeOptions(Options):
    """How an endpoint serves; the defaults follow the managed endpoint where it has one (6 MB payloads)."""

    # The names of imgtune.models.backends' registry and its alias torch (a test keeps them equal).
    backend: Literal[
        "auto", "torch", "eager", "channels_last", "bf16", "onnx", "int8", "onnx-int8", "openvino", "openvino-int8",
        "compile",
    ] = Field(
        "auto",
        description="Inference backend: auto (the fastest on this machine that agrees with fp32 eager; measured "
        "once, remembered), eager, channels_last (alias torch), bf16, onnx, int8 (alias onnx-int8: ONNX Runtime "
        "static int8, calibrated on the job's training photos), openvino, openvino-int8 or compile. Quantized "
        "backends must agree on the job's validation photos (top-1 99%, accuracy within 0.5 point).",
    )  # fmt: skip
    max_batch_size: int = Field(32, ge=1, le=1024, description="Most images per forward pass.")
    max_batch_delay_ms: float = Field(5.0, ge=0, le=10_000, description="Longest wait for a batch to fill.")
    max_queue: int = Field(256, ge=1, description="Most images waiting; beyond it requests get 503.")
    max_payload_bytes: int = Field(6 * 1024 * 1024, ge=1024, description="Largest request body (413 beyond it).")
    max_image_pixels: int = Field(
        SERVING_MAX_IMAGE_PIXELS,
        ge=1,
        description="Larger images are refused (decompression bombs; a small file can declare a huge image).",
    )
    max_request_pixels: int = Field(
        SERVING_MAX_REQUEST_PIXELS,
        ge=1,
        description="A request whose images declare more pixels in all is refused (413) before any is decoded.",
    )
    api_key: str | None = Field(None, min_length=8, description="Require this key (X-API-Key or Bearer).")
    allowed_url_schemes: tuple[str, ...] = Field(
        (), description="Schemes of {'url': ...} images the server fetches, with its own credentials [default: none]."
    )
    allowed_buckets: tuple[str, ...] = Field(
        (), description="When set, s3:// URLs must name one of these buckets (and s3 is allowed)."
    )
    fetch_timeout_s: float = Field(10.0, gt=0, le=600, description="Longest a {'url': ...} fetch may take.")
    request_timeout_s: float = Field(
        60.0, gt=0, le=3600, description="A request not answered in this time gets 504 (decode, queue, model)."
    )
    body_timeout_s: float = Field(30.0, gt=0, le=3600, description="A body not received in this time gets 408.")
    max_concurrent_decodes: int | None = Field(
        None, ge=1, le=256, description="Images decoded at once, over all requests [default: the cores]."
    )
    endpoint_name: str | None = Field(None, description="Name in /endpoints/NAME/invocations [default: the job's].")
    threads: int | None = Field(None, ge=1, description="Inference threads [default: the backend's choice].")
    device: str = Field(
        "auto",
        description="Where the model computes: auto (a CUDA GPU when there is one, else the CPU), cpu, cuda or "
        "cuda:N. Replicas (--replicas) compute on CPUs.",
    )

    @model_validator(mode="after")
    def _queue_holds_a_batch(self) -> ServeOptions:
        if self.max_queue < self.max_batch_size:
            raise ValueError(f"the queue ({self.max_queue}) must hold at least one batch ({self.max_batch_size})")
        return self


class PipelineOptions(Options):
    """The whole workflow in one run (imgtune.runs.pipeline); stored in the pipeline's job.json."""

    data: str = Field(description="Dataset folder or s3://bucket/prefix.")
    backbone: str = Field("resnet50", description="torchvision or timm model.")
    weights: str | None = Field(None, description="Local state dict for the backbone.")
    epochs: int = Field(10, ge=1, description="Epochs per trial and for the final model.")
    max_trials: int = Field(8, ge=1, description="Tuning trials.")
    max_parallel: int = Field(2, ge=1, description="Trials running at once.")
    strategy: Strategy = Field("bayesian", description="The tuning strategy.")
    name: str | None = Field(None, description="Pipeline name [default: pipeline-TIME].")
    port: int = Field(0, ge=0, le=65535, description="Endpoint port on 127.0.0.1 [default: any free one].")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="A raw job config merged into every job's (--set)."
    )
