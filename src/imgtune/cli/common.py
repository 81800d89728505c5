"""What every command shares: the consoles, the common options, error handling, JSON output, and options whose
default and help come from where the library defines them (a pydantic field, a public function's signature)."""

from __future__ import annotations

import functools
import inspect
import signal
import sys
from collections.abc import Callable
from typing import Annotated, Any, Literal, TypeVar, get_args, get_origin

import typer
from pydantic import BaseModel
from rich.console import Console
from rich.markup import escape

from imgtune.core.errors import ImgtuneError

out = Console()
err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

ForceOption = Annotated[
    bool,
    typer.Option(
        "--force", help="With --resume: resume a job recorded as running on another machine (that machine is gone)."
    ),
]
WorkspaceOption = Annotated[
    str | None,
    typer.Option(
        "--workspace",
        envvar="IMGTUNE_WORKSPACE",
        help="Where jobs live: a folder, or s3://bucket/prefix to keep them in a bucket \\[default: ./imgtune-runs].",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]
JobArgument = Annotated[str, typer.Argument(help="Job name or path.")]

# Trackers (config `tracking.*`): the same options on train, tune and pipeline.
MlflowOption = Annotated[
    bool, typer.Option("--mlflow", help="Make the job an MLflow run (pip install 'imgtune\\[mlflow]').")
]
MlflowUriOption = Annotated[
    str | None,
    typer.Option(
        "--mlflow-uri",
        help="MLflow tracking URI (implies --mlflow) \\[default: $MLFLOW_TRACKING_URI, else MLflow's local store].",
    ),
]
ExperimentOption = Annotated[str | None, typer.Option("--experiment", help="MLflow experiment \\[default: imgtune].")]
RegisterOption = Annotated[
    str | None,
    typer.Option("--register", help="Register the trained model in MLflow's registry under this name (a version)."),
]
AliasOption = Annotated[
    str | None, typer.Option("--alias", help="With --register: point this alias (e.g. champion) at the version.")
]
TensorboardOption = Annotated[
    bool, typer.Option("--tensorboard", help="Write TensorBoard event files into JOB/tensorboard as it trains.")
]


def tracking_overrides(
    mlflow: bool = False,
    mlflow_uri: str | None = None,
    experiment: str | None = None,
    register: str | None = None,
    alias: str | None = None,
    tensorboard: bool = False,
) -> list[str]:
    """The tracker options as `--set` overrides of `tracking.*` (a URI, experiment or name implies --mlflow)."""
    import json

    values = {"mlflow_uri": mlflow_uri, "experiment": experiment, "registered_model": register, "alias": alias}
    overrides = [f"tracking.{key}={json.dumps(value)}" for key, value in values.items() if value is not None]
    if mlflow or overrides:
        overrides.insert(0, "tracking.mlflow=true")
    if tensorboard:
        overrides.append("tracking.tensorboard=true")
    return overrides


def friendly_errors(func: F) -> F:
    """Turn ImgtuneError into one clear line on stderr (and its hint) with its exit code (2); Ctrl-C exits 130."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # SIGTERM (a scheduler, `kill`) ends a job like Ctrl-C: recorded as stopped, resumable.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            return func(*args, **kwargs)
        except ImgtuneError as exc:
            err.print(f"[bold red]error:[/] {escape(exc.message)}", highlight=False)
            if exc.hint:
                err.print(f"[dim]hint:[/] {escape(exc.hint)}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def print_json(data: Any) -> None:
    from imgtune.core.io import to_json

    sys.stdout.write(to_json(data, indent=2) + "\n")


_FROM_MODEL: Any = object()


def field_option(
    model: type[BaseModel],
    name: str,
    *param_decls: str,
    default: Any = _FROM_MODEL,
    help: str | None = None,  # noqa: A002 (typer's name)
    **kwargs: Any,
) -> Any:
    """A typer.Option for the field `name` of `model`, so that no default is written twice.

    The option's default is the field's (required if the field is), or `default`: None for a flag that must not
    override a config file, whose help still names the field's default. The help is the field's description (or
    `help`), plus the choices of a Literal field it does not name, ending with "[default: X]".
    """
    field = model.model_fields[name]
    model_default = None if field.is_required() else field.get_default(call_default_factory=True)
    text = help or field.description or ""
    choices = [str(c) for c in get_args(field.annotation)] if get_origin(field.annotation) is Literal else []
    if choices and not all(choice in text for choice in choices):
        text = f"{text.rstrip('.')}: {' | '.join(choices)}."
    text = escape(text)  # "[default: ...]" in a description is text, not Rich markup
    if default is _FROM_MODEL:
        default = ... if field.is_required() else model_default
    shown = model_default if default is None else default
    if shown not in (None, ..., "", (), [], {}) and "[default:" not in text:
        text += f" \\[default: {shown}]"
    return typer.Option(default, *param_decls, help=text, show_default=False, **kwargs)


def command_help(func: Callable[..., Any]) -> str:
    """A command's help from its docstring, each paragraph on one line (Rich keeps a docstring's line breaks,
    which then break lines mid-sentence on any terminal width)."""
    paragraphs = inspect.cleandoc(func.__doc__ or "").split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def api_default(func: Callable[..., Any], name: str) -> Any:
    """The default of a public function's parameter (`imgtune.predict`'s top_k ...): the CLI's default too."""
    return inspect.signature(func).parameters[name].default
