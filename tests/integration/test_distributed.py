"""One training job on two data-parallel Ray Train workers (gloo, in-process Ray on loopback), on the shared
photos: the same metrics as one process, rank 0's job directory, stops that reach every rank, a killed worker
recovered from the last checkpoint, a killed job resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from cli_helpers import resume_command
from imgtune.config import TuneOptions, build_config
from imgtune.core.errors import ConfigError
from imgtune.runs.distributed import RUN_FOLDER
from imgtune.runs.train import run_training_job
from imgtune.storage.jobs import Job
from imgtune.training.callbacks import Callback, StopTraining

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def image_config(dogs_mini: Path, weights: Path, workers: int, **train) -> dict:
    """Head training on images through a frozen MobileNetV2 (no feature cache): deterministic enough that two
    workers must reproduce one process (no dropout, no trainable BatchNorm, per-sample augmentation seeds)."""
    return {
        "data": {"path": str(dogs_mini), "image_size": 64, "num_workers": 0},
        "model": {"backbone": "mobilenet_v2", "weights": str(weights)},
        "train": {
            "epochs": 2, "lr": 0.003, "batch_size": 32, "feature_cache": False, "workers": workers,
            "mixed_precision": "off", **train,
        },
    }  # fmt: skip


def checkpoint_epochs(job: Job) -> list[int]:
    """The epochs of the checkpoints Ray Train has recorded for the job (its run snapshot, plain JSON)."""
    snapshot = job.path / RUN_FOLDER / "checkpoint_manager_snapshot.json"
    if not snapshot.exists():
        return []
    results = json.loads(snapshot.read_text())["checkpoint_results"]
    return sorted(r["metrics"]["epoch"] for r in results if "epoch" in r["metrics"])


def wait_for_checkpoint(job_path: Path, epoch: int, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (job_path / "job.json").exists() and epoch in checkpoint_epochs(Job(job_path)):
            return
        time.sleep(0.2)
    raise AssertionError(f"no checkpoint of epoch {epoch} within {timeout} s")


@pytest.fixture(scope="module")
def one_and_two(tmp_path_factory, dogs_mini: Path, mobilenet_weights: Path) -> tuple[Job, Job]:
    workspace = tmp_path_factory.mktemp("ws")
    jobs = []
    for workers in (1, 2):
        config = build_config(image_config(dogs_mini, mobilenet_weights, workers))
        jobs.append(run_training_job(config, workspace=workspace, progress=False))
    return jobs[0], jobs[1]


def test_two_workers_compute_what_one_process_computes(one_and_two: tuple[Job, Job]):
    single, pair = one_and_two
    for mine, theirs in zip(pair.read_metrics(), single.read_metrics(), strict=True):
        for key in ("train_loss", "valid_loss"):
            assert mine[key] == pytest.approx(theirs[key], rel=1e-4), key
        for key in ("train_accuracy", "valid_accuracy", "valid_top5_accuracy", "step"):
            assert mine[key] == theirs[key], key
    test_pair, test_single = pair.record().test, single.record().test
    assert test_pair["samples"] == test_single["samples"] == 100  # the test split once, shared by the ranks
    assert test_pair["accuracy"] == test_single["accuracy"]
    assert test_pair["confusion_matrix"] == test_single["confusion_matrix"]
    assert test_pair["loss"] == pytest.approx(test_single["loss"], rel=1e-4)
    weights_pair = load_file(pair.model_dir / "model.safetensors")
    weights_single = load_file(single.model_dir / "model.safetensors")
    assert set(weights_pair) == set(weights_single)  # today's bundle: no `module.` prefixes
    for name, tensor in weights_single.items():
        torch.testing.assert_close(weights_pair[name], tensor, rtol=1e-3, atol=1e-4)


def test_rank_zero_writes_the_job_and_says_where_each_rank_ran(one_and_two: tuple[Job, Job]):
    single, pair = one_and_two
    record = pair.record()
    assert record.status == "completed" and record.world_size == 2 and record.worker_starts == 1
    assert [w["rank"] for w in record.workers] == [0, 1]
    assert {w["node"] for w in record.workers} == {"127.0.0.1"}  # loopback Ray: nothing on the network
    assert len({w["pid"] for w in record.workers}) == 2 and os.getpid() not in {w["pid"] for w in record.workers}
    assert record.training_mode == "images" and record.epochs_run == 2
    assert [m["epoch"] for m in pair.read_metrics()] == [1, 2]  # one writer: each epoch once
    assert checkpoint_epochs(pair) == [2]  # Ray Train keeps the last epoch's checkpoint (and the results)
    assert (pair.path / "debugger").is_dir() and record.debugger  # captured on rank 0, rules evaluated
    assert (pair.path / "report.html").exists()
    assert single.record().world_size is None and not (single.path / RUN_FOLDER).exists()


def test_a_debugger_rule_stop_reaches_every_rank(tmp_path: Path, dogs_mini: Path, mobilenet_weights: Path):
    raw = image_config(dogs_mini, mobilenet_weights, 2, epochs=6)
    # Overfit with a threshold no loss ratio can miss: it fires at the first epoch's end, on rank 0 only
    raw["debugger"] = {"stop_on": ["Overfit"], "rule_parameters": {"Overfit": {"ratio_threshold": -100}}}
    raw["profiler"] = {"enabled": False}
    job = run_training_job(build_config(raw), workspace=tmp_path, progress=False)  # returns: no rank left waiting
    record = job.record()
    assert record.status == "completed"
    assert "Overfit" in record.stop_reason
    assert record.epochs_run < 6


def test_batch_size_must_split_over_the_workers(dogs_mini: Path, mobilenet_weights: Path):
    with pytest.raises(ConfigError, match="split evenly over 4 workers"):
        build_config(image_config(dogs_mini, mobilenet_weights, 4, batch_size=30))


def test_a_gpu_is_not_shared_by_two_workers(dogs_mini: Path, mobilenet_weights: Path):
    with pytest.raises(ConfigError, match="needs a whole GPU"):
        build_config(image_config(dogs_mini, mobilenet_weights, 2, gpus_per_worker=0.5))
    build_config(image_config(dogs_mini, mobilenet_weights, 1, gpus_per_worker=0.5))  # one worker may share one
    with pytest.raises(ConfigError, match="needs a whole GPU"):
        TuneOptions(base={}, space={}, workers_per_trial=2, gpus_per_trial=0.5)


def test_a_killed_worker_is_restarted_from_the_last_checkpoint(
    tmp_path: Path, dogs_mini: Path, mobilenet_weights: Path
):
    raw = image_config(dogs_mini, mobilenet_weights, 2, epochs=4, max_failures=2)
    raw["name"] = "killed-worker"
    raw["debugger"] = {"enabled": False}
    raw["profiler"] = {"enabled": False}
    job_path = tmp_path / "killed-worker"
    killed: dict[str, int] = {}

    def kill_rank_one() -> None:
        wait_for_checkpoint(job_path, 2)  # epoch 2 is safe in Ray Train; epoch 3 has begun
        pid = next(w["pid"] for w in Job(job_path).record().workers if w["rank"] == 1)
        os.kill(pid, signal.SIGKILL)
        killed["pid"] = pid

    killer = threading.Thread(target=kill_rank_one, daemon=True)
    killer.start()
    job = run_training_job(build_config(raw), workspace=tmp_path, progress=False)
    killer.join(5)
    record = job.record()
    assert killed, "rank 1 was never killed"
    assert record.status == "completed" and record.epochs_run == 4
    assert record.worker_starts == 2  # Ray Train started the group again
    assert record.resumed_from_epoch == 2  # from the checkpoint of the last finished epoch: none lost
    assert killed["pid"] not in {w["pid"] for w in record.workers}
    assert [m["epoch"] for m in job.read_metrics()] == [1, 2, 3, 4]
    assert "restarted 2 workers" in job.log_file.read_text()


def test_a_killed_job_resumes_on_its_workers(tmp_path: Path, dogs_mini: Path, mobilenet_weights: Path):
    raw = image_config(dogs_mini, mobilenet_weights, 2, epochs=4)
    raw["name"] = "killed-driver"
    raw["debugger"] = {"enabled": False}
    raw["profiler"] = {"enabled": False}
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(raw))  # YAML is a superset of JSON
    command = [sys.executable, "-m", "imgtune", "train", "--config", str(config_file), "--workspace", str(tmp_path)]
    driver = subprocess.Popen(command, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_for_checkpoint(tmp_path / "killed-driver", 2)
    finally:
        os.killpg(driver.pid, signal.SIGKILL)  # the driver, its in-process Ray and the workers
        driver.wait(60)
    job = Job(tmp_path / "killed-driver")
    assert job.status() == "interrupted"
    resumed = subprocess.run(
        resume_command("killed-driver", "--workspace", str(tmp_path), "--json"),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    record = job.record()
    assert record.status == "completed" and record.epochs_run == 4
    assert record.resumed_from_epoch >= 2  # Ray Train's run snapshot gave the workers the last checkpoint
    assert [m["epoch"] for m in job.read_metrics()] == [1, 2, 3, 4]
    assert (job.model_dir / "model.safetensors").exists()


def test_workers_build_the_feature_cache_one_process_would(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dogs_mini: Path, mobilenet_weights: Path
):
    monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path / "cache"))  # empty: the workers must compute it all
    raw = {
        "data": {"path": str(dogs_mini), "image_size": 64, "num_workers": 0},
        "model": {"backbone": "mobilenet_v2", "weights": str(mobilenet_weights), "backend": "eager"},
        "train": {"epochs": 2, "batch_size": 32, "workers": 2, "augment_views": 1},
        "debugger": {"enabled": False},
        "profiler": {"enabled": False},
    }
    pair = run_training_job(build_config(raw), workspace=tmp_path, progress=False)
    cache = sorted(p.name for p in (tmp_path / "cache" / "features").iterdir())
    assert len(cache) == 4 and not any("shard" in name for name in cache)  # train x 2 views, valid, test; merged
    record = pair.record()
    assert record.status == "completed" and record.training_mode == "features" and record.world_size == 2
    assert "own process" in record.head_trained_on
    assert "2 workers computed 4 feature cache entries" in pair.log_file.read_text()
    raw["train"]["workers"] = 1
    single = run_training_job(build_config(raw), workspace=tmp_path, progress=False)
    assert single.record().feature_extraction is None  # every entry found: the shards made the same entries
    assert sorted(p.name for p in (tmp_path / "cache" / "features").iterdir()) == cache
    for mine, theirs in zip(pair.read_metrics(), single.read_metrics(), strict=True):
        assert mine["valid_loss"] == pytest.approx(theirs["valid_loss"], rel=1e-6)


class StopAfterFirstEpoch(Callback):
    """A callback of the job's own process (as a tuning trial's reporter is): it sees each epoch's end there."""

    def __init__(self) -> None:
        self.seen: list[int] = []

    def on_epoch_end(self, trainer) -> None:
        self.seen.append(trainer.epoch)
        raise StopTraining("the driver's callback asked")


def test_a_stop_asked_in_the_jobs_process_reaches_the_workers(tmp_path: Path, dogs_mini: Path, mobilenet_weights: Path):
    raw = image_config(dogs_mini, mobilenet_weights, 2, epochs=8)
    raw["debugger"] = {"enabled": False}
    raw["profiler"] = {"enabled": False}
    callback = StopAfterFirstEpoch()
    job = run_training_job(build_config(raw), workspace=tmp_path, progress=False, callbacks=[callback])
    record = job.record()
    assert callback.seen[0] == 1
    assert record.status == "completed" and record.stop_reason == "the driver's callback asked"
    assert record.epochs_run < 8


class FailAfterFirstEpoch(Callback):
    def on_epoch_end(self, trainer) -> None:
        raise RuntimeError("the driver's callback broke")


def test_a_failing_job_process_stops_its_workers(tmp_path: Path, dogs_mini: Path, mobilenet_weights: Path):
    raw = image_config(dogs_mini, mobilenet_weights, 2, epochs=8)
    raw["name"] = "driver-fails"
    raw["debugger"] = {"enabled": False}
    raw["profiler"] = {"enabled": False}
    with pytest.raises(RuntimeError, match="the driver's callback broke"):
        run_training_job(build_config(raw), workspace=tmp_path, progress=False, callbacks=[FailAfterFirstEpoch()])
    job = Job(tmp_path / "driver-fails")
    assert job.record().status == "failed"
    assert "asked its workers to stop" in job.log_file.read_text()
    epochs = len(job.read_metrics())
    time.sleep(5)  # workers left running would go on recording epochs into the failed job
    assert len(job.read_metrics()) == epochs < 8


def test_tuning_trials_on_two_workers_each(tmp_path: Path, dogs_mini: Path, mobilenet_weights: Path):
    import imgtune

    job = imgtune.tune(
        dogs_mini, backbone="mobilenet_v2", weights=mobilenet_weights, epochs=1, workspace=tmp_path, progress=False,
        overrides=["data.image_size=64", "data.num_workers=0", "train.feature_cache=false", "debugger.enabled=false",
                   "profiler.enabled=false"],
        space={"train.lr": {"type": "categorical", "values": [0.001, 0.003]}}, strategy="grid", max_parallel=1,
        workers_per_trial=2,
    )  # fmt: skip
    record = job.record()
    assert record.status == "completed" and not record.trials_batched
    assert [t["status"] for t in record.trials] == ["completed", "completed"]
    for trial in record.trials:
        trial_record = Job(job.path / trial["job"]).record()
        assert trial_record.world_size == 2 and len({w["pid"] for w in trial_record.workers}) == 2
        assert trial_record.config["train"]["workers"] == 2
        assert trial["objective"] == trial_record.best["valid_accuracy"]
