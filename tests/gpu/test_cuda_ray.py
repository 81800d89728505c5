"""Ray on a CUDA GPU: a tuning job whose trials share one GPU (`--gpus-per-trial 0.25`), and a data-parallel
job on two GPUs with NCCL (skipped, saying so, on a machine with one GPU)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

import imgtune
from imgtune.cli import app
from imgtune.core.io import read_jsonl
from imgtune.storage.jobs import Job

pytestmark = [pytest.mark.gpu, pytest.mark.ray]

runner = CliRunner()


@pytest.fixture(scope="module", autouse=True)
def _ray_shut_down_afterwards():
    yield
    import ray

    ray.shutdown()


def training_window(trial: Job) -> tuple[float, float]:
    """When a trial trained: its first training batch's start to its last one's end (Unix time)."""
    steps = [s for s in read_jsonl(trial.path / "profiler/steps.jsonl") if s["phase"] == "train"]
    assert steps, f"{trial.name} recorded no training step"
    return min(s["t"] for s in steps), max(s["t"] + s["total"] for s in steps)


def test_four_trials_share_one_gpu_at_the_same_time(cuda, tmp_path, dogs_mini, mobilenet_weights):
    """Trials on images (so each is its own Ray Tune trial, not a batch of heads), with the profiler on in the
    trials: its records say where each trial trained and when."""
    result = runner.invoke(
        app,
        ["tune", "--data", str(dogs_mini), "--backbone", "mobilenet_v2", "--weights", str(mobilenet_weights),
         "--epochs", "3", "--max-trials", "4", "--max-parallel", "4", "--gpus-per-trial", "0.25",
         "--cpus-per-trial", "1", "--strategy", "random",
         "--set", "model.freeze=all_but_last", "--set", "train.feature_cache=false", "--set", "data.image_size=96",
         "--set", "data.num_workers=1", "--set", "profiler.enabled=true", "--set", "profiler.trace=false",
         "--name", "shared-gpu", "--workspace", str(tmp_path), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    tuning = Job.open("shared-gpu", tmp_path)
    record = tuning.read()
    assert record["status"] == "completed" and record["options"]["gpus_per_trial"] == 0.25
    trials = record["trials"]
    assert len(trials) == 4 and {t["status"] for t in trials} == {"completed"}, trials
    windows = []
    for trial in trials:
        job = Job(tuning.path / trial["job"])
        meta = json.loads((job.path / "profiler/meta.json").read_text())
        assert meta["device"].startswith("cuda"), (trial["job"], meta)  # Ray gave the trial the GPU (0: hidden)
        samples = list(read_jsonl(job.path / "profiler/system.jsonl"))
        assert samples and all(len(s.get("gpus", [])) == 1 for s in samples)  # the one GPU its share is on
        windows.append(training_window(job))
    latest_start, earliest_end = max(w[0] for w in windows), min(w[1] for w in windows)
    assert latest_start < earliest_end, windows  # all four trained at one moment, on one GPU


def test_data_parallel_training_on_two_gpus_with_nccl(two_gpus, tmp_path, dogs_mini, mobilenet_weights):
    job = imgtune.train(
        dogs_mini, backbone="mobilenet_v2", weights=mobilenet_weights, freeze="all_but_last", epochs=2,
        image_size=96, batch_size=32, workers=2, gpus_per_worker=1, debugger=False,
        overrides=["train.feature_cache=false", "data.num_workers=1"], workspace=tmp_path, progress=False,
    )  # fmt: skip
    record = job.read()
    assert record["status"] == "completed" and record["world_size"] == 2
    devices = [w["device"] for w in record["workers"]]
    assert all(d.startswith("cuda") for d in devices) and len(set(devices)) == 2, devices  # a GPU per rank
    assert record["test"]["accuracy"] > 0.5
    for rank in (0, 1):
        meta = json.loads((job.path / f"profiler/meta.rank{rank}.json").read_text())
        assert meta["device"].startswith("cuda"), meta
