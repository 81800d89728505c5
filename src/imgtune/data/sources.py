"""Dataset sources: a local folder as it is, or a remote prefix (s3://...) copied once into the cache.

Remote access goes through fsspec, so any protocol it knows works; S3 endpoints and credentials come from
the usual AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles), as with boto3.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from imgtune.errors import DataError
from imgtune.jobs import atomic_write_json, cache_dir


def is_remote(path: str) -> bool:
    return "://" in path and not path.startswith("file://")


def resolve_source(path: str, *, cache: Path | None = None, progress: bool = True) -> Path:
    """A local folder for `path`: the folder itself, or an up-to-date copy of a remote prefix.

    A remote file is copied only when the local copy is missing or differs in size, so a second call
    costs one listing.
    """
    if not is_remote(path):
        return Path(path.removeprefix("file://")).expanduser()
    import fsspec

    from imgtune.progress import progress_bar

    url = path.rstrip("/")
    local = (cache or cache_dir()) / "sources" / hashlib.sha1(url.encode()).hexdigest()[:16]
    try:
        fs, root = fsspec.core.url_to_fs(url)
        listing = fs.find(root, detail=True)
    except Exception as exc:  # fsspec backends raise their own errors (botocore, aiohttp, ...)
        raise DataError(f"cannot list {url}: {exc}", "check the address, credentials and AWS_ENDPOINT_URL") from None
    files = {name: info for name, info in listing.items() if info.get("type", "file") == "file"}
    if not files:
        raise DataError(f"no files under {url}", "check the bucket and prefix")
    todo = []
    for name, info in files.items():
        rel = name[len(root) :].lstrip("/")
        target = local / rel
        if not target.is_file() or target.stat().st_size != info.get("size"):
            todo.append((name, target, info.get("size") or 0))
    if todo:
        with progress_bar(enabled=progress) as bar:
            task = bar.add_task(f"Copying {url}", total=len(todo), info="")
            for name, target, _size in todo:
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.part")
                try:
                    fs.get_file(name, str(tmp))
                except Exception as exc:
                    raise DataError(f"cannot copy {name}: {exc}", "run the command again to resume") from None
                tmp.replace(target)
                bar.advance(task)
    atomic_write_json(local / ".imgtune-source.json", {"url": url, "files": len(files)})
    return local
