"""Downloading and unpacking public datasets: resumable HTTP with size and sha256 checks, safe zip unpacking.

Only the standard library talks to the network (``urllib``), so proxies set in the environment are honoured.
A download goes to ``NAME.part`` first and becomes ``NAME`` only once it verifies, so a file that exists under
its final name is always complete; an interrupted download is resumed with an HTTP ``Range`` request.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
import zlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath, PureWindowsPath

from rich.console import Console
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from imgtune.core.errors import DownloadError
from imgtune.core.version import __version__

USER_AGENT = f"imgtune/{__version__}"

NETWORK_HINT = "check your network or pass --url for a mirror"
RESUME_HINT = "the partial file was kept; run the command again to resume"
RETRY_HINT = "the partial file was removed; run the command again"


@dataclass(frozen=True)
class RemoteDataset:
    """A dataset published as one archive at a fixed URL."""

    name: str
    url: str
    filename: str
    size: int | None = None  # expected bytes, if known
    sha256: str | None = None  # expected digest, if known
    unpacked_dir: str = ""  # folder name inside the archive that holds the data (e.g. "dogImages")


DATASETS: dict[str, RemoteDataset] = {
    "dogimages": RemoteDataset(
        name="dogimages",
        url="https://s3-us-west-1.amazonaws.com/udacity-aind/dog-project/dogImages.zip",
        filename="dogImages.zip",
        unpacked_dir="dogImages",
    ),
}

_CONTENT_RANGE = re.compile(r"^\s*bytes\s+(\d+)-(\d+)/(\d+|\*)\s*$", re.IGNORECASE)
_UNSATISFIED_RANGE = re.compile(r"^\s*bytes\s+\*/(\d+)\s*$", re.IGNORECASE)


def part_path(dest: Path) -> Path:
    """Where the download of `dest` is written until it verifies: `dest` + ``.part``."""
    return dest.with_suffix(dest.suffix + ".part")


def download_file(
    url: str,
    dest: Path,
    *,
    expected_size: int | None = None,
    expected_sha256: str | None = None,
    progress: bool = True,
    chunk_size: int = 1 << 20,
    timeout: float = 30.0,
) -> Path:
    """Download `url` to `dest`, resuming a previous ``.part`` file, and verify its size and sha256.

    The size is checked against `expected_size`, or against the size the server announced when that is None.
    A `dest` that already exists and verifies is returned without any request.

    Raises:
        DownloadError: the server cannot be reached or answers an error, or the file does not verify.
    """
    dest = Path(dest)
    part = part_path(dest)
    expected_sha256 = expected_sha256.strip().lower() if expected_sha256 else None

    if dest.is_file():
        if _file_matches(dest, expected_size, expected_sha256):
            return dest
        dest.unlink()  # a stale or corrupt copy under the final name: fetch it again

    dest.parent.mkdir(parents=True, exist_ok=True)
    offset = part.stat().st_size if part.is_file() else 0
    if expected_size is not None and offset > expected_size:
        part.unlink()  # longer than the file can be: not a prefix of it
        offset = 0

    total = expected_size
    if expected_size is None or offset < expected_size:
        total = _fetch(url, part, offset, expected_size, progress, chunk_size, timeout)

    _verify(part, url, expected_size if expected_size is not None else total, expected_sha256)
    os.replace(part, dest)
    return dest


def _fetch(
    url: str,
    part: Path,
    offset: int,
    expected_size: int | None,
    progress: bool,
    chunk_size: int,
    timeout: float,
) -> int | None:
    """Fetch `url` into `part` from byte `offset` on; return the file's total size when the server said it."""
    headers = {"User-Agent": USER_AGENT}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        response = urllib.request.urlopen(request, timeout=timeout)
    except urllib.error.HTTPError as exc:
        with exc:
            if exc.code == 416 and offset > 0:
                return _after_unsatisfiable_range(url, part, offset, exc, expected_size, progress, chunk_size, timeout)
            raise DownloadError(
                f"download of {url} failed: HTTP {exc.code} {exc.reason}",
                hint=NETWORK_HINT if exc.code >= 500 else "check the URL or pass --url for a mirror",
            ) from exc
    except urllib.error.URLError as exc:
        raise DownloadError(f"cannot reach {url}: {exc.reason}", hint=NETWORK_HINT) from exc
    except (OSError, http.client.HTTPException) as exc:
        raise DownloadError(f"cannot reach {url}: {exc}", hint=NETWORK_HINT) from exc
    except ValueError as exc:
        raise DownloadError(f"invalid download URL {url!r}: {exc}", hint="pass an http(s):// URL") from exc

    with response:
        status = response.status
        length = _int_or_none(response.headers.get("Content-Length"))
        if status == 206:
            start, total = _parse_content_range(response.headers.get("Content-Range"))
            if start != offset:
                part.unlink(missing_ok=True)
                raise DownloadError(
                    f"download of {url} failed: asked to resume at byte {offset}, "
                    f"the server answered from byte {start}",
                    hint=RETRY_HINT,
                )
            if total is None and length is not None:
                total = offset + length
            mode = "ab"
        else:
            offset = 0  # the server ignored the Range header (or none was sent): start over
            total = length
            mode = "wb"

        if expected_size is not None and total is not None and total != expected_size:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"size mismatch for {url}: the server reports {total} bytes, expected {expected_size}",
                hint=RETRY_HINT + " (or pass --url for a mirror)",
            )

        done = offset
        label = part.name.removesuffix(".part")
        with _download_progress(label, total, offset, progress) as advance, part.open(mode) as out:
            while True:
                try:
                    chunk = response.read(chunk_size)
                except (OSError, http.client.HTTPException) as exc:
                    raise DownloadError(
                        f"download of {url} interrupted after {done} bytes: {exc}", hint=RESUME_HINT
                    ) from exc
                if not chunk:
                    break
                out.write(chunk)
                done += len(chunk)
                advance(len(chunk))

    # http.client returns a short body without an error when the connection drops early
    if total is not None and done < total:
        raise DownloadError(f"download of {url} interrupted after {done} of {total} bytes", hint=RESUME_HINT)
    return total


def _after_unsatisfiable_range(
    url: str,
    part: Path,
    offset: int,
    exc: urllib.error.HTTPError,
    expected_size: int | None,
    progress: bool,
    chunk_size: int,
    timeout: float,
) -> int | None:
    """Handle 416 to a resume request: the ``.part`` is complete, or it is stale and the download restarts."""
    match = _UNSATISFIED_RANGE.match(exc.headers.get("Content-Range", "") if exc.headers else "")
    total = int(match.group(1)) if match else None
    if total is None or total == offset:
        return total
    part.unlink()  # longer than the remote file: left over from some other file
    return _fetch(url, part, 0, expected_size, progress, chunk_size, timeout)


def _verify(path: Path, url: str, size: int | None, sha256: str | None) -> None:
    """Check `path`'s size and digest; a file that fails is deleted, since resuming it cannot help."""
    actual = path.stat().st_size
    if size is not None and actual != size:
        path.unlink()
        raise DownloadError(f"size mismatch for {url}: got {actual} bytes, expected {size}", hint=RETRY_HINT)
    if sha256 is not None:
        digest = sha256_of(path)
        if digest != sha256:
            path.unlink()
            raise DownloadError(f"sha256 mismatch for {url}: got {digest}, expected {sha256}", hint=RETRY_HINT)


def _file_matches(path: Path, size: int | None, sha256: str | None) -> bool:
    if size is not None and path.stat().st_size != size:
        return False
    return sha256 is None or sha256_of(path) == sha256


def sha256_of(path: Path, chunk_size: int = 1 << 20) -> str:
    """The hex sha256 digest of a file, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def _parse_content_range(value: str | None) -> tuple[int | None, int | None]:
    """``bytes START-END/TOTAL`` -> (START, TOTAL); TOTAL is None for ``*``; (None, None) when unparsable."""
    match = _CONTENT_RANGE.match(value or "")
    if not match:
        return None, None
    total = match.group(3)
    return int(match.group(1)), None if total == "*" else int(total)


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


@contextmanager
def _download_progress(label: str, total: int | None, completed: int, enabled: bool) -> Iterator[Callable[[int], None]]:
    """Yield an `advance(n_bytes)` callable that drives a rich bar (bytes, speed, ETA) on stderr."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TransferSpeedColumn(),
        TimeRemainingColumn(),
    )
    # stderr, so that stdout stays clean for whatever the command prints
    with Progress(*columns, console=Console(stderr=True), disable=not enabled, transient=False) as bar:
        task = bar.add_task(label, total=total, completed=completed)
        yield lambda n: bar.advance(task, n)


def _member_is_unsafe(name: str) -> bool:
    """True for a member that would land outside the target folder (absolute, drive, or ``..``)."""
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return True
    return ".." in PurePosixPath(name.replace("\\", "/")).parts


def _is_macos_metadata(name: str) -> bool:
    return name.replace("\\", "/").split("/", 1)[0] == "__MACOSX"


def unpack_archive(archive: Path, dest_dir: Path, progress: bool = True) -> Path:
    """Unpack the zip `archive` into `dest_dir` and return `dest_dir`.

    Everything is extracted into a temporary folder inside `dest_dir` first and only then moved into place,
    so an interrupted unpack leaves no half-filled data folder. ``__MACOSX/`` members are skipped.

    Raises:
        DownloadError: the archive is not a valid zip, holds a member that would escape `dest_dir`,
            or a top-level entry it holds already exists in `dest_dir`.
    """
    archive, dest_dir = Path(archive), Path(dest_dir)
    bad_zip_hint = f"delete {archive} and run the command again"
    try:
        zf = zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, EOFError) as exc:
        raise DownloadError(f"{archive} is not a valid zip archive: {exc}", hint=bad_zip_hint) from exc
    except OSError as exc:
        raise DownloadError(f"cannot open archive {archive}: {exc}", hint=bad_zip_hint) from exc

    with zf:
        members = [m for m in zf.infolist() if not _is_macos_metadata(m.filename)]
        unsafe = [m.filename for m in members if _member_is_unsafe(m.filename)]
        if unsafe:
            raise DownloadError(
                f"{archive} holds a member outside its folder: {unsafe[0]!r}",
                hint="refusing to unpack it; get the archive from a trusted source",
            )
        tops = sorted({PurePosixPath(m.filename.replace("\\", "/")).parts[0] for m in members if m.filename})
        clashes = [t for t in tops if _occupied(dest_dir / t)]
        if clashes:
            raise DownloadError(
                f"cannot unpack {archive}: {dest_dir / clashes[0]} already exists",
                hint="remove it or choose another --dest",
            )

        dest_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest_dir))
        try:
            columns = (
                TextColumn("[bold]unpacking"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeRemainingColumn(),
            )
            with Progress(*columns, console=Console(stderr=True), disable=not progress) as bar:
                task = bar.add_task(archive.name, total=len(members))
                for member in members:
                    try:
                        zf.extract(member, staging)
                    except (zipfile.BadZipFile, EOFError, zlib.error) as exc:
                        raise DownloadError(
                            f"{archive} is corrupt at member {member.filename!r}: {exc}", hint=bad_zip_hint
                        ) from exc
                    bar.advance(task)
            for top in tops:
                target = dest_dir / top
                if target.is_dir():
                    target.rmdir()  # empty (checked above); Windows cannot rename a folder onto it
                os.replace(staging / top, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return dest_dir


def _occupied(path: Path) -> bool:
    """True when `path` exists and is anything but an empty folder."""
    if path.is_dir() and not path.is_symlink():
        return any(path.iterdir())
    return path.exists() or path.is_symlink()


def download_dataset(
    name: str,
    dest: Path,
    *,
    url: str | None = None,
    sha256: str | None = None,
    progress: bool = True,
    keep_archive: bool = False,
) -> Path:
    """Download and unpack the dataset `name` into `dest`; return the folder holding its data.

    That folder is ``dest / unpacked_dir`` when the archive has one, else `dest`. When it already exists and
    is not empty it is returned at once, with no download. `url` replaces the dataset's URL (a mirror); the
    known size and sha256 of the original are then not enforced, only `sha256` when given.

    Raises:
        DownloadError: an unknown `name`, or a download or unpack that fails.
    """
    dataset = DATASETS.get(name.strip().lower())
    if dataset is None:
        raise DownloadError(f"unknown dataset {name!r}", hint=f"known datasets: {', '.join(sorted(DATASETS))}")
    dest = Path(dest)
    archive = dest / dataset.filename
    data_dir = dest / dataset.unpacked_dir if dataset.unpacked_dir else dest
    if _has_data(data_dir, ignore={archive.name, part_path(archive).name}):
        return data_dir

    original = url is None
    download_file(
        dataset.url if original else url,
        archive,
        expected_size=dataset.size if original else None,
        expected_sha256=sha256 or (dataset.sha256 if original else None),
        progress=progress,
    )
    unpack_archive(archive, dest, progress=progress)
    if not keep_archive:
        archive.unlink(missing_ok=True)
    return data_dir if data_dir.is_dir() else dest


def _has_data(folder: Path, ignore: set[str]) -> bool:
    if not folder.is_dir():
        return False
    return any(p.name not in ignore and not p.name.startswith(".unpack-") for p in folder.iterdir())
