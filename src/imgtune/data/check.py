"""Checking every file of a dataset before training: what is usable, what is not, and why.

Each file is opened and fully decoded once (in worker processes), so training never meets a bad file
mid-epoch. Results are cached by path, size and modification time, so checking a dataset again is quick.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import statistics
import threading
import warnings
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from imgtune.config import MAX_IMAGE_PIXELS
from imgtune.core.io import atomic_write_json
from imgtune.core.resources import default_workers
from imgtune.data.folders import ALL, SPLITS, ClassInfo, FolderLayout, discover

warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)  # we refuse those ourselves
SUPPORTED_FORMATS = ("JPEG", "MPO", "PNG", "BMP", "WEBP", "TIFF")  # MPO: phone JPEGs with extra frames
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".jfif"}
_CHECK_VERSION = 1


@dataclass
class FileInfo:
    """What one file turned out to be. `problem` is None for a usable image."""

    path: str
    bytes: int
    sha1: str = ""
    format: str = ""
    mode: str = ""
    width: int = 0
    height: int = 0
    problem: str | None = None


@dataclass
class FileProblem:
    path: str
    split: str
    class_id: str
    reason: str


@dataclass
class Issue:
    """A dataset-level finding. Errors stop training; warnings do not."""

    severity: str  # "error" | "warning"
    message: str


@dataclass
class CheckReport:
    root: str
    kind: str
    classes: list[ClassInfo]
    good: dict[str, dict[str, list[FileInfo]]]  # split -> class id -> usable images
    problems: list[FileProblem] = field(default_factory=list)
    issues: list[Issue] = field(default_factory=list)

    @property
    def fatal(self) -> bool:
        return any(i.severity == "error" for i in self.issues)

    def counts(self) -> dict[str, dict[str, int]]:
        return {s: {c.id: len(self.good.get(s, {}).get(c.id, [])) for c in self.classes} for s in self.good}

    def modes(self) -> dict[str, int]:
        return dict(Counter(f.mode for per in self.good.values() for fs in per.values() for f in fs))

    def formats(self) -> dict[str, int]:
        return dict(Counter(f.format for per in self.good.values() for fs in per.values() for f in fs))

    def size_summary(self) -> dict[str, int]:
        infos = [f for per in self.good.values() for fs in per.values() for f in fs]
        if not infos:
            return {}
        widths, heights = [f.width for f in infos], [f.height for f in infos]
        return {
            "min_width": min(widths),
            "median_width": int(statistics.median(widths)),
            "max_width": max(widths),
            "min_height": min(heights),
            "median_height": int(statistics.median(heights)),
            "max_height": max(heights),
        }

    def to_dict(self) -> dict[str, Any]:
        counts = self.counts()
        return {
            "root": self.root,
            "layout": self.kind,
            "splits": list(self.good),
            "classes": [asdict(c) for c in self.classes],
            "images": {s: sum(c.values()) for s, c in counts.items()},
            "images_per_class": counts,
            "modes": self.modes(),
            "formats": self.formats(),
            "sizes": self.size_summary(),
            "problem_files": [asdict(p) for p in self.problems],
            "issues": [asdict(i) for i in self.issues],
            "fatal": self.fatal,
        }


class BadImage(ValueError):
    """Bytes that are not a usable image; the message says why (not an image, truncated, too large ...)."""


def decode_image(data: bytes, max_pixels: int, suffix: str = "") -> Image.Image:
    """Fully decode image bytes in a supported format, refusing images over `max_pixels` before decoding them.

    Safe to call from many threads at once (the endpoint does): PIL's process-wide limit is only lifted, under
    a lock, when `max_pixels` is above it.

    Raises:
        BadImage: the reason, worded for a person (a data check's problem, an endpoint's 400).
    """
    if not data:
        raise BadImage("zero-byte file")
    too_large = f"exceeds the limit of {max_pixels:,} pixels (possible decompression bomb)"
    try:
        img = _open_within(data, max_pixels)
        width, height = img.size
        if img.format not in SUPPORTED_FORMATS:
            raise BadImage(f"unsupported format {img.format} (supported: {', '.join(SUPPORTED_FORMATS)})")
        if width * height > max_pixels:
            raise BadImage(f"declared size {width}x{height} {too_large}")
        img.load()
        return img
    except BadImage:
        raise
    except Image.DecompressionBombError:
        raise BadImage(f"declared size {too_large}") from None
    except UnidentifiedImageError:
        mismatch = f" (content does not match its {suffix} name)" if suffix else ""
        raise BadImage("not an image" + mismatch) from None
    except OSError as exc:
        text = str(exc)
        raise BadImage(("truncated image: " if "truncated" in text else "corrupt image: ") + text) from None
    except Exception as exc:  # decoders raise assorted errors on garbage
        raise BadImage(f"corrupt image: {type(exc).__name__}: {exc}") from None


def declared_pixels(data: bytes, max_pixels: int) -> int | None:
    """The pixel count an image's header declares, read without decoding (None when it does not open, or
    declares more than PIL opens under `max_pixels`: decode_image refuses those on its own)."""
    try:
        with _open_within(data, max_pixels) as img:
            width, height = img.size
            return width * height
    except Exception:  # over PIL's own limit, or not an image: decode_image says which, image by image
        return None


_PIL_LIMIT = threading.Lock()


def _open_within(data: bytes, max_pixels: int) -> Image.Image:
    """Image.open, with PIL's own pixel limit lifted only when ours is higher (PIL's limit is a global)."""
    if Image.MAX_IMAGE_PIXELS is None or max_pixels <= Image.MAX_IMAGE_PIXELS:
        return Image.open(io.BytesIO(data))  # PIL refuses (or warns about) only sizes we refuse anyway
    with _PIL_LIMIT:
        saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
        try:
            return Image.open(io.BytesIO(data))
        finally:
            Image.MAX_IMAGE_PIXELS = saved


def inspect_file(path: str | Path, max_pixels: int) -> FileInfo:
    """Open and fully decode one file; say what is wrong with it, if anything."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        return FileInfo(str(path), 0, problem=f"unreadable file: {exc.strerror or exc}")
    info = FileInfo(str(path), len(data), sha1=hashlib.sha1(data).hexdigest())
    try:
        with decode_image(data, max_pixels, path.suffix.lower()) as img:
            info.format, info.mode, (info.width, info.height) = img.format or "", img.mode, img.size
    except BadImage as exc:
        info.problem = str(exc)
    return info


def _inspect_many(paths: list[Path], max_pixels: int, workers: int) -> list[FileInfo]:
    if workers <= 1 or len(paths) < 64:
        return [inspect_file(p, max_pixels) for p in paths]
    with ProcessPoolExecutor(max_workers=workers) as pool:
        chunk = max(16, len(paths) // (workers * 8))
        return list(pool.map(inspect_file, paths, [max_pixels] * len(paths), chunksize=chunk))


class _CheckCache:
    """Per-file results keyed by path, size and mtime, in the imgtune cache directory."""

    def __init__(self, root: Path, max_pixels: int, cache_dir: Path | None):
        key = hashlib.sha1(f"{root.resolve()}|{max_pixels}|{_CHECK_VERSION}".encode()).hexdigest()[:16]
        self.file = cache_dir / "checks" / f"{key}.json" if cache_dir else None
        self.entries: dict[str, Any] = {}
        if self.file and self.file.exists():
            try:
                self.entries = json.loads(self.file.read_text())
            except (OSError, json.JSONDecodeError):
                self.entries = {}

    @staticmethod
    def _stamp(path: Path) -> list[int]:
        st = path.stat()
        return [st.st_size, st.st_mtime_ns]

    def get(self, path: Path) -> FileInfo | None:
        entry = self.entries.get(str(path))
        if entry and entry["stamp"] == self._stamp(path):
            return FileInfo(**entry["info"])
        return None

    def put(self, path: Path, info: FileInfo) -> None:
        with contextlib.suppress(OSError):  # a file that went away while being checked: nothing to remember
            self.entries[str(path)] = {"stamp": self._stamp(path), "info": asdict(info)}

    def save(self) -> None:
        if self.file:
            atomic_write_json(self.file, self.entries)


def check_layout(
    layout: FolderLayout,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    workers: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> CheckReport:
    """Inspect every file of `layout` and judge the dataset as a whole."""
    workers = default_workers() if workers is None else workers
    cache = _CheckCache(layout.root, max_pixels, cache_dir)
    entries = [(s, c, p) for s, per in layout.files.items() for c, ps in per.items() for p in ps]
    infos: dict[Path, FileInfo] = {}
    todo = []
    for _, _, path in entries:
        cached = cache.get(path)
        if cached is None:
            todo.append(path)
        else:
            infos[path] = cached
    if todo:
        from imgtune.core.progress import status

        with status(f"Checking {len(todo):,} files", enabled=progress):
            for path, info in zip(todo, _inspect_many(todo, max_pixels, workers), strict=True):
                infos[path] = info
                cache.put(path, info)
        cache.save()

    report = CheckReport(root=str(layout.root), kind=layout.kind, classes=layout.classes, good={})
    for split, per_class in layout.files.items():
        report.good[split] = {}
        for class_id in (c.id for c in layout.classes):
            good = []
            for path in per_class.get(class_id, []):
                info = infos[path]
                if info.problem:
                    report.problems.append(FileProblem(str(path), split, class_id, info.problem))
                else:
                    good.append(info)
            report.good[split][class_id] = good
    for path in layout.stray_files:
        report.problems.append(FileProblem(str(path), "", "", "file outside any class folder (ignored)"))
    _judge(layout, report)
    return report


def _judge(layout: FolderLayout, report: CheckReport) -> None:
    """Dataset-level issues: empty classes, missing splits, classes missing from a split, leaks."""
    issues = report.issues
    counts = report.counts()
    train_split = "train" if layout.kind == "splits" else ALL
    for split in layout.missing_splits:
        issues.append(
            Issue(
                "error" if split == "train" else "warning",
                f"no {split} split"
                + ("" if split == "train" else " (set data.carve_missing=true to carve one from train, seeded)"),
            )
        )
    if train_split in counts:
        train_counts = counts[train_split]
        usable = [cid for cid, n in train_counts.items() if n > 0]
        for cid, n in train_counts.items():
            if n == 0:
                issues.append(Issue("warning", f"class {cid!r} has no usable {train_split} images: it is left out"))
        if not usable:
            issues.append(Issue("error", f"no usable images in the {train_split} split"))
        elif len(usable) < 2:
            issues.append(Issue("error", f"only one class ({usable[0]!r}) has usable images; need at least two"))
        for split in (s for s in SPLITS if s != "train" and s in counts):
            missing = [cid for cid in usable if counts[split].get(cid, 0) == 0]
            if missing:
                shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
                issues.append(Issue("warning", f"{len(missing)} class(es) missing from the {split} split: {shown}"))
            extra = [cid for cid, n in counts[split].items() if n > 0 and train_counts.get(cid, 0) == 0]
            if extra:
                issues.append(
                    Issue(
                        "warning",
                        f"{split} has images of classes with no training images (left out): {extra}",
                    )
                )
    # An identical file in two splits leaks: keep it in the earliest split, exclude it from the later ones.
    first_split: dict[str, str] = {}
    leaked: Counter[str] = Counter()
    for split, per_class in report.good.items():
        for class_id, infos in per_class.items():
            kept = []
            for info in infos:
                first = first_split.setdefault(info.sha1, split)
                if first == split:
                    kept.append(info)
                else:
                    leaked[f"{first}/{split}"] += 1
                    report.problems.append(
                        FileProblem(info.path, split, class_id, f"identical to a file in the {first} split")
                    )
            per_class[class_id] = kept
    for pair, n in leaked.items():
        issues.append(Issue("warning", f"{n} identical file(s) in two splits ({pair}): excluded from the second"))


def check_dataset(
    root: str | Path,
    *,
    max_pixels: int = MAX_IMAGE_PIXELS,
    workers: int | None = None,
    cache_dir: Path | None = None,
    progress: bool = False,
) -> CheckReport:
    """Discover and check the dataset at `root` (a local folder)."""
    return check_layout(discover(root), max_pixels=max_pixels, workers=workers, cache_dir=cache_dir, progress=progress)
