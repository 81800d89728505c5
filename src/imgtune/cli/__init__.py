"""The `imgtune` command: one module per command group, each parsing options, calling the public API (`imgtune.*`)
and printing what it returns with Rich (render.py) or as JSON (--json)."""

from __future__ import annotations

from typing import Annotated

import typer

from imgtune.cli import data, debug, jobs, serve, train, tune
from imgtune.cli.common import out
from imgtune.core.version import __version__

app = typer.Typer(
    name="imgtune",
    help="Train, tune, debug, profile and serve image classifiers on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        out.print(f"imgtune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """imgtune: a folder of photos and a pretrained CNN in, a tuned, debugged, profiled classifier out."""


# train, demo, pipeline; report, evaluate; deploy, predict, batch-transform; then the groups jobs, tune, data, debug
for group in (train, jobs, serve, tune, data, debug):
    group.register(app)

__all__ = ["app"]
