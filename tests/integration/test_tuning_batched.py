"""Tuning trials on cached features train as batches of heads (imgtune.tuning.batched): each trial is still the
training job it would be alone, a thousand of them finish, and trials on images still run one by one on Ray
Tune."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgtune.cli import app
from imgtune.config import TuneOptions, build_config
from imgtune.storage.jobs import Job

runner = CliRunner()


def base_config(dogs_mini: Path, weights: Path, epochs: int, **train) -> dict:
    return {
        "data": {"path": str(dogs_mini), "num_workers": 0, "image_size": 96},
        "model": {"backbone": "mobilenet_v2", "weights": str(weights)},
        "train": {"epochs": epochs, **train},
        "debugger": {"enabled": False},
        "profiler": {"enabled": False, "report": False},
    }


@pytest.fixture(scope="module", autouse=True)
def _ray_shut_down_afterwards():
    yield
    import ray

    ray.shutdown()


@pytest.mark.slow
@pytest.mark.ray
def test_a_trial_trained_in_a_batch_equals_its_training_job_alone(tmp_path, dogs_mini, mobilenet_weights):
    from imgtune.runs.train import run_training_job
    from imgtune.runs.tune import run_tuning_job

    space = {
        "train.lr": {"values": [0.003, 0.03]},
        "model.dropout": {"values": [0.0, 0.3]},
        "model.head_hidden": {"values": [32, 128]},
    }
    options = TuneOptions(
        base=base_config(dogs_mini, mobilenet_weights, epochs=3, weight_decay=0.001),
        space=space,
        strategy="grid",
        max_parallel=1,  # one worker: the 8 trials train as one batch of 8 heads
    )
    job = run_tuning_job(options, workspace=tmp_path / "ws", progress=False)
    record = job.read()
    assert record["status"] == "completed" and record["trials_batched"] is True
    assert len(record["trials"]) == 8 and {t["status"] for t in record["trials"]} == {"completed"}
    for trial in record["trials"]:
        trial_record = Job(job.path / trial["job"]).read()
        assert trial_record["status"] == "completed" and trial_record["trained_in_batch_of"] == 8
        assert trial_record["training_mode"] == "features" and "test" not in trial_record
        assert (job.path / trial["job"] / "checkpoints" / "head.safetensors").is_file()
    # the best and the worst trial, trained again alone as plain training jobs: the same epochs, the same numbers
    for trial in (record["trials"][0], record["trials"][-1]):
        together = Job(job.path / trial["job"])
        config = together.read()["config"]
        alone = run_training_job(build_config({**config, "name": None}), workspace=tmp_path / "alone", progress=False)
        mine, theirs = together.read_metrics(), alone.read_metrics()
        assert len(mine) == len(theirs) == 3
        for a, b in zip(mine, theirs, strict=True):
            for key in ("train_loss", "train_accuracy", "valid_loss", "valid_accuracy", "valid_top5_accuracy", "lr"):
                assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-5), key
        assert trial["objective"] == max(m["valid_accuracy"] for m in theirs)
        assert together.read()["best"]["epoch"] == alone.read()["best"]["epoch"]


@pytest.mark.slow
@pytest.mark.ray
def test_a_thousand_trials_finish_and_stay_readable(tmp_path, dogs_mini, mobilenet_weights):
    from imgtune.runs.tune import run_tuning_job

    seen: list[dict] = []
    options = TuneOptions(
        base=base_config(dogs_mini, mobilenet_weights, epochs=2),
        space={"train.lr": {"type": "float", "low": 0.0005, "high": 0.05, "scale": "log"}},
        strategy="random",
        max_trials=1000,
        early_stopping="asha",
    )
    job = run_tuning_job(options, workspace=tmp_path, progress=False, on_trial=seen.append)
    record = job.read()
    assert record["status"] == "completed" and record["trials_count"] == 1000 and len(seen) == 1000
    statuses = {t["status"] for t in record["trials"]}
    assert statuses == {"completed", "early-stopped"}  # ASHA stopped some after their first epoch
    assert len({t["trial"] for t in record["trials"]}) == 1000
    assert len(list((job.path / "trials").iterdir())) == 1000
    shown = runner.invoke(app, ["tune", "show", job.name, "--workspace", str(tmp_path), "--json"])
    assert shown.exit_code == 0 and len(json.loads(shown.stdout)["trials"]) == 1000
    assert (job.path / "report.html").is_file()
    listed = runner.invoke(app, ["jobs", "--workspace", str(tmp_path), "--json"])
    assert listed.exit_code == 0 and job.name in listed.stdout


@pytest.mark.slow
@pytest.mark.ray
def test_trials_that_train_on_images_run_one_by_one_on_ray_tune(tmp_path, dogs_mini, mobilenet_weights):
    from imgtune.runs.tune import run_tuning_job

    base = base_config(dogs_mini, mobilenet_weights, epochs=1)
    base["model"]["freeze"] = "all_but_last"
    base["data"]["image_size"] = 64
    options = TuneOptions(base=base, space={"train.lr": {"values": [0.001, 0.01]}}, strategy="grid")
    job = run_tuning_job(options, workspace=tmp_path, progress=False)
    record = job.read()
    assert record["status"] == "completed" and not record.get("trials_batched")
    assert [t["status"] for t in record["trials"]] == ["completed", "completed"]
    for trial in record["trials"]:
        trial_record = Job(job.path / trial["job"]).read()
        assert trial_record["training_mode"] == "images" and not math.isnan(trial["objective"])


@pytest.mark.slow
@pytest.mark.ray
def test_a_batched_tuning_job_resumes_after_its_driver_is_killed(tmp_path, dogs_mini, mobilenet_weights):
    import contextlib
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    cmd = [sys.executable, "-m", "imgtune", "tune", "--data", str(dogs_mini), "--backbone", "mobilenet_v2",
           "--weights", str(mobilenet_weights), "--epochs", "20", "--max-trials", "30", "--max-parallel", "1",
           "--heads-per-worker", "1", "--strategy", "bayesian", "--name", "killed", "--workspace", str(tmp_path),
           "--set", "data.num_workers=0", "--set", "data.image_size=96"]  # fmt: skip
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    trials = tmp_path / "killed" / "trials"

    def completed() -> dict[str, str]:
        done = {}
        for job_file in trials.glob("*/job.json"):
            with contextlib.suppress(ValueError, FileNotFoundError):  # being written, or a new trial being renamed
                record = json.loads(job_file.read_text())
                if record.get("status") == "completed":
                    done[job_file.parent.name] = record["finished"]
        return done

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not completed():
        time.sleep(0.02)
    before = completed()
    assert before, "no trial finished before the deadline"
    family = [driver.pid, *(p.pid for p in psutil.Process(driver.pid).children(recursive=True))]
    for pid in family:  # the driver and the local Ray it started, as if the machine had gone down
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    driver.wait()
    assert Job.open("killed", tmp_path).status() == "interrupted"
    assert len(before) < 30

    result = runner.invoke(app, ["tune", "--resume", "killed", "--workspace", str(tmp_path), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and len(summary["trials"]) == 30
    assert {t["status"] for t in summary["trials"]} == {"completed"}
    assert sorted(p.name for p in trials.iterdir()) == sorted(t["trial"] for t in summary["trials"])
    after = completed()
    assert len(after) == 30
    assert all(after[name] == finished for name, finished in before.items())  # finished trials were not re-run
    for trial in summary["trials"]:  # each trial's objective is its own job's best epoch, re-run or not
        metrics = Job(tmp_path / "killed" / trial["job"]).read_metrics()
        assert trial["objective"] == max(m["valid_accuracy"] for m in metrics)
        assert [m["epoch"] for m in metrics] == list(range(1, len(metrics) + 1))


@pytest.mark.slow
@pytest.mark.ray
def test_a_finished_trial_the_study_lost_is_adopted_on_resume_not_run_again(tmp_path, dogs_mini, mobilenet_weights):
    """A power cut (or a kill before the study reached the bucket) can lose the journal's last lines while the
    trial's own job completed: resuming adds that trial to the study instead of training it again."""
    from imgtune.runs.tune import run_tuning_job

    options = TuneOptions(
        base=base_config(dogs_mini, mobilenet_weights, epochs=2),
        space={"train.lr": {"type": "float", "low": 0.001, "high": 0.1, "scale": "log"}},
        strategy="random",
        max_trials=4,
        max_parallel=1,
        heads_per_worker=1,
    )
    job = run_tuning_job(options, workspace=tmp_path, progress=False)
    first = job.read()
    journal = job.path / "optuna.journal"
    lines = journal.read_text().splitlines(keepends=True)
    last_created = max(i for i, line in enumerate(lines) if json.loads(line)["op_code"] == 4)  # CREATE_TRIAL
    journal.write_text("".join(lines[:last_created]))  # the study no longer knows its last trial
    lost = sorted(t["trial"] for t in first["trials"])[-1]
    finished = Job(job.path / "trials" / lost).read()["finished"]
    job.update(status="running", pid=2**22 + 1)  # its driver died (no such process)
    assert job.status() == "interrupted"

    resumed = run_tuning_job(resume=job.path, workspace=tmp_path, progress=False).read()
    assert resumed["status"] == "completed" and resumed["trials_count"] == 4
    assert sorted(t["trial"] for t in resumed["trials"]) == sorted(t["trial"] for t in first["trials"])
    assert Job(job.path / "trials" / lost).read()["finished"] == finished  # adopted, not trained again
    adopted = next(t for t in resumed["trials"] if t["trial"] == lost)
    before = next(t for t in first["trials"] if t["trial"] == lost)
    assert adopted["hyperparameters"] == before["hyperparameters"] and adopted["objective"] == before["objective"]
