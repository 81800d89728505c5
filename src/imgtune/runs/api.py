"""What `imgtune.train`, `imgtune.tune` ... do: the library's public functions, the same ones the CLI calls.

Each takes plain arguments (the CLI's options, in Python), builds the validated config or options, runs the job
through the lifecycle and returns its `Job` (or its result). Defaults live in `imgtune.config`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from imgtune.config import JobConfig, PipelineOptions, ServeOptions, apply_overrides, build_config, load_config_file
from imgtune.config import merge as merge_config
from imgtune.core.errors import ConfigError, ImgtuneError
from imgtune.core.io import cache_dir
from imgtune.storage.jobs import Job
from imgtune.training.callbacks import Callback

Workspace = str | Path | None
ConfigSource = JobConfig | dict[str, Any] | str | Path | None


def job_config(
    config: ConfigSource = None, flags: dict[str, Any] | None = None, overrides: Iterable[str] = ()
) -> dict[str, Any]:
    """A raw job config: `config` (a JobConfig, a dict or a YAML file), then `flags` (a nested dict; None values
    are ignored), then `--set`-style `key=value` overrides; a dataset is required."""
    if isinstance(config, JobConfig):
        raw = config.model_dump(mode="json")
    elif isinstance(config, dict):
        raw = dict(config)
    else:
        raw = load_config_file(config) if config else {}
    raw = apply_overrides(merge_config(raw, flags or {}), list(overrides))
    if not raw.get("data", {}).get("path"):
        raise ConfigError("no dataset given", "pass --data PATH (or data.path in --config)")
    return raw


def train(
    data: str | Path | None = None,
    *,
    config: ConfigSource = None,
    overrides: Iterable[str] = (),
    backbone: str | None = None,
    weights: str | Path | None = None,
    pretrained: str | None = None,
    freeze: str | None = None,
    epochs: int | None = None,
    lr: float | None = None,
    batch_size: int | None = None,
    image_size: int | None = None,
    name: str | None = None,
    recipe: str | None = None,
    workers: int | None = None,
    gpus_per_worker: float | None = None,
    cpus_per_worker: float | None = None,
    ray_address: str | None = None,
    debugger: bool = True,
    profiler: bool = True,
    workspace: Workspace = None,
    resume: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    callbacks: Iterable[Callback] = (),
    on_finding: Callable[[str, Any], None] | None = None,
    rule_files: Iterable[str | Path] = (),
) -> Job:
    """Train a classifier on a folder of labelled photos (or continue a killed job with `resume`); returns the job.

    `workers` > 1 trains on that many data-parallel Ray Train workers (in-process Ray, or the cluster at
    `ray_address`); `batch_size` stays the global batch. `recipe`: 'frozen', 'finetune' or 'finetune-strong' (values
    for the keys the config leaves unset; default: by `freeze`, see imgtune.config.job.RECIPES). `rule_files`:
    Python files with debugger rules (see `debug_rules`), added to the config's; with `resume`, the ones you trust
    (a job from a bucket runs no file its job.json names, only these).

    Example: `imgtune.train("photos/", backbone="mobilenet_v2", epochs=5, overrides=["train.optimizer=sgd"])`.
    """
    from imgtune.runs.train import run_training_job
    from imgtune.tuning import use_ray_address

    use_ray_address(ray_address)  # before Ray is imported
    if resume is not None:
        return run_training_job(
            resume=resume, workspace=workspace, progress=progress, force=force, callbacks=callbacks,
            on_finding=on_finding, ray_address=ray_address, rule_files=[str(f) for f in rule_files],
        )  # fmt: skip
    flags = {
        "name": name,
        "recipe": recipe,
        "data": {"path": str(data) if data is not None else None, "image_size": image_size},
        "model": {
            "backbone": backbone, "weights": str(weights) if weights else None, "pretrained": pretrained,
            "freeze": freeze,
        },
        "train": {
            "epochs": epochs, "lr": lr, "batch_size": batch_size, "workers": workers,
            "gpus_per_worker": gpus_per_worker, "cpus_per_worker": cpus_per_worker,
        },
        "debugger": {} if debugger else {"enabled": False},
        "profiler": {} if profiler else {"enabled": False},
    }  # fmt: skip
    raw = job_config(config, flags, overrides)
    if rule_files:
        debugging = raw.setdefault("debugger", {})
        own = list(debugging.get("rule_files") or [])
        debugging["rule_files"] = [*own, *(str(f) for f in rule_files if str(f) not in own)]
    return run_training_job(
        build_config(raw), workspace=workspace, progress=progress, callbacks=callbacks, on_finding=on_finding,
        ray_address=ray_address,
    )  # fmt: skip


def tune(
    data: str | Path | None = None,
    *,
    space: str | Path | dict[str, Any] | None = None,
    config: ConfigSource = None,
    overrides: Iterable[str] = (),
    backbone: str | None = None,
    weights: str | Path | None = None,
    epochs: int | None = None,
    workspace: Workspace = None,
    resume: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    on_trial: Callable[[dict[str, Any]], None] | None = None,
    **options: Any,
) -> Job:
    """Tune hyperparameters on Ray Tune (each trial a training job); returns the tuning job.

    `options` are TuneOptions fields: strategy, max_trials, max_parallel, heads_per_worker, objective, early_stopping,
    cpus_per_trial, gpus_per_trial, workers_per_trial, time_budget_s, stop_after_no_improvement, seed, ray_address,
    warm_start, name.
    Trials run with the debugger and profiler off; `train_best` trains the final model with them on.
    """
    from imgtune.config import TuneOptions
    from imgtune.tuning import use_ray_address
    from imgtune.tuning.space import load_space, parse_space  # (no Ray here)

    if resume is not None:
        from imgtune.runs.trust import trusted_ray_address

        handle = open_job(resume, workspace)
        recorded = (handle.record().options or {}).get("ray_address")
        given = options.get("ray_address")
        use_ray_address(trusted_ray_address(handle, recorded, given, say=False))  # before Ray loads
        from imgtune.runs.tune import run_tuning_job

        return run_tuning_job(
            workspace=workspace, resume=resume, progress=progress, on_trial=on_trial, force=force, ray_address=given
        )
    flags = {
        "data": {"path": str(data) if data is not None else None},
        "model": {"backbone": backbone, "weights": str(weights) if weights else None},
        "train": {"epochs": epochs},
        # Trials record what tuning needs; the final training (train_best) has debugger and profiler on.
        "debugger": {"enabled": False},
        "profiler": {"enabled": False, "report": False},
    }
    search_space = parse_space(space) if isinstance(space, dict) else load_space(space)
    tune_options = TuneOptions(base=job_config(config, flags, overrides), space=search_space.to_dict(), **options)
    use_ray_address(tune_options.ray_address)  # before Ray is imported
    from imgtune.runs.tune import run_tuning_job

    return run_tuning_job(tune_options, workspace=workspace, progress=progress, on_trial=on_trial)


def train_best(
    tuning_job: str | Path | Job, *, name: str | None = None, workspace: Workspace = None, progress: bool = True
) -> Job:
    """Train the final model with a tuning job's best hyperparameters (debugger and profiler on, test evaluated)."""
    from imgtune.runs.tune import train_best as train_final

    return train_final(open_tuning_job(tuning_job, workspace, shallow=True), name=name, progress=progress)


def open_tuning_job(job: str | Path | Job, workspace: Workspace = None, *, shallow: bool = False) -> Job:
    """A tuning job by name or path (an error if the job is of another kind); `shallow` as for `open_job`."""
    handle = job if isinstance(job, Job) else open_job(job, workspace, shallow=shallow)
    if handle.record().kind != "tuning":
        raise ImgtuneError(f"{handle.name} is not a tuning job", "`imgtune jobs` lists jobs and their kinds")
    return handle


def evaluate(
    job: str | Path | Job,
    data: str | Path,
    *,
    split: str = "test",
    workspace: Workspace = None,
    progress: bool = True,
    tta: bool | None = None,
) -> dict[str, Any]:
    """A job's model on a split of a dataset: top-1, top-5, per-class accuracy, confusion matrix (also recorded
    in the job's `evaluations`); `tta` (flip test-time augmentation) None: as the job's own `train.tta`."""
    from imgtune.runs.evaluate import evaluate_job

    source = model_source(job)
    return evaluate_job(source, str(data), split=split, workspace=workspace, progress=progress, tta=tta)


def pipeline(
    data: str | Path,
    *,
    overrides: Iterable[str] = (),
    workspace: Workspace = None,
    progress: bool = True,
    say: Callable[[str], None] = lambda message: None,
    keep_serving: Callable[[str], None] | None = None,
    **options: Any,
) -> Job:
    """The whole workflow: data check, tuning, final training, a local endpoint, one photo per class through it.
    `options` are PipelineOptions fields (backbone, weights, epochs, max_trials, max_parallel, strategy, name,
    port); `overrides` (`key=value`) change every job's config."""
    from imgtune.runs.pipeline import run_pipeline

    pipeline_options = PipelineOptions(data=str(data), overrides=apply_overrides({}, list(overrides)), **options)
    return run_pipeline(pipeline_options, workspace=workspace, progress=progress, say=say, keep_serving=keep_serving)


def demo(
    *,
    epochs: int = 8,
    max_trials: int = 4,
    workspace: Workspace = None,
    progress: bool = True,
    say: Callable[[str], None] = lambda message: None,
) -> Job:
    """The pipeline on the built-in sample dataset (4 shapes, generated locally): a ResNet-18 trained from scratch
    on 64 px images."""
    from imgtune.data.sample import generate_sample_dataset

    dataset = generate_sample_dataset(cache_dir() / "sample-data")
    say(f"sample dataset: {dataset}")
    return pipeline(
        dataset, backbone="resnet18", epochs=epochs, max_trials=max_trials, max_parallel=2,
        overrides=["model.pretrained=none", "model.freeze=none", "data.image_size=64"],
        workspace=workspace, progress=progress, say=say,
    )  # fmt: skip


def deploy(
    job: str | Path | Job,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    background: bool = False,
    replicas: int = 1,
    ray_address: str | None = None,
    workspace: Workspace = None,
    **options: Any,
) -> Any:
    """Serve a job's model over HTTP. Blocks until Ctrl-C; with `background=True`, returns a started endpoint
    (`.url`, `.stop()`, a context manager) served from a thread of this process. With `replicas` above 1 (or a
    `ray_address`), the same endpoint on Ray Serve, the model on that many replicas (in-process Ray on 127.0.0.1
    unless `ray_address` names a cluster). `options` are ServeOptions fields (backend, max_batch_size,
    max_batch_delay_ms, max_queue, max_payload_bytes, api_key, ...)."""
    from imgtune.tuning import use_ray_address

    if replicas < 1:
        raise ConfigError(f"replicas must be at least 1 (got {replicas})")
    replicated = replicas > 1 or bool(ray_address)
    if replicated and background:
        raise ConfigError("replicas are served in the foreground only", "run `imgtune deploy --replicas N`")
    use_ray_address(ray_address)  # before Ray is imported
    from imgtune.serving.server import BackgroundEndpoint, serve

    source = model_source(job)
    serve_options = ServeOptions(**options)
    if replicated:
        from imgtune.serving.predictor import resolve_model_dir
        from imgtune.tuning import connect

        resolve_model_dir(source, workspace)  # a missing job fails before Ray starts
        connect(ray_address)  # in-process Ray on 127.0.0.1, or the cluster's; as tuning jobs do
    if background:
        return BackgroundEndpoint(source, serve_options, host=host, port=port, workspace=workspace).start()
    serve(source, serve_options, host=host, port=port, workspace=workspace, replicas=replicas, ray_address=ray_address)
    return None


def load_predictor(
    job: str | Path | Job, *, backend: str = "auto", threads: int | None = None, workspace: Workspace = None
) -> Any:
    """A job's model (or a bundle directory's) ready to classify images in this process (`Predictor`)."""
    from imgtune.serving.predictor import Predictor

    return Predictor.load(model_source(job), backend, threads, workspace)


def model_source(job: str | Path | Job) -> str | Path:
    """Where a model is: a job (name or path), a bundle directory, or an MLflow model URI (`models:/NAME@ALIAS`,
    `models:/NAME/VERSION`, `runs:/RUN/model`) that imgtune logged, fetched into the cache."""
    from imgtune.tracking.registry import fetch_bundle, is_model_uri

    if is_model_uri(job):
        return fetch_bundle(str(job))
    return job.path if isinstance(job, Job) else job


def predict(
    images: Iterable[str | Path],
    *,
    job: str | Path | Job | None = None,
    endpoint: str | None = None,
    top_k: int = 5,
    api_key: str | None = None,
    workspace: Workspace = None,
) -> list[dict[str, Any]]:
    """The top-k classes of each image file, from a job's model in this process (`job`) or a running endpoint
    (`endpoint`): `{"file", "classes"}`, or `{"file", "error"}` for a file that is not a usable image."""
    if (job is None) == (endpoint is None):
        raise ConfigError("say where the model is", "pass --job JOB or --endpoint URL (one of them)")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
        raise ConfigError("--top-k must be at least 1")
    paths = [Path(image) for image in images]
    if job is not None:
        from imgtune.serving.batch_transform import classify_files

        predictor = load_predictor(job, workspace=workspace)
        results = classify_files(predictor, [str(path) for path in paths], lambda name: Path(name).read_bytes(), top_k)
        return results
    from imgtune.serving.client import EndpointClient

    client = EndpointClient(endpoint, api_key)
    results = []
    for path in paths:
        try:
            results.append({"file": str(path), "classes": client.predict_file(path, top_k)})
        except OSError as exc:
            results.append({"file": str(path), "error": f"unreadable: {exc.strerror or exc}"})
        except ImgtuneError as exc:
            if "answered 4" not in exc.message:
                raise  # the endpoint is down or broken: no point going on
            results.append({"file": str(path), "error": exc.message})
    return results


def batch_transform(
    job: str | Path | Job,
    source: str | Path,
    output: str | Path,
    *,
    top_k: int = 5,
    batch_size: int = 32,
    backend: str = "auto",
    workspace: Workspace = None,
    progress: bool = True,
) -> Any:
    """Classify every file under a folder or s3:// prefix into a .csv or .jsonl file (resumable); returns the
    summary (`TransformSummary`)."""
    from imgtune.serving.batch_transform import batch_transform as transform
    from imgtune.serving.batch_transform import output_format

    output_format(output)  # a bad output name: refused before the model loads
    predictor = load_predictor(job, backend=backend, workspace=workspace)
    return transform(predictor, str(source), output, top_k=top_k, batch_size=batch_size, progress=progress)


def export(
    job: str | Path | Job,
    out: str | Path,
    *,
    format: str = "onnx",  # noqa: A002 (the CLI's --format)
    triton: bool = False,
    force: bool = False,
    name: str | None = None,
    calibration_data: str | Path | None = None,
    workspace: Workspace = None,
) -> Any:
    """Write a job's model (or a bundle directory's, or an MLflow model's) into `out` as a self-contained model
    that serves without imgtune: `onnx`, `onnx-int8` (calibrated on the job's training photos, or on
    `calibration_data`), `openvino` or `torchscript`, with labels.txt, classes.json, preprocessing.json and a
    README; with `triton`, laid out as a Triton model repository (`out/NAME/config.pbtxt`, `out/NAME/1/...`).
    `force` replaces an earlier export in `out`. Returns what was written (`ExportResult`)."""
    from imgtune.models.export import FORMATS, export_bundle
    from imgtune.serving.predictor import resolve_model_dir

    if format not in FORMATS:  # before the job is looked up (an MLflow model is fetched)
        raise ConfigError(f"unknown export format {format!r}", f"choose one of {', '.join(FORMATS)}")
    model_dir = resolve_model_dir(model_source(job), workspace)
    return export_bundle(
        model_dir, format, out, triton=triton, force=force, name=name, calibration_data=calibration_data
    )


def write_report(
    job: str | Path | Job, *, out: str | Path | None = None, rules: bool = True, workspace: Workspace = None
) -> Path:
    """Write a job's self-contained HTML report (evaluating the profiler rules again first, unless `rules` is
    False); a job of an s3:// workspace gets its report pushed too. Returns the file."""
    from imgtune.report import REPORT_FILE
    from imgtune.report import write_report as render
    from imgtune.runs.lifecycle import amend_job

    handle = job if isinstance(job, Job) else open_job(job, workspace, shallow=True)
    if handle.record().kind != "tuning":  # (a tuning job's report pulls only the few trials it draws)
        from imgtune.profiler import PROFILER_DIR, analyze_job  # (torch: seconds to load, for a training job only)

        handle.pull()  # a training job's report reads its debugger and profiler folders too
        if rules and (handle.path / PROFILER_DIR).exists():
            amend_job(handle, {"profiler": analyze_job(handle)})
    path = render(handle, Path(out) if out else None)
    if path.resolve() == (handle.path / REPORT_FILE).resolve():  # the job's own report: its bucket gets it too
        amend_job(handle, files=[path])
    return path


def export_tensorboard(job: str | Path | Job, out: str | Path | None = None, workspace: Workspace = None) -> dict:
    """A job's metrics, debugger tensors (histograms) and profiler step segments as TensorBoard event files in
    `out` (default JOB/tensorboard); an export run again adds only what is new. Returns where and how much."""
    from imgtune.tracking.tensorboard import export_job

    handle = job if isinstance(job, Job) else Job.open(job, workspace)
    folder, written = export_job(handle, out)
    return {"job": handle.name, "out": str(folder), "points": written, "view": f"tensorboard --logdir {folder}"}


def open_job(job: str | Path, workspace: Workspace = None, *, shallow: bool = False) -> Job:
    """A job by name (in the workspace: ./imgtune-runs, $IMGTUNE_WORKSPACE or s3://...) or by path. A job of an
    s3:// workspace is pulled into its local mirror first: with `shallow`, only its top files (job.json,
    metrics, log, report), enough for `job_summary`, `job_details` and `tuning_summary`, and quick for a tuning
    job of 1,000 trials, whose trials stay in the bucket."""
    return Job.open(job, workspace, shallow=shallow)


def list_jobs(workspace: Workspace = None) -> list[Job]:
    """The workspace's jobs, newest first."""
    from imgtune.storage.jobs import list_jobs as jobs_in

    return list(jobs_in(workspace))


def workspace_label(workspace: Workspace = None) -> str:
    """How to show a workspace to a person: its s3:// address, or its folder."""
    from imgtune.storage.jobs import workspace_label as label

    return label(workspace)
