"""`imgtune train`, `imgtune demo`, `imgtune pipeline`: jobs that train (and, for the pipeline, tune and serve)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Any

import typer
from pydantic import BaseModel

import imgtune
from imgtune.cli import render
from imgtune.cli.common import (
    AliasOption,
    ExperimentOption,
    ForceOption,
    JsonOption,
    MlflowOption,
    MlflowUriOption,
    RegisterOption,
    TensorboardOption,
    WorkspaceOption,
    api_default,
    command_help,
    err,
    field_option,
    friendly_errors,
    print_json,
    tracking_overrides,
)
from imgtune.config import DataConfig, JobConfig, ModelConfig, PipelineOptions, TrainConfig


@friendly_errors
def train(
    data: str | None = field_option(DataConfig, "path", default=None),
    backbone: str | None = field_option(ModelConfig, "backbone", default=None),
    weights: str | None = field_option(ModelConfig, "weights", default=None),
    pretrained: str | None = field_option(ModelConfig, "pretrained", default=None),
    freeze: str | None = field_option(ModelConfig, "freeze", default=None),
    epochs: int | None = field_option(TrainConfig, "epochs", default=None, help="Epochs."),
    lr: float | None = field_option(TrainConfig, "lr", default=None, help="Learning rate."),
    batch_size: int | None = field_option(TrainConfig, "batch_size", default=None, help="Batch size."),
    image_size: int | None = field_option(DataConfig, "image_size", default=None),
    name: str | None = field_option(JobConfig, "name", default=None),
    recipe: str | None = field_option(JobConfig, "recipe", default=None),
    workers: int | None = field_option(TrainConfig, "workers", default=None),
    gpus_per_worker: float | None = field_option(TrainConfig, "gpus_per_worker", default=None),
    cpus_per_worker: float | None = field_option(TrainConfig, "cpus_per_worker", default=None),
    ray_address: Annotated[
        str | None,
        typer.Option(help="The Ray cluster the --workers run on (e.g. 10.0.0.1:6379) \\[default: in-process Ray]."),
    ] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file (its keys: see above).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override any config key: --set train.optimizer=sgd.")
    ] = None,
    resume: Annotated[str | None, typer.Option(help="Continue a killed job (name or path).")] = None,
    force: ForceOption = False,
    no_debugger: Annotated[bool, typer.Option("--no-debugger", help="Turn tensor capture and rules off.")] = False,
    rule_file: Annotated[
        list[str] | None,
        typer.Option(
            "--rule-file",
            help="Python file with debugger Rule classes (repeat for more); with --resume, the ones you trust: a job "
            "from a bucket runs no file its job.json names.",
        ),
    ] = None,
    no_profiler: Annotated[
        bool, typer.Option("--no-profiler", help="Turn the system monitor, step timeline and trace off.")
    ] = False,
    mlflow: MlflowOption = False,
    mlflow_uri: MlflowUriOption = None,
    experiment: ExperimentOption = None,
    register_name: RegisterOption = None,
    alias: AliasOption = None,
    tensorboard: TensorboardOption = False,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train a classifier on a folder of labelled photos; the job directory holds everything it made."""
    tracking = tracking_overrides(mlflow, mlflow_uri, experiment, register_name, alias, tensorboard)
    if resume:
        given = {
            "--data": data,
            "--backbone": backbone,
            "--weights": weights,
            "--pretrained": pretrained,
            "--freeze": freeze,
            "--epochs": epochs,
            "--lr": lr,
            "--batch-size": batch_size,
            "--image-size": image_size,
            "--name": name,
            "--recipe": recipe,
            "--workers": workers,
            "--gpus-per-worker": gpus_per_worker,
            "--cpus-per-worker": cpus_per_worker,
            "--config": config,
            "--set": set_,
            "--mlflow and the other tracker options": tracking,
        }
        ignored = [flag for flag, value in given.items() if value]
        if ignored:
            err.print(f"[yellow]note:[/] --resume continues with the job's own config; ignored: {', '.join(ignored)}")
        job = imgtune.train(
            resume=resume, workspace=workspace, progress=not as_json, force=force, ray_address=ray_address,
            rule_files=rule_file or (),
        )  # fmt: skip
    else:
        job = imgtune.train(
            data, config=config, overrides=[*(set_ or ()), *tracking], backbone=backbone, weights=weights,
            pretrained=pretrained, freeze=freeze, epochs=epochs, lr=lr, batch_size=batch_size, image_size=image_size,
            name=name, recipe=recipe, workers=workers, gpus_per_worker=gpus_per_worker, cpus_per_worker=cpus_per_worker,
            ray_address=ray_address, debugger=not no_debugger, profiler=not no_profiler, workspace=workspace,
            progress=not as_json, rule_files=rule_file or (),
        )  # fmt: skip
    summary = imgtune.job_summary(job)
    print_json(summary) if as_json else render.job_summary(summary)


def config_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """The keys of a config model as YAML and --set write them: `data.{path, image_size, ...}`, one entry per
    section; sections of the same kind share one (`debugger.{train, eval, predict}.{save_interval, ...}`)."""
    leaves: list[str] = []
    sections: dict[type[BaseModel], list[str]] = {}
    for name, field in model.model_fields.items():
        kind = field.annotation
        if isinstance(kind, type) and issubclass(kind, BaseModel):
            sections.setdefault(kind, []).append(name)
        else:
            leaves.append(name)
    keys = [prefix + _braced(leaves)] if leaves else []
    for kind, names in sections.items():
        keys += config_keys(kind, f"{prefix}{_braced(names)}.")
    return keys


def _braced(names: list[str]) -> str:
    return names[0] if len(names) == 1 else "{" + ", ".join(names) + "}"


def _say(as_json: bool) -> Any:
    """How the pipeline tells what it is doing: bold lines on stderr (nothing with --json)."""
    return (lambda message: None) if as_json else (lambda message: err.print(f"[bold]{message}[/]"))


def _print_pipeline(job: Any, as_json: bool) -> None:
    summary = imgtune.pipeline_summary(job)
    print_json(summary) if as_json else render.pipeline_summary(summary)


@friendly_errors
def demo(
    workspace: WorkspaceOption = None,
    epochs: int = field_option(PipelineOptions, "epochs", default=api_default(imgtune.demo, "epochs")),
    max_trials: int = field_option(PipelineOptions, "max_trials", default=api_default(imgtune.demo, "max_trials")),
    as_json: JsonOption = False,
) -> None:
    """The whole workflow on the built-in sample dataset (generated locally, no download).

    `imgtune pipeline` with a ResNet-18 trained from scratch on 64 px shapes; about two minutes on a 2-core CPU.
    """
    job = imgtune.demo(epochs=epochs, max_trials=max_trials, workspace=workspace, progress=not as_json,
                       say=_say(as_json))  # fmt: skip
    _print_pipeline(job, as_json)


@friendly_errors
def pipeline(
    data: str = field_option(PipelineOptions, "data"),
    backbone: str = field_option(PipelineOptions, "backbone"),
    weights: str | None = field_option(PipelineOptions, "weights"),
    epochs: int = field_option(PipelineOptions, "epochs"),
    max_trials: int = field_option(PipelineOptions, "max_trials"),
    max_parallel: int = field_option(PipelineOptions, "max_parallel"),
    port: int = field_option(PipelineOptions, "port"),
    keep_serving: Annotated[
        bool, typer.Option("--keep-serving", help="Leave the endpoint up at the end until Ctrl-C.")
    ] = False,
    name: str | None = field_option(PipelineOptions, "name"),
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key of every job's config.")] = None,
    mlflow: MlflowOption = False,
    mlflow_uri: MlflowUriOption = None,
    experiment: ExperimentOption = None,
    register_name: RegisterOption = None,
    alias: AliasOption = None,
    tensorboard: TensorboardOption = False,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """The original notebook end to end: data check, tuning, final training, a local endpoint, a summary.

    Checks the data, tunes learning rate x batch size, trains the final model with the best (debugger and profiler
    on), serves it, sends one test photo per class through the endpoint, and summarises. The endpoint stops at
    the end unless --keep-serving.
    """

    def wait(url: str) -> None:
        err.print(f"the endpoint stays up on {url} (its page: {url}/); Ctrl-C stops it", highlight=False)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass

    job = imgtune.pipeline(
        data, overrides=[*(set_ or ()), *tracking_overrides(mlflow, mlflow_uri, experiment, register_name, alias,
        tensorboard)], workspace=workspace, progress=not as_json, say=_say(as_json),
        keep_serving=wait if keep_serving else None, backbone=backbone, weights=weights, epochs=epochs,
        max_trials=max_trials, max_parallel=max_parallel, name=name, port=port,
    )  # fmt: skip
    _print_pipeline(job, as_json)


def register(app: typer.Typer) -> None:
    keys = ", ".join(config_keys(JobConfig))
    app.command(help=f"{command_help(train)}\n\nConfig keys (YAML sections or --set a.b=value): {keys}.")(train)
    app.command(help=command_help(demo))(demo)
    app.command(help=command_help(pipeline))(pipeline)
