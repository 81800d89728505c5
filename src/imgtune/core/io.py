"""Files: atomic writes, JSON (standard, NaN-free) and JSON lines, timestamps, the cache folder.

Every file imgtune writes goes through `atomic_output` (or the helpers built on it): the content is written to
a temp file beside the target (a unique name per writer, so two writers never share one) and renamed into
place, so a killed process leaves either the old file or the new one, never half of one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

CACHE_ENV = "IMGTUNE_CACHE"
TEMP_SUFFIX = ".tmp"  # an atomic write's temp file: `.NAME.<random>.tmp` beside NAME


def cache_dir() -> Path:
    """Where features, checks and copies of remote datasets are kept: $IMGTUNE_CACHE or ~/.cache/imgtune."""
    default = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "imgtune"
    return Path(os.environ.get(CACHE_ENV) or default).expanduser().absolute()


def _umask() -> int:
    mask = os.umask(0)  # (the only way to read it; done once, at import, before threads write files)
    os.umask(mask)
    return mask


_UMASK = _umask()


def default_file_mode() -> int:
    """The mode a plain `open(path, "w")` would give (mkstemp's files are owner-only)."""
    return 0o666 & ~_UMASK


@contextlib.contextmanager
def atomic_output(path: Path, durable: bool = False) -> Iterator[Path]:
    """A temp path to write `path`'s new content to (by any writer: torch.save, safetensors, an exporter);
    renamed onto `path` when the block ends without error, removed when it fails. `durable` syncs the file
    to disk before the rename (a checkpoint that must survive a power cut, not a status file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TEMP_SUFFIX)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if durable:
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: Path, data: bytes, durable: bool = True) -> None:
    with atomic_output(path, durable) as tmp:
        tmp.write_bytes(data)


def atomic_write_text(path: Path, text: str, durable: bool = True) -> None:
    """Write via a temp file and rename; `durable` also syncs to disk first (skip it for status files that
    are rewritten often and only need to be whole, not to survive a power cut)."""
    atomic_write_bytes(path, text.encode(), durable)


def json_safe(data: Any) -> Any:
    """`data` with NaN and infinities as None: standard JSON, which jq and browsers read."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [json_safe(v) for v in data]
    return data


def to_json(data: Any, indent: int | None = None) -> str:
    return json.dumps(json_safe(data), indent=indent, default=str, allow_nan=False)


def atomic_write_json(path: Path, data: Any, durable: bool = True) -> None:
    atomic_write_text(path, to_json(data, indent=2) + "\n", durable)


def read_jsonl(path: Path) -> Iterator[dict[str, Any]]:
    """Records of a JSON-lines file (none if it does not exist); a line cut short by a kill is skipped."""
    if not path.exists():
        return
    with path.open() as f:
        for line in f:
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                continue


def append_jsonl(path: Path, record: dict[str, Any], durable: bool = True) -> None:
    """Append one record as a line (a kill leaves at most a cut-short last line, which `read_jsonl` skips)."""
    with path.open("a") as f:
        f.write(to_json(record) + "\n")
        if durable:
            f.flush()
            os.fsync(f.fileno())


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")
