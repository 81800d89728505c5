"""Tuning on an external Ray cluster started by the test: `ray start --head` on 127.0.0.1, the tuning job a
separate driver process connecting to it. Traffic stays on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from imgtune.jobs import Job

RAY = Path(sys.executable).with_name("ray")


def free_port(low: int = 20000, high: int = 30000) -> int:
    """A free TCP port on 127.0.0.1 outside Ray's worker port range (10002-19999)."""
    for port in range(low, high):
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
    raise RuntimeError("no free port")


def kill_tree(pid: int) -> None:
    """SIGKILL a process and all its descendants (the head's GCS, raylet and workers)."""
    try:
        family = [psutil.Process(pid), *psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for proc in family:
        with contextlib.suppress(psutil.NoSuchProcess):
            proc.kill()
    psutil.wait_procs(family, timeout=30)


@pytest.fixture
def loopback_cluster():
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = subprocess.run([str(RAY), "status", f"--address={address}"], env=env, capture_output=True, timeout=60)
        if status.returncode == 0:
            break
        assert head.poll() is None, "ray start --head exited"
        time.sleep(1)
    else:
        pytest.fail("the Ray head did not come up")
    yield address, env
    kill_tree(head.pid)
    head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_trials_run_on_an_external_single_node_cluster(loopback_cluster, tmp_path, dogs_mini, mobilenet_weights):
    address, env = loopback_cluster
    cmd = [sys.executable, "-m", "imgtune", "tune", "--data", str(dogs_mini), "--backbone", "mobilenet_v2",
           "--weights", str(mobilenet_weights), "--epochs", "2", "--max-trials", "2", "--strategy", "random",
           "--ray-address", address, "--name", "external", "--workspace", str(tmp_path / "ws"), "--json"]  # fmt: skip
    driver_env = {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}  # imgtune sets it
    result = subprocess.run(cmd, env=driver_env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed"
    assert [t["status"] for t in summary["trials"]] == ["completed", "completed"]
    record = Job.open("external", tmp_path / "ws").read()
    assert record["ray"]["address"] == address
    assert [n["address"] for n in record["ray"]["nodes"]] == ["127.0.0.1"]  # the cluster's one node, on loopback
    assert {t["node"] for t in record["trials"]} == {"127.0.0.1"}
    assert record["options"]["ray_address"] == address
