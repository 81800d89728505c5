"""Remote folders (s3://, or any protocol fsspec knows) kept in step with a local copy.

Two things can live remotely: datasets, copied once into the cache and then read locally
(`data.sources.resolve_source`), and workspaces (`--workspace s3://bucket/prefix`, see `jobs`), whose jobs
run in a local mirror and are pushed to the bucket as they go.

A local copy keeps a record (a JSON file in its root) of every file it holds: the object's size and ETag when
last pulled or pushed, and the local file's size and mtime at that moment. A pull copies only objects whose
size or ETag changed since then (a mirror never overwrites a local file that a job here changed since); a push
uploads only files whose size or mtime changed, and deletes the objects of files it once pushed or pulled that
are gone locally, but never overwrites an object that another writer changed since: that file is pulled
instead, and reported. A folder may name top-level folders that are this machine's only (`local_only_dirs`: a
tuning job's Ray state, pickles that would run code when loaded): their files are never pushed, pulled, deleted
remotely or taken from the remote on a conflict, whoever put them there. S3 endpoints and credentials come from
the usual AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles), as with boto3.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from imgtune.core.io import atomic_write_json

PARTIAL_SUFFIXES = (".tmp", ".part")  # files still being written: an atomic write's temp file, a download
LOCAL_ONLY_PREFIX = ".imgtune-"  # files of this machine only: sync records, locks
RECORD_EVERY_FILES, RECORD_EVERY_SECONDS = 500, 5.0  # how often a long pull saves its record


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


def create_exclusively(url: str, data: bytes) -> bool:
    """Write `data` as the object `url` only if there is none yet (S3's conditional write, If-None-Match: *):
    True when this call created it, False when another writer's object is there. Of many writers at once,
    exactly one gets True. A store without conditional writes falls back to look-then-write."""
    fs, path = _filesystem(url)
    try:
        fs.pipe_file(path, data, mode="create")
    except FileExistsError:
        return False
    except OSError as exc:  # S3 answers 409 ConditionalRequestConflict while another conditional write is on
        if "ConditionalRequestConflict" in str(exc):
            return False
        raise RemoteError(f"cannot write {url}: {exc}") from None
    except (TypeError, NotImplementedError):  # an fsspec backend without mode="create"
        if fs.exists(path):
            return False
        fs.pipe_file(path, data)
    except Exception as exc:
        raise RemoteError(f"cannot write {url}: {exc}") from None
    return True


class SyncedFolder:
    """A local folder and the remote prefix it mirrors; `record` is the record file's name in `local`.

    `keep_local_changes`: a pull leaves alone local files changed since the last sync (a workspace mirror,
    where jobs write); without it the remote always wins (a dataset copy). `local_only_dirs`: names of top-level
    folders (or files) that never cross: nothing under them is pushed, and no object under them is pulled (an
    object whose key leads there, as `./ray/x` or `a/../ray/x` does, counts too). Pulls and pushes of one folder
    take turns (a lock file beside the record), so two processes on one machine never lose each other's entries.
    """

    def __init__(
        self,
        url: str,
        local: Path,
        record: str,
        keep_local_changes: bool = False,
        local_only_dirs: Iterable[str] = (),
    ):
        self.url = url.rstrip("/")
        self.local = local
        self.record_file = local / record
        self.keep_local_changes = keep_local_changes
        self.local_only_dirs = frozenset(name.casefold() for name in local_only_dirs)

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        import fcntl

        self.local.mkdir(parents=True, exist_ok=True)
        with open(self.record_file.with_name(self.record_file.name + ".lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def _is_bookkeeping(self, path: Path) -> bool:
        """The record, locks and other local-only files (at any level: a nested folder's too), and files still
        being written."""
        return path.name.startswith((self.record_file.name, LOCAL_ONLY_PREFIX)) or path.name.endswith(PARTIAL_SUFFIXES)

    def _local_only(self, rel: str) -> bool:
        """Is `rel` (relative to the prefix and the folder) in a local-only folder, judged by where its file is here
        (after `.`, `..` and symlinks; without regard to case, for case-insensitive file systems)?"""
        if not self.local_only_dirs:
            return False
        try:
            landing = self._target(rel).relative_to(self.local.resolve()).parts
        except RemoteError:  # outside the folder altogether: refused where it is used
            return False
        return bool(landing) and landing[0].casefold() in self.local_only_dirs

    def _read_record(self) -> dict[str, dict[str, Any]]:
        try:
            files = json.loads(self.record_file.read_text()).get("files", {})
        except (FileNotFoundError, json.JSONDecodeError):
            return {}
        # a record of imgtune 0.1's dataset copies holds the object's stamp itself; an older record's entries of
        # local-only files (pushed before they were local-only) are forgotten: never pushed, pulled or deleted
        return {
            rel: entry if "remote" in entry or "local" in entry else {"remote": entry}
            for rel, entry in files.items()
            if not self._local_only(rel)
        }

    def _write_record(self, files: dict[str, dict[str, Any]]) -> None:
        atomic_write_json(self.record_file, {"url": self.url, "files": files}, durable=False)

    def _wanted(self, target: Path, stamp: dict[str, Any], entry: dict[str, Any] | None) -> bool:
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
        listing: dict[str, dict[str, Any]] | None = None,
        on_start: Callable[[int], None] | None = None,
        on_file: Callable[[], None] | None = None,
    ) -> list[str]:
        """Copy the objects that are new or changed since the last pull or push; returns the paths (relative
        to the prefix) of all the objects listed.

        Args:
            pattern: only objects matching this glob (relative to the prefix), for example `job.json`.
            delete_missing: remove local files that the listing no longer holds (a dataset must not keep
                photos deleted from its source).
            listing: the objects to consider, as `list_remote` gives them, when the caller listed already.
            on_start, on_file: progress hooks, called with the number of files to copy, then once per file.
        """
        if listing is None:
            listing = list_remote(self.url, pattern)
        listing = {rel: info for rel, info in listing.items() if not self._local_only(rel)}
        with self._locked():
            record = self._read_record()
            todo = [
                (rel, info)
                for rel, info in listing.items()
                if self._wanted(self._target(rel), _stamp(info), record.get(rel))
            ]
            if on_start is not None:
                on_start(len(todo))
            saved = time.monotonic()
            try:
                fs, root = _filesystem(self.url)
                for count, (rel, info) in enumerate(todo, 1):
                    record[rel] = self._download(fs, root, rel, info)
                    if count % RECORD_EVERY_FILES == 0 or time.monotonic() - saved > RECORD_EVERY_SECONDS:
                        self._write_record(record)  # now and then: a killed pull goes on about where it stopped
                        saved = time.monotonic()
                    if on_file is not None:
                        on_file()
                if delete_missing:
                    for path in list(self.local.rglob("*")):
                        rel = path.relative_to(self.local).as_posix()
                        keep = self._is_bookkeeping(path) or self._local_only(rel)
                        if path.is_file() and not keep and rel not in listing:
                            path.unlink()
                            record.pop(rel, None)
            finally:
                self._write_record(record)
        return list(listing)

    def _top_level_local_only(self, path: Path) -> bool:
        """A file or folder of the walk (a path below `local`) that is, or is in, a local-only top-level folder."""
        return path.parent == self.local and path.name.casefold() in self.local_only_dirs

    def _target(self, rel: str) -> Path:
        target = (self.local / rel).resolve()
        if not target.is_relative_to(self.local.resolve()):
            raise RemoteError(f"refusing {self.url}/{rel}: its key leads outside the local copy {self.local}")
        return target

    def _download(self, fs: Any, root: str, rel: str, info: dict[str, Any]) -> dict[str, Any]:
        """Copy one object into place (via a .part file); returns its record entry."""
        target = self._target(rel)
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
        return {"remote": _stamp(info), "local": _local_stamp(target)}

    def push(self, skip_dirs: Callable[[Path], bool] = lambda _: False, owner: bool = False) -> list[str]:
        """Upload the files that are new or changed since the last push or pull, and delete the objects of
        files this folder once held that are gone locally. Returns the conflicts: files whose object another
        writer changed since this folder last synced them; those are not overwritten but pulled (the bucket
        wins), and the caller says so. An `owner` (the process running a job) always overwrites: what others
        wrote into a running job is replaced by the job's own files.

        `skip_dirs(dir)` says which subfolders another SyncedFolder pushes itself (a tuning job's trials). Local-only
        folders are never walked, and their objects (whoever put them there) are neither overwritten, deleted nor
        taken.
        """
        local_only = self._top_level_local_only
        with self._locked():
            record = self._read_record()
            present: set[str] = set()
            changed: dict[str, Path] = {}
            for path in _files_below(self.local, lambda folder: local_only(folder) or skip_dirs(folder)):
                if self._is_bookkeeping(path) or local_only(path):
                    continue
                rel = path.relative_to(self.local).as_posix()
                present.add(rel)
                try:
                    if record.get(rel, {}).get("local") != _local_stamp(path):
                        changed[rel] = path
                except FileNotFoundError:  # removed while we walked: the next push sees the folder as it is then
                    continue
            gone = [
                rel
                for rel, entry in record.items()
                if rel not in present
                and entry.get("local")
                and not _under_skipped(self.local / rel, self.local, skip_dirs)
            ]
            if not changed and not gone:
                return []
            fs, root = _filesystem(self.url)
            current = list_remote(self.url)
            # Another writer's change: an object that differs from the one this folder last synced. A file this
            # folder has no entry for is this folder's to send (a nested job's files pulled by its parent job),
            # and so is one whose upload was cut short (pending: the object may be ours, its stamp unrecorded).
            conflicts = [
                rel
                for rel in [*changed, *gone]
                if not owner
                and rel in current
                and not record.get(rel, {}).get("pending")
                and record.get(rel, {}).get("remote") not in (None, _stamp(current[rel]))
            ]
            try:
                for rel in conflicts:
                    record[rel] = self._download(fs, root, rel, current[rel])
                uploads = {rel: path for rel, path in changed.items() if rel not in conflicts}
                for rel in uploads:
                    record[rel] = {**record.get(rel, {}), "pending": True}
                self._write_record(record)
                for rel, path in uploads.items():
                    try:
                        stamp = _local_stamp(path)
                        fs.put_file(str(path), f"{root}/{rel}")
                    except FileNotFoundError:
                        continue
                    record[rel] = {"local": stamp, "remote": _stamp(fs.info(f"{root}/{rel}"))}
                deleted = [rel for rel in gone if rel not in conflicts]
                objects = [f"{root}/{rel}" for rel in deleted if rel in current]
                if objects:  # (fsspec refuses an empty list)
                    fs.rm(objects)
                for rel in deleted:
                    record.pop(rel, None)
            except RemoteError:
                raise
            except Exception as exc:
                raise RemoteError(f"cannot write to {self.url}: {exc}") from None
            finally:
                self._write_record(record)
        return conflicts


def _files_below(folder: Path, skip_dirs: Callable[[Path], bool]) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not skip_dirs(here / d)]
        yield from (here / name for name in filenames)


def _under_skipped(path: Path, root: Path, skip_dirs: Callable[[Path], bool]) -> bool:
    return any(skip_dirs(parent) for parent in path.parents if parent.is_relative_to(root) and parent != root)
