"""`imgtune data check`, `imgtune data download`: datasets before any job."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

import imgtune
from imgtune.cli import render
from imgtune.cli.common import JsonOption, api_default, field_option, friendly_errors, out, print_json
from imgtune.config import DataConfig

data_app = typer.Typer(help="Check and download datasets.", no_args_is_help=True)


@data_app.command("check")
@friendly_errors
def data_check(
    path: Annotated[str, typer.Argument(help="Dataset folder or s3:// prefix.")],
    max_pixels: int = field_option(DataConfig, "max_image_pixels", "--max-pixels"),
    as_json: JsonOption = False,
) -> None:
    """Check every image: counts per class and split, sizes, modes and each problem file with its reason.

    Exits 2 only when a problem stops training (no training images, fewer than two usable classes).
    """
    report = imgtune.check_data(path, max_pixels=max_pixels, progress=not as_json).to_dict()
    print_json(report) if as_json else render.data_check(report)
    if report["fatal"]:
        raise typer.Exit(2)


@data_app.command("download")
@friendly_errors
def data_download(
    name: Annotated[str, typer.Argument(help="Dataset name: dogimages.")],
    dest: Path = typer.Option(
        api_default(imgtune.download_dataset, "dest"), help="Folder to download and unpack into."
    ),
    url: Annotated[str | None, typer.Option(help="A mirror of the archive.")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of the archive.")] = None,
    keep_archive: Annotated[bool, typer.Option(help="Keep the zip after unpacking.")] = False,
) -> None:
    """Download and unpack a dataset (resumable, size and checksum checked)."""
    folder = imgtune.download_dataset(name, dest, url=url, sha256=sha256, keep_archive=keep_archive)
    out.print(f"dataset ready: {folder}")
    out.print(f"next: imgtune data check {folder}  and  imgtune train --data {folder}")


def register(app: typer.Typer) -> None:
    app.add_typer(data_app, name="data")
