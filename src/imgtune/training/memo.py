"""A per-process memo of what a training job builds before its loop, for a process that runs one job after
another: a tuning worker that Ray reuses for trial after trial.

A tuning job's trials usually share their data and model config and differ only in the loop's hyperparameters
(learning rate, batch size). Each trial is still a whole training job, with its own directory and job.json; but
in a reused worker the second trial need not scan and check the dataset again, rebuild the backbone and reload
its weights, hash those weights again, or reread the same feature files. The memo is off unless a process
switches it on (`enable`, which tuning trials do): a one-off `imgtune train` keeps no second copy of its model.

What is reused, and why it cannot be stale:

- Prepared data (`prepared_data`), keyed by the data config and the cache directory. A remote dataset is synced
  first, as `prepare_data` does. The memo is served only while a stamp of the dataset folder is unchanged: the
  relative path, size and modification time (ns) of every file that is not hidden. That is the test the
  dataset check already trusts to reuse a file's sha1, so the split fingerprints, and the feature-cache keys
  made from them, stay right when a file is added, removed, renamed or rewritten.
- The model (`model`), keyed by the model config, the number of classes and the seed of the new head (its
  initial weights depend on that seed alone), and by the weights file's size and modification time. The memo
  keeps a pristine copy; each job gets a deep copy of it to train, with the backbone's fingerprint (hashed once).
  A copy draws no random numbers where a build does; nothing after the build reads the global generators'
  state (the Trainer reseeds them every epoch).
- Features read from the cache (`features`), keyed by the feature file's path, size and modification time. The
  tensors are shared and read only: the loaders stack them into new tensors.

Each memo holds a few entries and drops the least recently used.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from imgtune.config import DataConfig, JobConfig
from imgtune.core.io import cache_dir
from imgtune.data.dataset import PreparedData, prepare_data
from imgtune.data.sources import resolve_source
from imgtune.models.factory import ImageClassifier
from imgtune.training.feature_cache import FeatureCache, module_fingerprint


class _LRU:
    """At most `size` values, each valid for one key and one stamp (a changed stamp is a miss)."""

    def __init__(self, size: int):
        self.size = size
        self.items: OrderedDict[Any, tuple[Any, Any]] = OrderedDict()

    def get(self, key: Any, stamp: Any) -> Any:
        item = self.items.get(key)
        if item is None or item[0] != stamp:
            return None
        self.items.move_to_end(key)
        return item[1]

    def put(self, key: Any, stamp: Any, value: Any) -> None:
        self.items[key] = (stamp, value)
        self.items.move_to_end(key)
        while len(self.items) > self.size:
            self.items.popitem(last=False)


_memos: dict[str, _LRU] | None = None  # None: off


def enable(entries: int = 2) -> None:
    """Memoize in this process from now on: `entries` data and model configs (and their feature files)."""
    global _memos
    if _memos is None or _memos["data"].size != entries:
        _memos = {"data": _LRU(entries), "model": _LRU(entries), "features": _LRU(4 * entries)}


def disable() -> None:
    """Forget everything and memoize nothing."""
    global _memos
    _memos = None


def enabled() -> bool:
    return _memos is not None


def file_stamp(path: str | Path) -> tuple[int, int] | None:
    """(size, mtime in ns) of a file, None if it is not there."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def folder_stamp(root: Path) -> str:
    """A digest of every visible file under `root` (relative path, size, mtime), symbolic links followed once."""
    digest = hashlib.sha1()
    seen: set[str] = set()
    for folder, subfolders, files in os.walk(root, followlinks=True):
        real = os.path.realpath(folder)
        if real in seen:  # a link back up the tree
            subfolders.clear()
            continue
        seen.add(real)
        subfolders[:] = sorted(d for d in subfolders if not d.startswith("."))
        for name in sorted(f for f in files if not f.startswith(".")):
            path = os.path.join(folder, name)
            digest.update(f"{os.path.relpath(path, root)}\0{file_stamp(path)}\n".encode())
    return digest.hexdigest()


def prepared_data(cfg: DataConfig, *, progress: bool = True) -> PreparedData:
    """`prepare_data(cfg)`, from the memo while the dataset's files are unchanged. Read only."""
    if _memos is None:
        return prepare_data(cfg, progress=progress)
    cache = cache_dir()
    root = resolve_source(cfg.path, cache=cache, progress=progress)
    key = (cfg.model_dump_json(), str(cache))
    stamp = folder_stamp(root) if root.is_dir() else None  # taken first: a change while preparing is a miss next
    data = _memos["data"].get(key, stamp) if stamp else None
    if data is None:
        data = prepare_data(cfg, progress=progress, cache=cache)
        if stamp:
            _memos["data"].put(key, stamp, data)
    return data


def model(
    config: JobConfig, num_classes: int, build: Callable[[JobConfig, int], ImageClassifier]
) -> tuple[ImageClassifier, str | None]:
    """`build(config, num_classes)`'s model, as a fresh deep copy of a memoized pristine one when the config,
    the classes, the head's seed and the weights file are the same; with its backbone's module_fingerprint
    when the memo knows it (None: compute it)."""
    if _memos is None:
        return build(config, num_classes), None
    m = config.model
    key = (m.model_dump_json(), num_classes, config.train.seed)
    stamp = file_stamp(m.weights) if m.weights else None
    entry = _memos["model"].get(key, stamp)
    if entry is None:
        built = build(config, num_classes)
        entry = {"pristine": copy.deepcopy(built), "fingerprint": None}
        _memos["model"].put(key, stamp, entry)
    else:
        built = copy.deepcopy(entry["pristine"])
    if entry["fingerprint"] is None:
        entry["fingerprint"] = module_fingerprint(entry["pristine"].backbone, built.spec.backbone)
    return built, entry["fingerprint"]


def features(cache: FeatureCache, key: str) -> torch.Tensor | None:
    """`cache.load(key)`, from the memo while the feature file is unchanged. Read only."""
    if _memos is None:
        return cache.load(key)
    path = cache.path(key)
    stamp = file_stamp(path)
    tensor = _memos["features"].get(str(path), stamp) if stamp else None
    if tensor is None:
        tensor = cache.load(key)
        if tensor is not None and stamp:
            _memos["features"].put(str(path), stamp, tensor)
    return tensor
