"""Tuning on external Ray clusters started by the tests, the tuning job a separate driver process:

- one node: `ray start --head` on 127.0.0.1; traffic stays on loopback (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0);
- two nodes: a head and a worker in two network namespaces the test creates, joined by a veth pair
  (10.77.0.1 and 10.77.0.2), with token authentication; the driver runs beside the head. No traffic leaves
  the namespaces, and they are removed afterwards. Both namespaces see the same files: the shared path.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from imgtune.storage.jobs import Job
from servers import free_port

pytestmark = [pytest.mark.slow, pytest.mark.ray]


RAY = Path(sys.executable).with_name("ray")


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


def wait_for_nodes(address: str, env: dict, count: int, node: subprocess.Popen, prefix: list[str]) -> None:
    """Until `ray status` at address lists `count` active nodes (the node process must stay up meanwhile)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = subprocess.run(
            [*prefix, str(RAY), "status", f"--address={address}"], env=env, capture_output=True, text=True, timeout=60
        )
        active = status.stdout.split("Pending:")[0]
        if status.returncode == 0 and len(re.findall(r"^\s*1 node_", active, re.M)) >= count:
            return
        assert node.poll() is None, "a Ray node exited while starting"
        time.sleep(1)
    pytest.fail(f"the Ray cluster at {address} did not reach {count} node(s)")


def driver_env(env: dict) -> dict:
    """The driver's environment: imgtune itself decides RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER from the address."""
    return {k: v for k, v in env.items() if k != "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"}


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
        [str(RAY), "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}", "--num-cpus=2",
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

HEAD_IP, WORKER_IP = "10.77.0.1", "10.77.0.2"
HEAD_PORT = 6379  # inside the head's own namespace: nothing else listens there


def netns(name: str) -> list[str]:
    return ["ip", "netns", "exec", name]


@pytest.fixture(scope="module")
def two_node_cluster(tmp_path_factory):
    """A head (with the driver beside it) and a worker in two namespaces joined by a veth pair; token auth on."""
    if os.geteuid() != 0 or not shutil.which("ip"):
        pytest.fail("the two-node cluster test creates network namespaces: it needs root and iproute2 (`ip`)")
    tag = str(os.getpid() % 100000)
    head_ns, worker_ns = f"imgtune-head-{tag}", f"imgtune-worker-{tag}"
    head_if, worker_if = f"itune-h{tag}", f"itune-w{tag}"  # interface names: 15 characters at most
    token = tmp_path_factory.mktemp("auth") / "ray-token"
    token.write_text(secrets.token_hex(32))
    env = {**driver_env(os.environ), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token)}
    node_env = {**env, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"}  # multi-node Ray on the namespaces' addresses
    temp_dirs = [tempfile.mkdtemp(prefix=p, dir="/tmp") for p in ("rayh", "rayw")]  # short socket paths
    nodes: list[subprocess.Popen] = []
    setup = [
        ["ip", "netns", "add", head_ns],
        ["ip", "netns", "add", worker_ns],
        ["ip", "link", "add", head_if, "type", "veth", "peer", "name", worker_if],
        ["ip", "link", "set", head_if, "netns", head_ns],
        ["ip", "link", "set", worker_if, "netns", worker_ns],
        ["ip", "-n", head_ns, "addr", "add", f"{HEAD_IP}/24", "dev", head_if],
        ["ip", "-n", worker_ns, "addr", "add", f"{WORKER_IP}/24", "dev", worker_if],
        *(["ip", "-n", ns, "link", "set", dev, "up"] for ns, dev in
          ((head_ns, head_if), (worker_ns, worker_if), (head_ns, "lo"), (worker_ns, "lo"))),
    ]  # fmt: skip
    common = ["--block", "--num-cpus=1", "--disable-usage-stats"]
    address = f"{HEAD_IP}:{HEAD_PORT}"
    try:
        for command in setup:
            subprocess.run(command, check=True, capture_output=True)
        nodes.append(
            subprocess.Popen(
                [*netns(head_ns), str(RAY), "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={HEAD_PORT}",
                 "--include-dashboard=false", f"--temp-dir={temp_dirs[0]}", *common],
                env=node_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        )  # fmt: skip
        wait_for_nodes(address, env, 1, nodes[0], netns(head_ns))
        nodes.append(
            subprocess.Popen(
                [*netns(worker_ns), str(RAY), "start", f"--address={address}", f"--node-ip-address={WORKER_IP}",
                 f"--temp-dir={temp_dirs[1]}", *common],
                env=node_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        )  # fmt: skip
        wait_for_nodes(address, env, 2, nodes[1], netns(head_ns))
        yield {"address": address, "env": env, "driver": netns(head_ns)}
    finally:
        for node in reversed(nodes):
            kill_tree(node.pid)
            node.wait()
        for ns in (worker_ns, head_ns):
            leftover = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True).stdout.split()
            for pid in leftover:
                kill_tree(int(pid))
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)  # takes its end of the veth pair along
        for temp_dir in temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
        names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
        assert head_ns not in names and worker_ns not in names, "a test namespace was left behind"


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
