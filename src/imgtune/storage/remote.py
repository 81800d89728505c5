"""Remote folders (s3://, or any protocol fsspec knows) kept in step with a local copy.

Two things can live remotely: datasets, copied once into the cache and then read locally
(`data.sources.resolve_source`), and workspaces (`--workspace s3://bucket/prefix`, see `jobs`), whose jobs
run in a local mirror and are pushed to the bucket as they go.

A local copy keeps a record (a JSON file in its root) of every file it holds: the object's size and ETag when
last pulled or pushed, and the local file's size and mtime at that moment. A pull copies only objects whose
size or ETag changed since then. A push is one way: it uploads the files whose size or mtime changed and
deletes the objects of files gone here; it never downloads.

One writer per object. A folder may have a `guard` file (a job's job.json) whose object says who writes the
folder: the writer whose push put it there last. A push first checks that the guard object is still the one
this copy last synced (else `Conflict`: another writer took the folder over, and nothing is sent) and sends
the guard last, with S3's conditional write (If-Match its ETag, or If-None-Match for a new one), so of two
writers that both start from one state exactly one wins. A pull keeps the local files a writer here changed
since its last push (its work not yet sent), unless the guard object changed since: then another writer
continued the folder, and the bucket wins. Others who add to a folder they do not write (a later command's
evaluation or report) send named files with `push_files`, each conditional on the object they last saw.

A folder may also name top-level folders that are this machine's only (`local_only_dirs`: a tuning job's Ray
state, pickles that would run code when loaded): their files are never pushed, pulled or deleted remotely,
whoever put them there. S3 endpoints and credentials come from the usual AWS settings (AWS_ENDPOINT_URL,
AWS_ACCESS_KEY_ID, profiles), as with boto3.
"""

from __future__ import annotations

import contextlib
import hashlib
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


class Conflict(RemoteError):
    """Another writer changed an object since this copy last synced it: nothing of this write was sent over it.
    `found` is the object's listing entry as it is now (None when it is gone)."""

    def __init__(self, message: str, found: dict[str, Any] | None = None):
        super().__init__(message)
        self.found = found


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


def create_exclusively(url: str, data: bytes) -> dict[str, Any] | None:
    """Write `data` as the object `url` only if there is none yet (S3's conditional write, If-None-Match: *):
    the new object's listing entry when this call created it, None when another writer's object is there. Of
    many writers at once, exactly one gets it. A store without conditional writes falls back to look-then-write."""
    fs, path = _filesystem(url)
    try:
        etag = _put_conditionally(fs, path, data, None, url)
    except Conflict:
        return None
    return {"size": len(data), "ETag": etag}


def _is_s3(fs: Any) -> bool:
    return "s3" in (fs.protocol if isinstance(fs.protocol, tuple | list) else (fs.protocol,))


def _put_conditionally(fs: Any, path: str, data: bytes, etag: str | None, url: str) -> str:
    """Put `data` at `path` if the object there still has ETag `etag` (If-Match), or if there is none when
    `etag` is None (If-None-Match: *); else `Conflict`. Returns the new object's ETag. S3 decides atomically
    (a replacement that lost only because botocore retried it after it landed, so that the object is `data`,
    counts as made: a writer's job.json holds its pid and times, no other writer's bytes are the same); a store
    without conditional writes is checked first, then written (a small window)."""
    if _is_s3(fs):
        bucket, key, _ = fs.split_path(path)
        condition = {"IfMatch": etag} if etag is not None else {"IfNoneMatch": "*"}
        try:
            response = fs.call_s3("put_object", Bucket=bucket, Key=key, Body=data, **condition)
        except Exception as exc:
            if _lost_the_race(exc) or (etag is not None and isinstance(exc, FileNotFoundError)):
                found = _info_or_none(fs, path)
                if etag is not None and found is not None and _stamp(found)["etag"] == _md5_etag(data):
                    return _stamp(found)["etag"]  # our own replacement, retried after it landed
                raise Conflict(f"{url} was changed by another writer", found) from None
            raise RemoteError(f"cannot write {url}: {exc}") from None
        fs.invalidate_cache(path)
        return str(response.get("ETag") or _stamp(fs.info(path))["etag"])
    found = _info_or_none(fs, path)
    if (found is None) != (etag is None) or (found is not None and _stamp(found)["etag"] != etag):
        raise Conflict(f"{url} was changed by another writer", found)
    try:
        fs.pipe_file(path, data)
    except Exception as exc:
        raise RemoteError(f"cannot write {url}: {exc}") from None
    return _stamp(fs.info(path))["etag"]


def _lost_the_race(exc: BaseException) -> bool:
    """Is `exc` (s3fs's OSError, or the botocore error behind it) S3's answer to a conditional write that lost:
    412 PreconditionFailed, or 409 ConditionalRequestConflict (another conditional write to the key is on)?"""
    seen: BaseException | None = exc
    while seen is not None:
        response = getattr(seen, "response", None) or {}
        code = str(response.get("Error", {}).get("Code", ""))
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("PreconditionFailed", "ConditionalRequestConflict") or status in (409, 412):
            return True
        if "pre-conditions you specified did not hold" in str(seen) or "ConditionalRequestConflict" in str(seen):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _info_or_none(fs: Any, path: str) -> dict[str, Any] | None:
    """The object's listing entry as the store says now (not from fsspec's cache), None when there is none."""
    fs.invalidate_cache(path)
    try:
        return fs.info(path)
    except FileNotFoundError:
        return None
    except Exception as exc:
        raise RemoteError(f"cannot read {path}: {exc}") from None


def _md5_etag(data: bytes) -> str:
    """The ETag S3 gives an object put in one part without KMS encryption: its MD5, quoted."""
    return f'"{hashlib.md5(data, usedforsecurity=False).hexdigest()}"'


class SyncedFolder:
    """A local folder and the remote prefix it mirrors; `record` is the record file's name in `local`.

    `keep_local_changes`: a pull leaves alone local files changed since the last sync (a workspace mirror,
    where jobs write), unless the `guard` object changed since; without it the remote always wins (a dataset
    copy). `guard`: the file whose object says who writes the folder (see the module); `writer_lock`: the lock
    file its writer holds while it runs here (then a pull leaves the folder alone: it is the newest copy);
    `nested_dirs`: top-level folders whose subfolders with a guard of their own are other writers' (a tuning job's
    trials/NAME), each synced by itself; `kept_unsent(rel)`: files never dropped though unsent (created once, under
    unique names: amendments), when another writer took over. `local_only_dirs`: names
    of top-level folders (or files) that never cross: nothing under them is pushed, and no object under them is
    pulled (an object whose key leads there, as `./ray/x` or `a/../ray/x` does, counts too). Pulls and pushes of
    one folder take turns (a lock file beside the record), so two processes on one machine never lose each
    other's entries.
    """

    def __init__(
        self,
        url: str,
        local: Path,
        record: str,
        keep_local_changes: bool = False,
        local_only_dirs: Iterable[str] = (),
        guard: str | None = None,
        writer_lock: str | None = None,
        nested_dirs: Iterable[str] = (),
        kept_unsent: Callable[[str], bool] = lambda rel: False,
    ):
        self.url = url.rstrip("/")
        self.local = local
        self.record_file = local / record
        self.keep_local_changes = keep_local_changes
        self.guard = guard
        self.writer_lock = writer_lock
        self.nested_dirs = tuple(nested_dirs)
        self.kept_unsent = kept_unsent
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
        complete: Callable[[str], bool] | None = None,
    ) -> list[str]:
        """Copy the objects that are new or changed since the last pull or push; returns the paths (relative
        to the prefix) of all the objects listed.

        Args:
            pattern: only objects matching this glob (relative to the prefix), for example `job.json`.
            delete_missing: remove local files that the listing no longer holds (a dataset must not keep
                photos deleted from its source).
            listing: the objects to consider, as `list_remote` gives them, when the caller listed already.
            on_start, on_file: progress hooks, called with the number of files to copy, then once per file.
            complete: which paths the `listing` given covers entirely (an object of theirs it lacks is gone); a
                pull that lists everything itself covers all.
        """
        complete = (lambda rel: True) if listing is None and pattern is None else complete
        if listing is None:
            listing = list_remote(self.url, pattern)
        listing = {rel: info for rel, info in listing.items() if not self._local_only(rel)}
        nested = self._nested(listing)
        for folder, files in nested.items():  # (each nested writer's folder keeps its own record)
            covered = None if complete is None else (lambda rel, f=folder: complete(f"{f}/{rel}"))
            self._nested_folder(folder).pull(listing=files, complete=covered)
        mine = {rel: info for rel, info in listing.items() if not any(rel.startswith(f + "/") for f in nested)}
        with self._locked():
            if self.keep_local_changes and self._writer_here():
                return list(listing)  # its writer runs here: this copy is the newest there is
            record = self._read_record()
            fs, root = _filesystem(self.url)
            if self.guard is not None and self.guard in mine:  # as it is now, not as listed before the lock
                found = _info_or_none(fs, f"{root}/{self.guard}")
                mine = {k: v for k, v in mine.items() if k != self.guard}
                if found is not None:
                    mine[self.guard] = found
            if self.keep_local_changes and self._taken_over(record, mine):
                self._drop_local_changes(record, mine)
            if self.keep_local_changes and complete is not None:
                self._forget_deleted_objects(record, mine, complete)
            todo = [
                (rel, info)
                for rel, info in mine.items()
                if self._wanted(self._target(rel), _stamp(info), record.get(rel))
            ]
            if on_start is not None:
                on_start(len(todo))
            saved = time.monotonic()
            try:
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

    def _writer_here(self) -> bool:
        """Does a process of this machine hold the writer's lock (it runs the job)? (A try at the lock: free, it
        is let go at once.)"""
        import fcntl

        if self.writer_lock is None or not (self.local / self.writer_lock).exists():
            return False
        with open(self.local / self.writer_lock, "a") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            except OSError:  # a file system without locks: the status check is all there is
                return False
            fcntl.flock(handle, fcntl.LOCK_UN)
        return False

    def _nested_folder(self, folder: str) -> SyncedFolder:
        """The SyncedFolder of a nested writer's folder (`folder` relative to this one). One that an older
        imgtune synced through this folder gets its entries from this folder's record, so it knows its files."""
        inner = SyncedFolder(
            f"{self.url}/{folder}", self._target(folder), self.record_file.name, self.keep_local_changes,
            guard=self.guard, writer_lock=self.writer_lock, kept_unsent=self.kept_unsent,
        )  # fmt: skip
        if not inner.record_file.exists():
            with self._locked():
                mine = self._read_record()
            inherited = {rel[len(folder) + 1 :]: e for rel, e in mine.items() if rel.startswith(folder + "/")}
            if inherited:
                inner.local.mkdir(parents=True, exist_ok=True)
                with inner._locked():
                    inner._write_record(inherited)
        return inner

    def _forget_deleted_objects(
        self, record: dict[str, dict[str, Any]], listing: dict[str, dict[str, Any]], complete: Callable[[str], bool]
    ) -> None:
        """Files this copy synced and has not changed since, whose objects are gone (another writer removed them,
        as a job's next run removes the amendments it folded in), go here too: where the listing is `complete`."""
        for rel, entry in list(record.items()):
            if rel in listing or not entry.get("remote") or not complete(rel):
                continue
            path = self.local / rel
            if path.is_file() and entry.get("local") == _local_stamp(path):
                path.unlink()
                del record[rel]

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
        for _ in range(3):
            try:
                fs.get_file(f"{root}/{rel}", str(tmp))
            except Exception as exc:
                tmp.unlink(missing_ok=True)
                raise RemoteError(f"cannot copy {self.url}/{rel}: {exc}") from None
            # The guard's stamp must be the one of the bytes copied (it says who writes the folder): an object
            # replaced between its listing and the copy is listed again (S3's ETag of a one-part put is the MD5).
            listed = _stamp(info)["etag"]
            if rel != self.guard or len(listed) != 34 or _md5_etag(tmp.read_bytes()) == listed:
                break
            info = _info_or_none(fs, f"{root}/{rel}") or info
        modified = info.get("LastModified") or info.get("mtime")
        if hasattr(modified, "timestamp"):  # keep the object's time, so newest-first listings stay right
            os.utime(tmp, (modified.timestamp(), modified.timestamp()))
        tmp.replace(target)
        return {"remote": _stamp(info), "local": _local_stamp(target)}

    def _is_ours(self, entry: dict[str, Any] | None, found: dict[str, Any] | None) -> bool:
        """Is the object `found` (a listing entry, None when there is none) the one this copy last synced as
        `entry`, or the one a push of it was sending when it was cut short (`pending`: that content's ETag)?"""
        entry = entry or {}
        if found is None:
            return entry.get("remote") is None
        return _stamp(found)["etag"] in ((entry.get("remote") or {}).get("etag"), entry.get("pending"))

    def _taken_over(self, record: dict[str, dict[str, Any]], listing: dict[str, dict[str, Any]]) -> bool:
        """Has another writer put the guard object since this copy last synced it?"""
        entry = record.get(self.guard) if self.guard else None
        return entry is not None and self.guard in listing and not self._is_ours(entry, listing[self.guard])

    def _drop_local_changes(self, record: dict[str, dict[str, Any]], listing: dict[str, dict[str, Any]]) -> None:
        """Another writer continued the folder: the files changed, added or removed here since the last sync
        (work a writer here never sent, superseded) give way to the bucket's; the pull then takes its copy."""
        for path in _files_below(self.local, self._not_ours_to_walk):
            rel = path.relative_to(self.local).as_posix()
            if self._is_bookkeeping(path) or self._local_only(rel):
                continue
            entry = record.get(rel)
            if entry is None and self.kept_unsent(rel):
                continue  # (never another writer's: sent later)
            if entry is None or entry.get("local") != _local_stamp(path):
                path.unlink()
                record.pop(rel, None)
        for rel in [rel for rel in record if not (self.local / rel).is_file() and not self._nested_rel(rel)]:
            del record[rel]  # a deletion made here is not this copy's to send any more

    def _not_ours_to_walk(self, folder: Path) -> bool:
        """A folder below `local` that is local-only, or another writer's (a nested folder with a guard file)."""
        rel = folder.relative_to(self.local).as_posix()
        return self._top_level_local_only(folder) or (
            self._nested_rel(rel + "/") and self.guard is not None and (folder / self.guard).is_file()
        )

    def _nested_rel(self, rel: str) -> bool:
        """Is `rel` in a nested writer's folder (NESTED_DIR/NAME/...)?"""
        parts = rel.split("/")
        return len(parts) >= 3 and parts[0] in self.nested_dirs

    def _nested(self, listing: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, Any]]]:
        """The listing's files that belong to nested writers' folders (those with a guard object of their own: a
        tuning job's trials), by folder, relative to it; each such folder pulls itself."""
        if self.guard is None or not self.nested_dirs:
            return {}
        folders = {
            rel[: -len(self.guard) - 1]
            for rel in listing
            if rel.endswith("/" + self.guard) and rel.count("/") == 2 and rel.split("/")[0] in self.nested_dirs
        }
        nested: dict[str, dict[str, dict[str, Any]]] = {}
        for rel, info in listing.items():
            folder = "/".join(rel.split("/")[:2])
            if rel.count("/") >= 2 and folder in folders:
                nested.setdefault(folder, {})[rel[len(folder) + 1 :]] = info
        return nested

    def adopt(self, rel: str, info: dict[str, Any]) -> None:
        """Record the guard object `rel` (as listed: `info`), written straight to the bucket from the local file of
        the same bytes (a job's claim), as in step with it, and this copy as the folder's writer."""
        with self._locked():
            record = self._read_record()
            record[rel] = {"remote": _stamp(info), "local": _local_stamp(self.local / rel), "writer": True}
            self._write_record(record)

    def become_writer(self) -> None:
        """Make this copy the folder's writer from the guard object it last synced (a job resumed here): its next
        push replaces that object only if it is still there (of two copies doing this, one wins)."""
        with self._locked():
            record = self._read_record()
            if self.guard in record:
                record[self.guard] = {**record[self.guard], "writer": True}
                self._write_record(record)

    def push(self) -> list[str]:
        """Upload the files that are new or changed since the last push or pull, and delete the objects of
        files this folder once held that are gone locally; returns what was sent (paths relative to the folder).

        With a `guard`, only the folder's writer pushes: the guard object must be the one this copy last
        synced, else `Conflict` and nothing is sent; the guard goes last, conditionally (see the module).
        Nested writers' folders (`nested_dirs`: a tuning job's trials) push themselves. Local-only folders are
        never walked, and their objects (whoever put them there) are never deleted.
        """
        with self._locked():
            record = self._read_record()
            present: set[str] = set()
            changed: dict[str, Path] = {}
            for path in _files_below(self.local, self._not_ours_to_walk):
                if self._is_bookkeeping(path) or self._top_level_local_only(path):
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
                if rel not in present and entry.get("local") and not self._nested_rel(rel)
            ]
            if not changed and not gone:
                return []
            fs, root = _filesystem(self.url)
            if self.guard is not None:
                found = _info_or_none(fs, f"{root}/{self.guard}")
                entry = record.get(self.guard) or {}
                writer = entry.get("writer") or (found is not None and _stamp(found)["etag"] == entry.get("pending"))
                if not (writer and self._is_ours(entry, found)) and not (found is None and not entry):
                    raise Conflict(f"{self.url}/{self.guard} was written by another writer since", found)
            guard_path = changed.pop(self.guard, None) if self.guard is not None else None
            sent: list[str] = []
            try:
                for rel, path in changed.items():
                    try:
                        stamp = _local_stamp(path)
                        fs.put_file(str(path), f"{root}/{rel}")
                    except FileNotFoundError:
                        continue
                    record[rel] = {"local": stamp, "remote": _stamp(_info_or_none(fs, f"{root}/{rel}") or {})}
                    sent.append(rel)
                current = list_remote(self.url) if gone else {}
                objects = [f"{root}/{rel}" for rel in gone if rel in current]
                if objects:  # (fsspec refuses an empty list)
                    fs.rm(objects)
                for rel in gone:
                    record.pop(rel, None)
                if guard_path is not None:
                    self._send_guard(fs, root, guard_path, record)
                    sent.append(self.guard)
            except RemoteError:
                raise
            except Exception as exc:
                raise RemoteError(f"cannot write to {self.url}: {exc}") from None
            finally:
                self._write_record(record)
        return sent

    def _send_guard(self, fs: Any, root: str, path: Path, record: dict[str, dict[str, Any]]) -> None:
        """Put the guard file, conditionally on the object this copy last synced; its content's ETag is recorded
        as pending first, so that a push cut short after the put still knows the object for its own."""
        rel = self.guard
        stamp, data = _local_stamp(path), path.read_bytes()
        entry = record.get(rel, {})
        expected = (entry.get("remote") or {}).get("etag") or None
        found = _info_or_none(fs, f"{root}/{rel}")
        if found is not None and _stamp(found)["etag"] == entry.get("pending"):
            expected = _stamp(found)["etag"]  # our own put, whose record was not written
        record[rel] = {**entry, "pending": _md5_etag(data)}
        self._write_record(record)
        etag = _put_conditionally(fs, f"{root}/{rel}", data, expected, f"{self.url}/{rel}")
        record[rel] = {"local": stamp, "remote": {"size": len(data), "etag": etag}, "writer": True}

    def push_files(self, rels: Iterable[str]) -> None:
        """Send the named files (paths relative to the folder) of a writer that is not the folder's: each
        replaces only the object this copy last synced (or is created only where there is none), else
        `Conflict` (the files before it are sent)."""
        with self._locked():
            record = self._read_record()
            fs, root = _filesystem(self.url)
            try:
                for rel in rels:
                    path = self._target(rel)
                    stamp, data = _local_stamp(path), path.read_bytes()
                    expected = (record.get(rel, {}).get("remote") or {}).get("etag") or None
                    etag = _put_conditionally(fs, f"{root}/{rel}", data, expected, f"{self.url}/{rel}")
                    record[rel] = {"local": stamp, "remote": {"size": len(data), "etag": etag}}
            finally:
                self._write_record(record)


def _files_below(folder: Path, skip_dirs: Callable[[Path], bool]) -> Iterable[Path]:
    for dirpath, dirnames, filenames in os.walk(folder):
        here = Path(dirpath)
        dirnames[:] = [d for d in dirnames if not skip_dirs(here / d)]
        yield from (here / name for name in filenames)
