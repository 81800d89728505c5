"""Test helpers for servers the tests start on 127.0.0.1 (moto's S3, imgtune endpoints, Ray heads).

Ports are picked at or above 20000: 10002-19999 is Ray's default worker port range.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

PROXY_VARS = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


def free_port() -> int:
    """A free port on 127.0.0.1 at or above 20000."""
    for _ in range(50):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        if port >= 20000:
            return port
    raise RuntimeError("no free port >= 20000 on 127.0.0.1")


def http_status(url: str, timeout: float = 1.0) -> int | None:
    """The HTTP status `url` answers with, or None when nothing answers (never through a proxy)."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(url, timeout=timeout) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None


def without_proxies(env: dict[str, str] | None = None) -> dict[str, str]:
    return {k: v for k, v in (env or os.environ).items() if k not in PROXY_VARS}


@contextlib.contextmanager
def running_server(
    command_for_port, ready_path: str, log_path: Path, env: dict[str, str] | None = None, ready_status=None
) -> Iterator[str]:
    """Start `command_for_port(port)` until `ready_path` answers (any status, or `ready_status`); yield its URL.

    Retries on another port when the one picked was taken before the server bound it; stops it afterwards.
    """
    for _attempt in range(3):
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        with log_path.open("ab") as log:
            proc = subprocess.Popen(command_for_port(port), stdout=log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 60
        status = None
        while proc.poll() is None and time.monotonic() < deadline:
            status = http_status(url + ready_path)
            if status is not None and (ready_status is None or status == ready_status):
                break
            time.sleep(0.1)
        if proc.poll() is None and status is not None and (ready_status is None or status == ready_status):
            break
        proc.kill()
        proc.wait()
    else:
        pytest.fail(f"server did not start; its log:\n{log_path.read_text()[-3000:]}", pytrace=False)
    try:
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
