"""External Ray clusters the e2e tests start with `ray start`, their driver a separate process.

The two-node cluster: a head (with the driver beside it) and a worker in two network namespaces the test creates,
joined by a veth pair (10.77.0.1 and 10.77.0.2), with token authentication; each node offers one CPU. No traffic
leaves the namespaces, and they are removed afterwards. Both namespaces see the same files (only the network is
separate), so a workspace under a temp folder is a path every node mounts.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psutil
import pytest

RAY = str(Path(sys.executable).with_name("ray"))

HEAD_IP, WORKER_IP = "10.77.0.1", "10.77.0.2"
HEAD_PORT = 6379  # inside the head's own namespace: nothing else listens there


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
            [*prefix, RAY, "status", f"--address={address}"], env=env, capture_output=True, text=True, timeout=60
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


def netns(name: str) -> list[str]:
    return ["ip", "netns", "exec", name]


@pytest.fixture(scope="module", name="two_node_cluster")
def two_node_cluster_fixture(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A head (with the driver beside it) and a worker in two namespaces joined by a veth pair; token auth on.

    Yields {"address": the head's HEAD_IP:HEAD_PORT, "env": the driver's environment (with the token),
    "driver": the command prefix that runs a command in the head's namespace}. A test module that imports
    `two_node_cluster_fixture` has the fixture `two_node_cluster`, one cluster for the module's tests.
    """
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
                [*netns(head_ns), RAY, "start", "--head", f"--node-ip-address={HEAD_IP}", f"--port={HEAD_PORT}",
                 "--include-dashboard=false", f"--temp-dir={temp_dirs[0]}", *common],
                env=node_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
            )
        )  # fmt: skip
        wait_for_nodes(address, env, 1, nodes[0], netns(head_ns))
        nodes.append(
            subprocess.Popen(
                [*netns(worker_ns), RAY, "start", f"--address={address}", f"--node-ip-address={WORKER_IP}",
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
