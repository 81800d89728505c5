"""Downloads against a real HTTP server on 127.0.0.1 that serves an archive from memory."""

from __future__ import annotations

import hashlib
import http.server
import io
import random
import socket
import threading
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from PIL import Image

from imgtune.core.errors import DownloadError
from imgtune.core.version import __version__
from imgtune.data.download import (
    DATASETS,
    download_dataset,
    download_file,
    part_path,
    unpack_archive,
)

IMAGES = [
    "dogImages/train/001.Affenpinscher/a.jpg",
    "dogImages/train/001.Affenpinscher/b.jpg",
    "dogImages/train/002.Afghan_hound/c.jpg",
    "dogImages/valid/001.Affenpinscher/d.jpg",
    "dogImages/test/002.Afghan_hound/e.jpg",
]


def tiny_jpeg(seed: int) -> bytes:
    rng = random.Random(seed)
    img = Image.frombytes("RGB", (32, 32), bytes(rng.randrange(256) for _ in range(32 * 32 * 3)))
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def make_zip(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    return {name: tiny_jpeg(i) for i, name in enumerate(IMAGES)}


@pytest.fixture(scope="module")
def archive(images: dict[str, bytes]) -> bytes:
    return make_zip({**images, "__MACOSX/dogImages/._a.jpg": b"resource fork"})


@dataclass
class Served:
    """What the test server answers, and what it was asked."""

    body: bytes = b""
    honour_range: bool = True
    status: int = 200  # anything else is sent as an error with an empty body
    cut_after: int | None = None  # stop sending after this many body bytes, as a dropped connection would
    requests: list[dict[str, str | int | None]] = field(default_factory=list)


class Handler(http.server.BaseHTTPRequestHandler):
    served: Served  # set on a subclass per server

    def do_GET(self) -> None:
        served, body = self.served, self.served.body
        rng = self.headers.get("Range")
        record = {"path": self.path, "range": rng, "user_agent": self.headers.get("User-Agent")}
        served.requests.append(record)
        if served.status != 200:
            record["status"] = served.status
            self.send_response(served.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        start = 0
        if rng and served.honour_range:
            assert rng.startswith("bytes=") and rng.endswith("-"), rng
            start = int(rng[len("bytes=") : -1])
            if start >= len(body):
                record["status"] = 416
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(body)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            record["status"] = 206
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            record["status"] = 200
            self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start : served.cut_after])
        served.cut_after = None  # only the first response is cut

    def log_message(self, format: str, *args: object) -> None:  # keep pytest output quiet
        pass


@pytest.fixture(autouse=True)
def no_proxies(monkeypatch: pytest.MonkeyPatch) -> None:
    # urllib would route 127.0.0.1 through a proxy set in the environment
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("no_proxy", "*")


@pytest.fixture
def server(archive: bytes) -> Iterator[tuple[str, Served]]:
    served = Served(body=archive)
    handler = type("BoundHandler", (Handler,), {"served": served})
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}/dog-project/dogImages.zip", served
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_full_download_and_unpack(server, archive: bytes, images: dict[str, bytes], tmp_path: Path) -> None:
    url, served = server
    dest = tmp_path / "dl" / "dogImages.zip"
    got = download_file(
        url, dest, expected_size=len(archive), expected_sha256=sha(archive), progress=False, chunk_size=1024
    )
    assert got == dest
    assert dest.read_bytes() == archive
    assert not part_path(dest).exists()
    assert served.requests == [
        {
            "path": "/dog-project/dogImages.zip",
            "range": None,
            "user_agent": f"imgtune/{__version__}",
            "status": 200,
        }
    ]

    out = unpack_archive(dest, tmp_path / "data", progress=False)
    assert out == tmp_path / "data"
    for name, data in images.items():
        assert (out / name).read_bytes() == data
    assert not (out / "__MACOSX").exists()
    assert sorted(p.name for p in out.iterdir()) == ["dogImages"]  # no staging folder left behind


def test_existing_file_that_verifies_is_not_downloaded_again(server, archive: bytes, tmp_path: Path) -> None:
    url, served = server
    dest = tmp_path / "dogImages.zip"
    dest.write_bytes(archive)
    assert download_file(url, dest, expected_sha256=sha(archive), progress=False) == dest
    assert served.requests == []


def test_resume_sends_range_and_appends(server, archive: bytes, tmp_path: Path) -> None:
    url, served = server
    dest = tmp_path / "dogImages.zip"
    half = len(archive) // 2
    part_path(dest).write_bytes(archive[:half])
    download_file(url, dest, expected_size=len(archive), expected_sha256=sha(archive), progress=False)
    assert [(r["range"], r["status"]) for r in served.requests] == [(f"bytes={half}-", 206)]
    assert dest.read_bytes() == archive
    assert not part_path(dest).exists()


def test_server_without_range_support_restarts_from_zero(server, archive: bytes, tmp_path: Path) -> None:
    url, served = server
    served.honour_range = False
    dest = tmp_path / "dogImages.zip"
    part_path(dest).write_bytes(archive[:100])
    download_file(url, dest, expected_sha256=sha(archive), progress=False)
    assert [(r["range"], r["status"]) for r in served.requests] == [("bytes=100-", 200)]
    assert dest.read_bytes() == archive


def test_complete_part_is_verified_after_416(server, archive: bytes, tmp_path: Path) -> None:
    url, served = server
    dest = tmp_path / "dogImages.zip"
    part_path(dest).write_bytes(archive)
    download_file(url, dest, expected_sha256=sha(archive), progress=False)
    assert [r["status"] for r in served.requests] == [416]
    assert dest.read_bytes() == archive


def test_complete_part_of_known_size_needs_no_request(server, archive: bytes, tmp_path: Path) -> None:
    url, served = server
    dest = tmp_path / "dogImages.zip"
    part_path(dest).write_bytes(archive)
    download_file(url, dest, expected_size=len(archive), progress=False)
    assert served.requests == []
    assert dest.read_bytes() == archive


def test_dropped_connection_keeps_part_and_next_call_resumes(server, archive: bytes, tmp_path: Path) -> None:
    url, served = server
    served.cut_after = 1000
    dest = tmp_path / "dogImages.zip"
    with pytest.raises(DownloadError, match="interrupted") as info:
        download_file(url, dest, expected_sha256=sha(archive), progress=False)
    assert "resume" in (info.value.hint or "")
    assert part_path(dest).read_bytes() == archive[:1000]

    download_file(url, dest, expected_sha256=sha(archive), progress=False)
    assert [(r["range"], r["status"]) for r in served.requests] == [(None, 200), ("bytes=1000-", 206)]
    assert dest.read_bytes() == archive


def test_sha256_mismatch_raises_and_removes_part(server, tmp_path: Path) -> None:
    url, _ = server
    dest = tmp_path / "dogImages.zip"
    with pytest.raises(DownloadError, match="sha256 mismatch") as info:
        download_file(url, dest, expected_sha256="0" * 64, progress=False)
    assert url in info.value.message and info.value.hint
    assert not part_path(dest).exists()
    assert not dest.exists()


def test_size_mismatch_raises(server, archive: bytes, tmp_path: Path) -> None:
    url, _ = server
    dest = tmp_path / "dogImages.zip"
    with pytest.raises(DownloadError, match="size mismatch") as info:
        download_file(url, dest, expected_size=len(archive) + 1, progress=False)
    assert info.value.hint
    assert not part_path(dest).exists()
    assert not dest.exists()


def test_http_error_status_raises(server, tmp_path: Path) -> None:
    url, served = server
    served.status = 404
    with pytest.raises(DownloadError, match="HTTP 404") as info:
        download_file(url, tmp_path / "dogImages.zip", progress=False)
    assert "--url" in (info.value.hint or "")


def test_unreachable_url_raises(tmp_path: Path) -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    with pytest.raises(DownloadError, match="cannot reach") as info:
        download_file(f"http://127.0.0.1:{port}/x.zip", tmp_path / "x.zip", progress=False, timeout=2)
    assert info.value.hint == "check your network or pass --url for a mirror"


def test_progress_bar_runs(server, archive: bytes, tmp_path: Path) -> None:
    url, _ = server
    dest = download_file(url, tmp_path / "dogImages.zip", progress=True, chunk_size=512)
    assert dest.read_bytes() == archive
    assert unpack_archive(dest, tmp_path / "data", progress=True) == tmp_path / "data"


def test_zip_slip_member_is_refused(tmp_path: Path) -> None:
    evil = tmp_path / "evil.zip"
    evil.write_bytes(make_zip({"dogImages/ok.txt": b"ok", "../evil.txt": b"pwned"}))
    dest = tmp_path / "out"
    with pytest.raises(DownloadError, match="outside its folder"):
        unpack_archive(evil, dest, progress=False)
    assert not (tmp_path / "evil.txt").exists()
    assert not (dest / "dogImages").exists()


@pytest.mark.parametrize("name", ["/etc/evil.txt", "a/../../evil.txt", "C:/evil.txt"])
def test_other_escaping_members_are_refused(tmp_path: Path, name: str) -> None:
    evil = tmp_path / "evil.zip"
    evil.write_bytes(make_zip({name: b"pwned"}))
    with pytest.raises(DownloadError):
        unpack_archive(evil, tmp_path / "out", progress=False)


def test_bad_zip_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(DownloadError, match="not a valid zip") as info:
        unpack_archive(bad, tmp_path / "out", progress=False)
    assert info.value.hint


def test_download_dataset(server, images: dict[str, bytes], tmp_path: Path) -> None:
    url, served = server
    dest = tmp_path / "datasets"
    data = download_dataset("dogimages", dest, url=url, progress=False)
    assert data == dest / "dogImages"
    for name, content in images.items():
        assert (dest / name).read_bytes() == content
    assert not (dest / "dogImages.zip").exists()
    assert not part_path(dest / "dogImages.zip").exists()

    # already there: no second download
    assert download_dataset("dogimages", dest, url=url, progress=False) == data
    assert len(served.requests) == 1


def test_download_dataset_keeps_archive_and_checks_sha(server, archive: bytes, tmp_path: Path) -> None:
    url, _ = server
    data = download_dataset("dogimages", tmp_path, url=url, sha256=sha(archive), keep_archive=True, progress=False)
    assert data == tmp_path / "dogImages"
    assert (tmp_path / "dogImages.zip").read_bytes() == archive
    with pytest.raises(DownloadError, match="sha256 mismatch"):
        download_dataset("dogimages", tmp_path / "other", url=url, sha256="f" * 64, progress=False)
    assert not (tmp_path / "other" / "dogImages").exists()


def test_unknown_dataset_lists_known_names(tmp_path: Path) -> None:
    with pytest.raises(DownloadError, match="unknown dataset") as info:
        download_dataset("catimages", tmp_path, progress=False)
    assert "dogimages" in (info.value.hint or "")


def test_dogimages_points_at_the_original_archive() -> None:
    ds = DATASETS["dogimages"]
    assert ds.url == "https://s3-us-west-1.amazonaws.com/udacity-aind/dog-project/dogImages.zip"
    assert (ds.filename, ds.unpacked_dir) == ("dogImages.zip", "dogImages")


def test_cli_download_checks_the_sha256(server, archive: bytes, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from imgtune.cli import app

    url, _ = server
    runner = CliRunner()
    result = runner.invoke(
        app, ["data", "download", "dogimages", "--dest", str(tmp_path), "--url", url, "--sha256", sha(archive)]
    )
    assert result.exit_code == 0, result.output
    assert "dataset ready" in result.output and (tmp_path / "dogImages").is_dir()
    wrong = runner.invoke(
        app, ["data", "download", "dogimages", "--dest", str(tmp_path / "again"), "--url", url, "--sha256", "0" * 64]
    )
    assert wrong.exit_code == 2 and "error:" in wrong.output and "Traceback" not in wrong.output
