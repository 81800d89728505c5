"""One data-parallel training job on the two-node test cluster (tests/ray_cluster.py: a head and a worker in two
network namespaces, one CPU each, token authentication), `imgtune train` a separate driver beside the head: one
worker on each node, rank 0's job directory complete, and the metrics of one process on the same data."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from cli_helpers import train_command
from imgtune.runs.distributed import RUN_FOLDER
from imgtune.storage.jobs import Job
from ray_cluster import (
    HEAD_IP,
    WORKER_IP,
    driver_env,
    two_node_cluster_fixture,  # noqa: F401 - the fixture two_node_cluster
)

pytestmark = [pytest.mark.slow, pytest.mark.ray]

# Head training on images through a frozen MobileNetV2 (no feature cache, no dropout, no trainable BatchNorm,
# per-sample augmentation seeds, a seeded DistributedSampler): two ranks must reproduce one process. On the CPU
# (the workers' device) both: no mixed precision.
TRAINING = (
    "--image-size", "64", "--epochs", "2", "--batch-size", "32", "--set", "train.feature_cache=false",
    "--set", "data.num_workers=0", "--set", "train.device=cpu", "--no-debugger", "--no-profiler", "--json",
)  # fmt: skip


def train(cmd: list[str], env: dict | None = None, prefix: list[str] = ()) -> dict:
    result = subprocess.run([*prefix, *cmd], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-5000:]
    return json.loads(result.stdout)


def test_one_job_trains_on_a_worker_on_each_node(two_node_cluster, tmp_path: Path, dogs_mini, mobilenet_weights):
    cluster, workspace = two_node_cluster, tmp_path / "ws"  # both namespaces see the same files
    summary = train(
        train_command(dogs_mini, mobilenet_weights, "two-nodes", *TRAINING, "--workers", "2",
                      "--ray-address", cluster["address"], "--workspace", str(workspace)),
        env=driver_env(cluster["env"]),
        prefix=cluster["driver"],
    )  # fmt: skip
    assert summary["status"] == "completed"
    job = Job(workspace / "two-nodes")
    record = job.record()
    assert record.status == "completed" and record.world_size == 2 and record.worker_starts == 1
    assert [w["rank"] for w in record.workers] == [0, 1]
    # one CPU on each node, one CPU for each worker: one rank on each node
    assert sorted(w["node"] for w in record.workers) == [HEAD_IP, WORKER_IP]
    assert len({(w["node"], w["pid"]) for w in record.workers}) == 2

    # the job directory: rank 0 wrote it where the driver has it; Ray Train kept its checkpoints beside
    metrics = job.read_metrics()
    assert [m["epoch"] for m in metrics] == [1, 2]  # one writer: each epoch once
    assert (job.model_dir / "model.safetensors").is_file()
    assert record.epochs_run == 2 and record.test["samples"] == 100
    checkpoints = sorted((job.path / RUN_FOLDER).glob("checkpoint_*"))
    assert checkpoints and any((c / "last.pt").is_file() for c in checkpoints)

    # one process (no Ray) on the same data: the same metrics
    single = train(
        train_command(dogs_mini, mobilenet_weights, "one-process", *TRAINING, "--workers", "1",
                      "--workspace", str(workspace)),
    )  # fmt: skip
    assert single["status"] == "completed"
    single_job = Job(workspace / "one-process")
    assert single_job.record().world_size is None and not (single_job.path / RUN_FOLDER).exists()
    for mine, theirs in zip(metrics, single_job.read_metrics(), strict=True):
        assert mine["epoch"] == theirs["epoch"] and mine["step"] == theirs["step"]
        assert mine["valid_loss"] == pytest.approx(theirs["valid_loss"], rel=1e-4)
        assert mine["valid_accuracy"] == theirs["valid_accuracy"]
