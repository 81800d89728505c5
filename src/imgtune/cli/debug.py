"""`imgtune debug rules`, `imgtune debug show`, `imgtune debug plot`: what the debugger saved, read afterwards."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import imgtune
from imgtune.cli import render
from imgtune.cli.common import JobArgument, JsonOption, WorkspaceOption, api_default, friendly_errors, out, print_json

debug_app = typer.Typer(help="Debugger: rule results, offline rules, tensor plots.", no_args_is_help=True)


@debug_app.command("rules")
@friendly_errors
def debug_rules(
    job: JobArgument,
    rule: Annotated[
        list[str] | None, typer.Option("--rule", help="Rule to run (repeatable) \\[default: the job's].")
    ] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Rule parameter: Rule.key=value.")] = None,
    rule_file: Annotated[list[str] | None, typer.Option("--rule-file", help="Python file with Rule classes.")] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run debugger rules offline over a stored job (also one still running) and print their results."""
    handle = imgtune.open_job(job, workspace)
    results = imgtune.debug_rules(handle, rules=rule, params=param, rule_files=rule_file)
    print_json({"job": handle.name, "rules": results}) if as_json else render.rule_results(results)


@debug_app.command("show")
@friendly_errors
def debug_show(job: JobArgument, workspace: WorkspaceOption = None, as_json: JsonOption = False) -> None:
    """Show the rule results recorded while the job trained, and what the debugger saved."""
    results = imgtune.debug_results(job, workspace=workspace)
    print_json(results) if as_json else render.debugger_saved(results)


@debug_app.command("plot")
@friendly_errors
def debug_plot(
    job: JobArgument,
    tensor: Annotated[str, typer.Option(help="Tensor name, e.g. loss (see `imgtune debug show JOB --json`).")],
    out_file: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    reduction: str = typer.Option(
        api_default(imgtune.plot_tensor, "reduction"), help="min, max, mean, std, l1, l2, zeros."
    ),
    workspace: WorkspaceOption = None,
) -> None:
    """Draw a tensor over steps: train and eval on their own step axes (the original notebook's loss plot)."""
    imgtune.plot_tensor(job, tensor, out_file, reduction=reduction, workspace=workspace)
    out.print(f"wrote {out_file}")


def register(app: typer.Typer) -> None:
    app.add_typer(debug_app, name="debug")
