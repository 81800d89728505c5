"""Remote folders (s3://, or any protocol fsspec knows) kept in step with a local copy.

Two things can live remotely: datasets, copied once into the cache and then read locally
(`data.sources.resolve_source`), and workspaces (`--workspace s3://bucket/prefix`, see `jobs`), whose jobs
run in a local mirror and are pushed to the bucket as they go.

A local copy keeps a record (a JSON file in its root) of every file it holds: the object's size and ETag when
last pulled or pushed, and the local file's size and mtime at that moment. A pull copies only objects whose
size or ETag changed since then (so it never overwrites a local file that a running job is writing, unless the
object changed too); a push uploads only files whose size or mtime changed, and deletes the objects of files
it once pushed or pulled that are gone locally. S3 endpoints and credentials come from the usual AWS settings
(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles), as with boto3.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from imgtune.jobs import atomic_write_json

PARTIAL_SUFFIXES = (".tmp", ".part")  # files still being written: an atomic write's temp file, a download


def is_remote(path: str | Path) -> bool:
    return "://" in str(path) and not str(path).startswith("file://")


class RemoteError(Exception):
    """A remote store that cannot be listed, read or written (the message names the URL)."""


def _filesystem(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
    except Exception as exc:  # an unknown protocol, a missing optional package (s3fs, gcsfs, ...)
        raise RemoteError(f"cannot open {url}: {exc}") from None
    fs.invalidate_cache()  # fsspec keeps listings per process: always ask the store itself
    return fs, root.rstrip("/")


def _stamp(info: dict[str, Any]) -> dict[str, Any]:
    return {"size": info.get("size"), "etag": str(info.get("ETag") or info.get("etag") or "")}


def _local_stamp(path: Path) -> list[int]:
    stat = path.stat()
    return [stat.st_size, stat.st_mtime_ns]


def list_remote(url: str, pattern: str | None = None) -> dict[str, dict[str, Any]]:
    """The files under `url` (or matching `pattern` below it, as in glob), by path relative to `url`."""
    fs, root = _filesystem(url)
    try:
        listing = fs.glob(f"{root}/{pattern}", detail=True) if pattern else fs.find(root, detail=True)
    except Exception as exc:  # a missing bucket (FileNotFoundError), or the backend's own (botocore, aiohttp...)
        raise RemoteError(f"cannot list {url}: {exc}") from None
    bucket = root.split("/")[0]
    if pattern and not listing and not fs.exists(bucket):  # a glob finds nothing in a missing bucket, silently
        raise RemoteError(f"cannot list {url}: there is no bucket {bucket!r}")
    return {
        name[len(root) :].lstrip("/"): info
        for name, info in listing.items()
        if info.get("type", "file") == "file" and name.startswith(root + "/")
    }


class SyncedFolder:
    """A local folder and the remote prefix it mirrors; `record` is the record file's name in `local`.

    `keep_local_changes`: a pull leaves alone local files changed since the last sync (a workspace mirror,
    where jobs write); without it the remote always wins (a dataset copy).
    """

    def __init__(self, url: str, local: Path, record: str, keep_local_changes: bool = False):
        self.url = url.rstrip("/")
        self.local = local
        self.record_file = local / record
        self.keep_local_changes = keep_local_changes

    def _read_record(self) -> dict[str, dict[str, Any]]:
        try:
            return json.loads(self.record_file.read_text()).get("files", {})
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def _write_record(self, files: dict[str, dict[str, Any]]) -> None:
        atomic_write_json(self.record_file, {"url": self.url, "files": files}, durable=False)

    def _wanted(self, rel: str, target: Path, stamp: dict[str, Any], entry: dict[str, Any] | None) -> bool:
        if not target.is_file():  # a mirror keeps a deletion made here (the next push deletes the object)
            return not (self.keep_local_changes and entry is not None and entry.get("remote") == stamp)
        if entry is None:  # a local file never pulled or pushed: a mirror's own new file, or an older copy's
            return not self.keep_local_changes
        if entry.get("remote") == stamp:
            return False
        # The object changed. A mirror keeps a file also changed here since (a job running on this machine
        # writes it and pushes it next); a plain copy takes the object.
        return not (self.keep_local_changes and entry.get("local") != _local_stamp(target))

    def pull(
        self,
        pattern: str | None = None,
        delete_missing: bool = False,
        on_start: Callable[[int], None] | None = None,
        on_file: Callable[[], None] | None = None,
    ) -> list[str]:
        """Copy the objects that are new or changed since the last pull or push; returns the paths (relative
        to the prefix) of all the objects listed.

        Args:
            pattern: only objects matching this glob (relative to the prefix), for example `*/job.json`.
            delete_missing: remove local files that the listing no longer holds (a dataset must not keep
                photos deleted from its source).
            on_start, on_file: progress hooks, called with the number of files to copy, then once per file.
        """
        listing = list_remote(self.url, pattern)
        fs, root = _filesystem(self.url)
        record = self._read_record()
        local_root = self.local.resolve()
        todo = []
        for rel, info in listing.items():
            target = (self.local / rel).resolve()
            if not target.is_relative_to(local_root):
                raise RemoteError(f"refusing {self.url}/{rel}: its key leads outside the local copy {self.local}")
            stamp = _stamp(info)
            if self._wanted(rel, target, stamp, record.get(rel)):
                todo.append((rel, target, stamp, info))
        if on_start is not None:
            on_start(len(todo))
        for rel, target, stamp, info in todo:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.part")
            try:
                fs.get_file(f"{root}/{rel}", str(tmp))
            except Exception as exc:
                tmp.unlink(missing_ok=True)
                raise RemoteError(f"cannot copy {self.url}/{rel}: {exc}") from None
            modified = info.get("LastModified") or info.get("mtime")
            if hasattr(modified, "timestamp"):  # keep the object's time, so newest-first listings stay right
                os.utime(tmp, (modified.timestamp(), modified.timestamp()))
            tmp.replace(target)
            record[rel] = {"remote": stamp, "local": _local_stamp(target)}
            self._write_record(record)  # after each file: a killed pull goes on where it stopped
            if on_file is not None:
                on_file()
        if delete_missing:
            for path in self.local.rglob("*"):
                rel = path.relative_to(self.local).as_posix()
                if path.is_file() and path != self.record_file and rel not in listing:
                    path.unlink()
                    record.pop(rel, None)
        self._write_record(record)
        return list(listing)

    def push(self, skip_dirs: Callable[[Path], bool] = lambda _: False) -> int:
        """Upload the files that are new or changed since the last push or pull; returns how many.

        Files this folder once pushed and that are gone locally are deleted remotely. `skip_dirs(dir)` says
        which subfolders another SyncedFolder pushes itself (a tuning job's trials are jobs of their own).
        """
        fs, root = _filesystem(self.url)
        record = self._read_record()
        present: set[str] = set()
        changed = []
        for path in _files_below(self.local, skip_dirs):
            if path.name == self.record_file.name or path.name.endswith(PARTIAL_SUFFIXES):  # records of any level
                continue
            rel = path.relative_to(self.local).as_posix()
            present.add(rel)
            try:
                stamp = _local_stamp(path)
            except FileNotFoundError:  # removed while we walked: the next push sees the folder as it is then
                continue
            if record.get(rel, {}).get("local") != stamp:
                changed.append((rel, path, stamp))
        gone = [
            rel
            for rel, entry in record.items()
            if rel not in present and entry.get("local") and not _under_skipped(self.local / rel, self.local, skip_dirs)
        ]
        try:
            for rel, path, stamp in changed:
                try:
                    fs.put_file(str(path), f"{root}/{rel}")
                except FileNotFoundError:
                    continue
                record[rel] = {"local": stamp}
            if gone:
                fs.rm([f"{root}/{rel}" for rel in gone])
                for rel in gone:
                    record.pop(rel, None)
            if changed:  # one listing gives every new ETag, so a later pull knows these objects are ours
                uploaded = list_remote(self.url)
                for rel, _, _ in changed:
                    if rel in uploaded and rel in record:
                        record[rel]["remote"] = _stamp(uploaded[rel])
        except RemoteError:
            raise
        except Exception as exc:
            raise RemoteError(f"cannot write to {self.url}: {exc}") from None
        finally:
            self._write_record(record)
        return len(changed) + len(gone)


def _files_below(folder: Path, skip_dirs: Callable[[Path], bool]) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not skip_dirs(here / d)]
        yield from (here / name for name in filenames)


def _under_skipped(path: Path, root: Path, skip_dirs: Callable[[Path], bool]) -> bool:
    return any(skip_dirs(parent) for parent in path.parents if parent.is_relative_to(root) and parent != root)
