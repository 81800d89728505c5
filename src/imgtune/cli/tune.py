"""`imgtune tune`, `imgtune tune show`, `imgtune tune best`: tuning jobs on Ray Tune.

Ray is never imported here: `imgtune.tune` first points it at the right cluster (a resumed job's own), which
has to happen before Ray is imported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    field_option,
    friendly_errors,
    out,
    print_json,
    tracking_overrides,
)
from imgtune.config import DataConfig, ModelConfig, TrainConfig, TuneOptions
from imgtune.core.errors import ImgtuneError

tune_app = typer.Typer(
    help="Tune hyperparameters on Ray Tune: each trial is a training job judged on the validation split (never "
    "test); with a frozen backbone all trials share one feature cache. `imgtune tune show JOB` lists the trials, "
    "`imgtune tune best JOB --train` trains the final model.",
    invoke_without_command=True,
)
TuningJobArgument = Annotated[str, typer.Argument(help="Tuning job name or path.")]


@tune_app.callback()
@friendly_errors
def tune(
    ctx: typer.Context,
    data: str | None = field_option(DataConfig, "path", default=None),
    space: Annotated[
        Path | None,
        typer.Option(
            help="Search space YAML, or a named one: 'finetune' (an unfrozen backbone: lr, backbone lr ratio, "
            "warmup, augmentation, freeze, head-only epochs) \\[default: lr 0.001-0.1 log, batch size]."
        ),
    ] = None,
    strategy: str = field_option(TuneOptions, "strategy"),  # a str: TuneOptions says "unknown strategy 'x'"
    max_trials: int = field_option(TuneOptions, "max_trials"),
    max_parallel: int = field_option(TuneOptions, "max_parallel"),
    heads_per_worker: int = field_option(TuneOptions, "heads_per_worker"),
    objective: str = field_option(TuneOptions, "objective"),
    early_stopping: str = field_option(TuneOptions, "early_stopping"),
    cpus_per_trial: float = field_option(TuneOptions, "cpus_per_trial"),
    gpus_per_trial: float = field_option(TuneOptions, "gpus_per_trial"),
    workers_per_trial: int = field_option(TuneOptions, "workers_per_trial"),
    time_budget: float | None = field_option(TuneOptions, "time_budget_s", "--time-budget"),
    stop_after: int | None = field_option(TuneOptions, "stop_after_no_improvement", "--stop-after"),
    seed: int = field_option(TuneOptions, "seed"),
    ray_address: str | None = field_option(TuneOptions, "ray_address"),
    warm_start: list[str] | None = field_option(
        TuneOptions, "warm_start", default=None, help="Earlier tuning job whose trials seed the searcher (repeatable)."
    ),
    backbone: str | None = field_option(ModelConfig, "backbone", default=None),
    weights: str | None = field_option(ModelConfig, "weights", default=None),
    epochs: int | None = field_option(TrainConfig, "epochs", default=None, help="Epochs per trial."),
    name: str | None = field_option(TuneOptions, "name"),
    config: Annotated[Path | None, typer.Option(help="YAML job config every trial starts from.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key of the trials' config.")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue a tuning job whose driver was killed.")] = None,
    force: ForceOption = False,
    mlflow: MlflowOption = False,
    mlflow_uri: MlflowUriOption = None,
    experiment: ExperimentOption = None,
    register_name: RegisterOption = None,
    alias: AliasOption = None,
    tensorboard: TensorboardOption = False,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Tune hyperparameters: each trial is a training job inside the tuning job, judged on the validation split
    (never the test split). With a frozen backbone all trials share one feature cache, computed first.
    `imgtune tune show JOB` lists the trials; `imgtune tune best JOB --train` trains the final model."""
    if ctx.invoked_subcommand is not None:
        return
    tracking = tracking_overrides(mlflow, mlflow_uri, experiment, register_name, alias, tensorboard)
    if resume:
        job = imgtune.tune(
            workspace=workspace, resume=resume, force=force, progress=not as_json, ray_address=ray_address
        )
    else:
        job = imgtune.tune(
            data, space=space, config=config, overrides=[*(set_ or ()), *tracking], backbone=backbone, weights=weights,
            epochs=epochs, workspace=workspace, progress=not as_json, strategy=strategy, max_trials=max_trials,
            max_parallel=max_parallel, heads_per_worker=heads_per_worker, objective=objective,
            early_stopping=early_stopping, cpus_per_trial=cpus_per_trial, gpus_per_trial=gpus_per_trial,
            workers_per_trial=workers_per_trial, time_budget_s=time_budget,
            stop_after_no_improvement=stop_after, seed=seed, ray_address=ray_address, warm_start=warm_start or [],
            name=name,
        )  # fmt: skip
    _print_trials(job, as_json)


def _print_trials(job: imgtune.Job, as_json: bool, show_all: bool = False) -> None:
    summary = imgtune.tuning_summary(job)
    print_json(summary) if as_json else render.tuning_trials(summary, None if show_all else render.SHOWN_TRIALS)


@tune_app.command("show")
@friendly_errors
def tune_show(
    job: TuningJobArgument,
    show_all: Annotated[
        bool, typer.Option("--all", help=f"List every trial \\[default: the best {render.SHOWN_TRIALS}].")
    ] = False,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """The trials of a tuning job, best first: hyperparameters, objective, status, epochs, duration (--json: every
    trial, with the tracebacks of those that errored)."""
    _print_trials(imgtune.open_tuning_job(job, workspace, shallow=True), as_json, show_all)


@tune_app.command("best")
@friendly_errors
def tune_best(
    job: TuningJobArgument,
    train_final: Annotated[
        bool, typer.Option("--train", help="Train the final model with them (debugger and profiler on).")
    ] = False,
    name: Annotated[str | None, typer.Option(help="Name of the final training job.")] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """The best hyperparameters of a tuning job (with their real types); --train trains the final model."""
    handle = imgtune.open_tuning_job(job, workspace, shallow=True)
    best = imgtune.tuning_summary(handle)["best"]
    if not best:
        raise ImgtuneError(f"tuning job {handle.name} has no finished trial", "see `imgtune tune show`")
    if not train_final:
        if as_json:
            print_json(best)
        else:
            out.print(render.hyperparameters(best))
        return
    summary = imgtune.job_summary(imgtune.train_best(handle, name=name, progress=not as_json))
    print_json(summary) if as_json else render.job_summary(summary)


def register(app: typer.Typer) -> None:
    app.add_typer(tune_app, name="tune")
