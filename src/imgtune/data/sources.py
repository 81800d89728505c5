"""Dataset sources: a local folder as it is, or a remote prefix (s3://...) copied once into the cache.

Remote access goes through fsspec, so any protocol it knows works; S3 endpoints and credentials come from
the usual AWS settings (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, profiles), as with boto3.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

from imgtune.core.errors import DataError
from imgtune.core.io import cache_dir
from imgtune.storage.remote import RemoteError, SyncedFolder, is_remote, list_remote

__all__ = ["MARKER", "is_remote", "resolve_source"]

MARKER = ".imgtune-source.json"


def resolve_source(path: str, *, cache: Path | None = None, progress: bool = True) -> Path:
    """A local folder for `path`: the folder itself, or an up-to-date copy of a remote prefix.

    A remote file is copied only when the local copy is missing, or its size or ETag changed since it was
    copied, so a second call costs one listing; local files no longer in the listing are removed.
    """
    if not is_remote(path):
        return Path(path.removeprefix("file://")).expanduser()
    from imgtune.core.progress import progress_bar

    url = path.rstrip("/")
    local = (cache or cache_dir()) / "sources" / hashlib.sha1(url.encode()).hexdigest()[:16]
    copy = SyncedFolder(url, local, MARKER)
    try:
        listing = list_remote(url)
        if not listing:
            raise DataError(f"no files under {url}", "check the bucket and prefix")
        with progress_bar(enabled=progress) as bar:
            task = None

            def start(total: int) -> None:
                nonlocal task
                task = bar.add_task(f"Copying {url}", total=total, info="") if total else None

            copy.pull(listing=listing, delete_missing=True, on_start=start, on_file=lambda: bar.advance(task))
    except RemoteError as exc:
        raise DataError(str(exc), "check the address, credentials and AWS_ENDPOINT_URL; run again to resume") from None
    return local
