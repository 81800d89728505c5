"""`imgtune jobs`, `imgtune jobs show`, `imgtune report`, `imgtune evaluate`: reading and amending finished jobs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer

import imgtune
from imgtune.cli import render
from imgtune.cli.common import (
    JobArgument,
    JsonOption,
    WorkspaceOption,
    api_default,
    command_help,
    friendly_errors,
    out,
    print_json,
)

jobs_app = typer.Typer(help="List and inspect jobs.", invoke_without_command=True)


@jobs_app.callback()
@friendly_errors
def jobs_list(ctx: typer.Context, workspace: WorkspaceOption = None, as_json: JsonOption = False) -> None:
    """List jobs with status and best metric (newest first). `imgtune jobs show JOB` for one job."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"workspace": workspace}  # `imgtune jobs --workspace W show JOB`
        return
    rows = imgtune.jobs_overview(workspace)
    print_json(rows) if as_json else render.jobs_table(rows, imgtune.workspace_label(workspace))


@jobs_app.command("show")
@friendly_errors
def jobs_show(
    ctx: typer.Context, job: JobArgument, workspace: WorkspaceOption = None, as_json: JsonOption = False
) -> None:
    """Show one job: status, config, timings, dataset, metrics per epoch, test results (a tuning job: its best
    trials, as `imgtune tune show`)."""
    handle = imgtune.open_job(job, workspace or (ctx.obj or {}).get("workspace"), shallow=True)
    details = imgtune.job_details(handle)
    if as_json:
        print_json(details)
        return
    if details.get("kind") == "tuning":
        render.tuning_trials(imgtune.tuning_summary(handle))
        return
    render.job_summary(imgtune.job_summary(handle))
    render.job_details(details)


@friendly_errors
def report(
    job: JobArgument,
    out_file: Annotated[Path | None, typer.Option("--out", help="HTML file \\[default: JOB/report.html].")] = None,
    rules: bool = typer.Option(
        api_default(imgtune.write_report, "rules"),
        "--rules/--no-rules",
        help="Evaluate the profiler rules again first.",
    ),
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a job's report: one self-contained HTML file that opens offline in any browser.

    Summary, curves, test results, debugger and profiler rules, system usage, step timeline, top operators,
    recommendations.
    """
    handle = imgtune.open_job(job, workspace, shallow=True)  # write_report pulls what the report reads
    started = time.perf_counter()
    path = imgtune.write_report(handle, out=out_file, rules=rules)
    seconds = time.perf_counter() - started
    if as_json:
        print_json({"job": handle.name, "report": str(path), "seconds": seconds})
    else:
        out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {seconds:.1f} s")


@friendly_errors
def evaluate(
    job: JobArgument,
    data: Annotated[str, typer.Option(help="Dataset folder or s3:// prefix.")],
    split: str = typer.Option(api_default(imgtune.evaluate, "split"), help="train, valid, test, or all."),
    tta: Annotated[
        bool | None,
        typer.Option(
            "--tta/--no-tta",
            help="Average each image's and its mirror image's logits \\[default: as the job evaluated itself, "
            "its train.tta].",
            show_default=False,
        ),
    ] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate a job's model on a split of a dataset (top-1, top-5, per-class accuracy)."""
    result = imgtune.evaluate(job, data, split=split, workspace=workspace, progress=not as_json, tta=tta)
    print_json(result) if as_json else render.evaluation(result, split)


@friendly_errors
def tensorboard(
    job: JobArgument,
    out_dir: Annotated[
        Path | None, typer.Option("--out", help="Folder for the event files \\[default: JOB/tensorboard].")
    ] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a job's metrics, debugger tensors (as histograms) and profiler step segments as TensorBoard event
    files, and print the command that shows them (pip install 'imgtune\\[tensorboard]')."""
    result = imgtune.export_tensorboard(imgtune.open_job(job, workspace), out=out_dir)
    if as_json:
        print_json(result)
    else:
        out.print(f"wrote {result['points']} points to {result['out']}; view them with:", highlight=False)
        out.print(f"  {result['view']}", highlight=False)


def register(app: typer.Typer) -> None:
    app.command(help=command_help(report))(report)
    app.command(help=command_help(evaluate))(evaluate)
    app.command(help=command_help(tensorboard))(tensorboard)
    app.add_typer(jobs_app, name="jobs")
