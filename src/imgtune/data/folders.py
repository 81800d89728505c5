"""Discovering a dataset's splits and classes from its folders.

Two layouts are understood:

* ``ROOT/{train,valid|val,test}/CLASS/*``: the original dogImages layout (folders like ``001.Affenpinscher``);
* ``ROOT/CLASS/*``: one folder per class, split later by seeded ratios.

A class keeps its folder name as its id (``001.Affenpinscher``) and gets a readable name (``Affenpinscher``),
or the name given by a ``classes.tsv`` (``id<TAB>name`` per line) at the root, as Imagewoof ships.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from imgtune.core.errors import DataError

SPLITS = ("train", "valid", "test")
SPLIT_ALIASES = {"train": ("train", "training"), "valid": ("valid", "val", "validation"), "test": ("test",)}
ALL = "all"  # the one pseudo-split of a ROOT/CLASS/* layout before it is split

_NUMBER_PREFIX = re.compile(r"^\d+[._\- ]+")


@dataclass(frozen=True)
class ClassInfo:
    """A class: `id` is its folder name (the stable label), `name` what people read."""

    id: str
    name: str


@dataclass
class FolderLayout:
    """Every candidate file of a dataset, by split and class, before any file is opened."""

    root: Path
    kind: Literal["splits", "classes"]
    classes: list[ClassInfo]
    files: dict[str, dict[str, list[Path]]]  # split -> class id -> files, sorted
    split_dirs: dict[str, Path] = field(default_factory=dict)
    stray_files: list[Path] = field(default_factory=list)  # files outside any class folder

    @property
    def splits(self) -> list[str]:
        return list(self.files)

    @property
    def missing_splits(self) -> list[str]:
        return [s for s in SPLITS if s not in self.files] if self.kind == "splits" else []

    def class_by_id(self) -> dict[str, ClassInfo]:
        return {c.id: c for c in self.classes}


def readable_name(class_id: str) -> str:
    """`001.Affenpinscher` -> `Affenpinscher`; `golden_retriever` -> `golden retriever`."""
    name = _NUMBER_PREFIX.sub("", class_id) or class_id
    return name.replace("_", " ")


def _read_class_names(root: Path) -> dict[str, str]:
    for candidate in ("classes.tsv", "classes.txt"):
        path = root / candidate
        if path.is_file():
            names = {}
            for line in path.read_text(errors="replace").splitlines():
                parts = re.split(r"\t|\s{2,}|,", line.strip(), maxsplit=1)
                if len(parts) == 2 and parts[0] and parts[1]:
                    names[parts[0].strip()] = parts[1].strip()
            return names
    return {}


def _visible(name: str) -> bool:
    """Hidden files and macOS archive metadata are not data; `_DSC0001.JPG` is."""
    return not name.startswith(".") and name != "__MACOSX"


def _subdirs(path: Path) -> list[Path]:
    return sorted(p for p in path.iterdir() if p.is_dir() and _visible(p.name))


def files_below(path: Path) -> list[Path]:
    """Every visible file under `path` (no dot files, no macOS metadata), sorted."""
    return sorted(p for p in path.rglob("*") if p.is_file() and all(map(_visible, p.relative_to(path).parts)))


def _find_split_dirs(root: Path) -> dict[str, Path]:
    by_name = {p.name.lower(): p for p in _subdirs(root)}
    found = {}
    for split, aliases in SPLIT_ALIASES.items():
        for alias in aliases:
            if alias in by_name:
                found[split] = by_name[alias]
                break
    return found


def _is_split_layout(root: Path, split_dirs: dict[str, Path]) -> bool:
    """Split folders that hold class folders, and nothing else at the top (a class may be named `train`)."""
    if not split_dirs or not all(_subdirs(d) for d in split_dirs.values()):
        return False
    others = [d for d in _subdirs(root) if d not in split_dirs.values()]
    return not others


def discover(root: str | Path) -> FolderLayout:
    """Find the splits, classes and candidate files under `root`.

    Raises:
        DataError: the folder does not exist or holds no class folders.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"dataset folder not found: {root}", "check the path given to --data")
    if not root.is_dir():
        raise DataError(f"dataset path is not a folder: {root}", "pass the folder that holds the class folders")
    names = _read_class_names(root)
    split_dirs = _find_split_dirs(root)
    files: dict[str, dict[str, list[Path]]] = {}
    stray: list[Path] = []
    if _is_split_layout(root, split_dirs):
        kind = "splits"
        for split, split_dir in split_dirs.items():
            files[split] = {d.name: files_below(d) for d in _subdirs(split_dir)}
            stray += [p for p in split_dir.iterdir() if p.is_file() and _visible(p.name)]
    else:
        kind = "classes"
        files[ALL] = {d.name: files_below(d) for d in _subdirs(root)}
    class_ids = sorted({cid for per_class in files.values() for cid in per_class})
    if not class_ids:
        raise DataError(
            f"no class folders in {root}",
            "expected ROOT/CLASS/*.jpg or ROOT/{train,valid,test}/CLASS/*.jpg",
        )
    classes = [ClassInfo(cid, names.get(cid) or readable_name(cid)) for cid in class_ids]
    return FolderLayout(root=root, kind=kind, classes=classes, files=files, split_dirs=split_dirs, stray_files=stray)
