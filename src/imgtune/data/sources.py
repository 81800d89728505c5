"""Dataset sources: a local folder as it is, or a remote prefix (s3://...) copied once into the cache.

Remote access goes through fsspec, so any protocol it knows works; S3 endpoints and credentials come from
the usual AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles), as with boto3.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from imgtune.errors import DataError
from imgtune.jobs import atomic_write_json, cache_dir

MARKER = ".imgtune-source.json"


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve_source(path: str, *, cache: Path | None = None, progress: bool = True) -> Path:
    """A local folder for `path`: the folder itself, or an up-to-date copy of a remote prefix.

    A remote file is copied only when the local copy is missing, or its size or ETag changed since it was
    copied, so a second call costs one listing; local files no longer in the listing are removed.
    """
    if not is_remote(path):
        return Path(path.removeprefix("file://")).expanduser()
    import fsspec

    from imgtune.progress import progress_bar

    url = path.rstrip("/")
    local = (cache or cache_dir()) / "sources" / hashlib.sha1(url.encode()).hexdigest()[:16]
    try:
        fs, root = fsspec.core.url_to_fs(url)
        fs.invalidate_cache()  # fsspec keeps listings per process: always ask the store itself
        listing = fs.find(root, detail=True)
    except Exception as exc:  # fsspec backends raise their own errors (botocore, aiohttp, ...)
        raise DataError(f"cannot list {url}: {exc}", "check the address, credentials and AWS_ENDPOINT_URL") from None
    files = {name: info for name, info in listing.items() if info.get("type", "file") == "file"}
    if not files:
        raise DataError(f"no files under {url}", "check the bucket and prefix")
    marker = local / MARKER
    copied = json.loads(marker.read_text()).get("files", {}) if marker.exists() else {}
    wanted: dict[str, dict] = {}
    todo = []
    for name, info in files.items():
        rel = name[len(root) :].lstrip("/")
        target = (local / rel).resolve()
        if not target.is_relative_to(local.resolve()):
            raise DataError(f"refusing {name}: its key leads outside the local copy", "rename the object")
        stamp = {"size": info.get("size"), "etag": str(info.get("ETag") or info.get("etag") or "")}
        wanted[rel] = stamp
        if not target.is_file() or target.stat().st_size != stamp["size"] or copied.get(rel) != stamp:
            todo.append((name, target))
    if todo:
        with progress_bar(enabled=progress) as bar:
            task = bar.add_task(f"Copying {url}", total=len(todo), info="")
            for name, target in todo:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.part")
                try:
                    fs.get_file(name, str(tmp))
                except Exception as exc:
                    raise DataError(f"cannot copy {name}: {exc}", "run the command again to resume") from None
                tmp.replace(target)
                bar.advance(task)
    for path in local.rglob("*"):
        if path.is_file() and path != marker and path.relative_to(local).as_posix() not in wanted:
            path.unlink()  # deleted from the source: must not be trained on
    atomic_write_json(marker, {"url": url, "files": wanted})
    return local
