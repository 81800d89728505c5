"""Tuning on external Ray clusters started by the tests, the tuning job a separate driver process:

- one node: `ray start --head` on 127.0.0.1; traffic stays on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0);
- two nodes: a head and a worker in two network namespaces the test creates, joined by a veth pair
  (10.77.0.1 and 10.77.0.2), with token authentication; the driver runs beside the head. No traffic leaves
  the namespaces, and they are removed afterwards. Both namespaces see the same files: the shared path.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from imgtune.storage.jobs import Job
from ray_cluster import (
    HEAD_IP,
    RAY,
    WORKER_IP,
    driver_env,
    kill_tree,
    two_node_cluster_fixture,  # noqa: F401 - the fixture two_node_cluster
    wait_for_nodes,
)
from servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def tune_command(dogs_mini: Path, weights: Path, address: str, name: str, workspace: Path, trials: int) -> list:
    return [sys.executable, "-m", "imgtune", "tune", "--data", str(dogs_mini), "--backbone", "mobilenet_v2",
            "--weights", str(weights), "--epochs", "2", "--max-trials", str(trials), "--strategy", "random",
            "--max-parallel", "2", "--ray-address", address, "--name", name, "--workspace", str(workspace),
            "--json"]  # fmt: skip


@pytest.fixture
def loopback_cluster():
    port = free_port()
    temp_dir = tempfile.mkdtemp(prefix="rayh", dir="/tmp")  # short: Ray's socket paths must stay under 108 bytes
    env = {**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
         "--include-dashboard=false", "--disable-usage-stats", f"--temp-dir={temp_dir}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    address = f"127.0.0.1:{port}"
    wait_for_nodes(address, env, 1, head, [])
    yield address, env
    kill_tree(head.pid)
    head.wait()
    shutil.rmtree(temp_dir, ignore_errors=True)


def test_trials_run_on_an_external_single_node_cluster(loopback_cluster, tmp_path, dogs_mini, mobilenet_weights):
    address, env = loopback_cluster
    cmd = tune_command(dogs_mini, mobilenet_weights, address, "external", tmp_path / "ws", trials=2)
    result = subprocess.run(cmd, env=driver_env(env), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed"
    assert [t["status"] for t in summary["trials"]] == ["completed", "completed"]
    record = Job.open("external", tmp_path / "ws").read()
    assert record["ray"]["address"] == address
    assert [n["address"] for n in record["ray"]["nodes"]] == ["127.0.0.1"]  # the cluster's one node, on loopback
    assert {t["node"] for t in record["trials"]} == {"127.0.0.1"}
    assert record["options"]["ray_address"] == address


# -- two nodes in network namespaces ------------------------------------------------------------------------


def test_trials_land_on_both_nodes_of_a_two_node_cluster(two_node_cluster, tmp_path, dogs_mini, mobilenet_weights):
    cluster = two_node_cluster
    cmd = tune_command(dogs_mini, mobilenet_weights, cluster["address"], "two-nodes", tmp_path / "ws", trials=4)
    result = subprocess.run(
        [*cluster["driver"], *cmd], env=driver_env(cluster["env"]), capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.loads(result.stdout)
    assert [t["status"] for t in summary["trials"]] == ["completed"] * 4
    record = Job.open("two-nodes", tmp_path / "ws").read()
    assert sorted(n["address"] for n in record["ray"]["nodes"]) == [HEAD_IP, WORKER_IP]
    assert {t["node"] for t in record["trials"]} == {HEAD_IP, WORKER_IP}  # one CPU each: two at once, one per node
    for trial in record["trials"]:  # the worker's trials wrote their training jobs into the shared workspace
        trial_job = Job(tmp_path / "ws" / "two-nodes" / trial["job"]).read()
        assert trial_job["status"] == "completed" and trial_job["config"]["train"]["evaluate_test"] is False


def test_a_driver_without_the_clusters_token_is_told_so(two_node_cluster, tmp_path, dogs_mini, mobilenet_weights):
    cluster = two_node_cluster
    env = {k: v for k, v in driver_env(cluster["env"]).items() if not k.startswith("RAY_AUTH")}
    env["HOME"] = str(tmp_path)  # no ~/.ray/auth_token either
    cmd = tune_command(dogs_mini, mobilenet_weights, cluster["address"], "no-token", tmp_path / "ws", trials=1)
    result = subprocess.run([*cluster["driver"], *cmd], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"could not connect to the Ray cluster at {cluster['address']}" in result.stderr
    assert "authentication token" in result.stderr and "RAY_AUTH_TOKEN" in result.stderr
    assert Job.open("no-token", tmp_path / "ws").read()["status"] == "failed"
