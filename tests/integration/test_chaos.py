"""Chaos: a training job SIGKILLed at seeded random moments (data check, feature cache, epochs, checkpoint
writes, the end) and resumed after each kill always completes, with every finished epoch once in its metrics
and every file whole. The job is the CLI in a subprocess, as a user runs it."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from cli_helpers import SLOW_IMAGE_TRAINING, resume_command, train_command

EPOCHS = 6
KILLS = 20
SEED = 19


def files_parse(job: Path, ignore: tuple[str, ...] = ()) -> None:
    """Every file the job wrote is whole: JSON parses, JSON Lines parse line by line, checkpoints load. `ignore`:
    folders of the job that are not its own (a tuning job's `ray`: Ray's experiment state)."""
    for path in job.rglob("*"):
        if not path.is_file() or path.name.startswith(".imgtune-") or path.relative_to(job).parts[0] in ignore:
            continue
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".jsonl":
            for line in path.read_text().splitlines():
                json.loads(line)
        elif path.suffix == ".pt":
            torch.load(path, map_location="cpu", weights_only=True)


def epochs_recorded(job: Path) -> list[int]:
    metrics = job / "metrics.jsonl"
    return [json.loads(line)["epoch"] for line in metrics.read_text().splitlines()] if metrics.exists() else []


def kill_and_resume(
    tmp_path: Path, name: str, start: list[str], options: tuple[str, ...], kills: int, seed: int, longest: float
) -> dict:
    """Start the job, SIGKILL it after a seeded random time in [2 s, `longest`] (its interpreter's start
    included, so every phase gets its share), check its files, resume it; `kills` times, then let it finish.
    Returns its final job.json."""
    job = tmp_path / "runs" / name
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    moments = random.Random(seed)
    last_saved = 0  # the checkpoint's epoch after the previous kill
    killed = 0
    with (tmp_path / f"{name}.log").open("ab") as log:
        for kill in range(kills):
            command = resume_command(name, *options) if (job / "job.json").exists() else start
            process = subprocess.Popen(command, stdout=log, stderr=log, env=env)
            deadline = time.monotonic() + moments.uniform(2.0, longest)
            while process.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                killed += 1
            process.wait()
            if not job.exists():
                continue  # killed before the job existed
            files_parse(job)
            epochs = epochs_recorded(job)
            assert epochs == list(range(1, len(epochs) + 1)), (kill, epochs)  # each finished epoch once, in order
            checkpoint = job / "checkpoints" / "last.pt"
            if checkpoint.exists():  # a checkpointed epoch is never lost: not from the metrics, nor the checkpoint
                saved = torch.load(checkpoint, map_location="cpu", weights_only=True)["epoch"]
                assert len(epochs) >= saved >= last_saved, (kill, saved, last_saved, epochs)
                last_saved = saved
            if json.loads((job / "job.json").read_text()).get("status") == "completed":
                break
    if json.loads((job / "job.json").read_text()).get("status") != "completed":
        result = subprocess.run(resume_command(name, *options), capture_output=True, text=True, env=env, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
    files_parse(job)
    assert epochs_recorded(job) == list(range(1, EPOCHS + 1))
    assert (job / "model" / "model.safetensors").is_file()
    resumed = (job / "logs.txt").read_text().count("resuming")
    assert killed >= 2 and resumed >= 1, (killed, resumed)  # kills did land mid-job (how many: the machine's speed)
    return json.loads((job / "job.json").read_text())


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "training", "longest"),
    [
        ("on-features", ("--image-size", "32"), 16.0),  # data check, feature cache, quick epochs, the end
        ("on-images", SLOW_IMAGE_TRAINING, 30.0),  # epochs and checkpoint writes take most of the time
    ],
)
def test_a_training_job_killed_at_random_moments_completes_with_every_epoch_once(
    tmp_path, dogs_mini, mobilenet_weights, name, training, longest
):
    """10 kills for each of the two ways a job trains: 20 seeded random moments in all."""
    options = ("--workspace", str(tmp_path / "runs"), "--json")
    start = train_command(
        dogs_mini, mobilenet_weights, name, "--epochs", str(EPOCHS), *training,
        "--set", "data.num_workers=0", "--set", "train.early_stopping.enabled=false", *options,
    )  # fmt: skip
    record = kill_and_resume(tmp_path, name, start, options, KILLS // 2, SEED + len(name), longest)
    assert record["status"] == "completed" and record["epochs_run"] == EPOCHS
