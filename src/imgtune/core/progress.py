"""Progress display on stderr, so that `--json` output on stdout stays machine-readable."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


@contextlib.contextmanager
def status(message: str, enabled: bool = True) -> Iterator[None]:
    """A spinner with a message while a block runs."""
    if not enabled:
        yield
        return
    with console.status(message):
        yield


def progress_bar(enabled: bool = True, transient: bool = False) -> Progress:
    """A Rich progress bar with count, elapsed and remaining time; a no-op display when disabled."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[info]}"),
        console=console,
        disable=not enabled,
        transient=transient,
    )
