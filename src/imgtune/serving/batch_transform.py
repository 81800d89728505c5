"""Batch transform: classify every file under a folder or an s3:// prefix into a CSV or JSON Lines file.

Each input file gets one output row: its top-k classes, or the reason it could not be read (a bad file is a
row, not a failure). Rows are appended and flushed batch by batch, so a killed run resumes where it stopped:
files already in the output are skipped, and a half-written last line is dropped first.
"""

from __future__ import annotations

import csv
import io
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from imgtune.core.errors import ConfigError, DataError
from imgtune.data.check import MAX_IMAGE_PIXELS, BadImage
from imgtune.data.folders import files_below
from imgtune.data.sources import is_remote
from imgtune.serving.predictor import Predictor

FORMATS = {".csv": "csv", ".jsonl": "jsonl"}
CSV_COLUMNS = ("file", "status", "label", "probability", "top_k", "error")
MAX_FILE_BYTES = 64 * 1024 * 1024


@dataclass
class TransformSummary:
    output: str
    files: int
    predicted: int
    failed: int
    already_done: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


class InputFiles:
    """The files under a local folder or a remote prefix, in a stable order, readable as bytes."""

    def __init__(self, source: str):
        self.source = source.rstrip("/")
        if is_remote(source):
            import fsspec

            self.fs, self.root = fsspec.core.url_to_fs(self.source)
            self.protocol = self.source.split("://", 1)[0]
        else:
            # absolute: a resumed run finds its files however the folder is spelled the second time
            self.fs, self.root, self.protocol = None, str(Path(source).expanduser().absolute()), ""
            if not Path(self.root).is_dir():
                raise DataError(f"input folder not found: {source}", "give a folder of images or an s3:// prefix")

    def names(self) -> list[str]:
        if self.fs is None:
            return [str(p) for p in files_below(Path(self.root))]
        self.fs.invalidate_cache()
        keys = self.fs.find(self.root)
        return sorted(f"{self.protocol}://{key}" for key in keys if not Path(key).name.startswith("."))

    def read(self, name: str) -> bytes:
        if self.fs is None:
            size = os.path.getsize(name)
            if size > MAX_FILE_BYTES:
                raise BadImage(f"{size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit")
            return Path(name).read_bytes()
        key = name.split("://", 1)[1]
        size = self.fs.size(key)
        if size is not None and size > MAX_FILE_BYTES:
            raise BadImage(f"{size:,} bytes, over the {MAX_FILE_BYTES:,}-byte limit")
        return self.fs.cat_file(key)


def output_format(output: str | Path) -> str:
    kind = FORMATS.get(Path(output).suffix.lower())
    if kind is None:
        raise ConfigError(f"unknown output format {Path(output).suffix or '(none)'}", "name the output .csv or .jsonl")
    return kind


def completed_rows(output: Path, kind: str) -> set[str]:
    """Files already in an output from an earlier run; a half-written last line is cut off first."""
    if not output.exists():
        return set()
    data = output.read_bytes()
    complete = data[: data.rfind(b"\n") + 1]
    if len(complete) != len(data):
        with output.open("r+b") as handle:
            handle.truncate(len(complete))
    text = complete.decode()
    if kind == "jsonl":
        return {json.loads(line)["file"] for line in text.splitlines() if line.strip()}
    return {row["file"] for row in csv.DictReader(io.StringIO(text))}


def _row(name: str, kind: str, classes: list[dict] | None, error: str | None) -> str:
    if kind == "jsonl":
        record = {"file": name, "status": "ok" if error is None else "error"}
        record.update({"classes": classes} if error is None else {"error": error})
        return json.dumps(record) + "\n"
    buffer = io.StringIO()
    best = classes[0] if classes else {}
    csv.writer(buffer, lineterminator="\n").writerow(
        [name, "ok" if error is None else "error", best.get("label", ""), best.get("probability", ""),
         json.dumps(classes) if classes else "", error or ""]
    )  # fmt: skip
    return buffer.getvalue()


def _batches(items: list[str], size: int) -> Iterator[list[str]]:
    for start in range(0, len(items), size):
        yield items[start : start + size]


def classify_files(
    predictor: Predictor,
    names: list[str],
    read: Callable[[str], bytes],
    top_k: int = 5,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    map_: Callable[..., Iterable[Any]] = map,
) -> list[dict[str, Any]]:
    """Each file's top-k classes, `{"file", "classes"}`, or why it is not a usable image, `{"file", "error"}`,
    in order; the usable ones go through the model in one forward pass. `map_` may load them in threads."""

    def load(name: str) -> tuple[str, Any, str | None]:
        return name, *predictor.tensor_from(lambda: read(name), Path(name).suffix.lower(), max_image_pixels)

    loaded = list(map_(load, names))
    good = [tensor for _, tensor, error in loaded if error is None]
    rows = iter(predictor.logits(good) if good else [])
    return [
        {"file": name, "error": error}
        if error is not None
        else {"file": name, "classes": predictor.classes(next(rows), top_k)}
        for name, _, error in loaded
    ]


def batch_transform(
    predictor: Predictor,
    source: str,
    output: str | Path,
    *,
    top_k: int = 5,
    batch_size: int = 32,
    max_image_pixels: int = MAX_IMAGE_PIXELS,
    progress: bool = True,
) -> TransformSummary:
    """Classify every file under `source` into `output` (.csv or .jsonl), resuming an earlier run."""
    if batch_size < 1 or top_k < 1:
        raise ConfigError("batch size and top-k must be at least 1")
    output = Path(output)
    kind = output_format(output)
    inputs = InputFiles(source)
    names = inputs.names()
    done = completed_rows(output, kind)
    todo = [name for name in names if name not in done]
    started = time.perf_counter()
    predicted = failed = 0
    output.parent.mkdir(parents=True, exist_ok=True)
    fresh = not output.exists() or output.stat().st_size == 0

    from imgtune.core.progress import progress_bar

    with (
        output.open("a", newline="") as handle,
        ThreadPoolExecutor(max_workers=min(4, os.cpu_count() or 1)) as pool,
        progress_bar(enabled=progress) as bar,
    ):
        if fresh and kind == "csv":
            handle.write(",".join(CSV_COLUMNS) + "\n")
        task = bar.add_task("batch transform", total=len(todo), info=f"{len(done)} done earlier")
        for batch in _batches(todo, batch_size):
            results = classify_files(predictor, batch, inputs.read, top_k, max_image_pixels, pool.map)
            for result in results:
                handle.write(_row(result["file"], kind, result.get("classes"), result.get("error")))
            handle.flush()
            os.fsync(handle.fileno())
            bad = sum("error" in result for result in results)
            predicted += len(batch) - bad
            failed += bad
            bar.update(task, advance=len(batch), info=f"{failed} unreadable")
    seconds = time.perf_counter() - started
    return TransformSummary(str(output), len(names), predicted, failed, len(names) - len(todo), seconds)
