"""The debugger inside training jobs: the store, the five default rules, the reader, the CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli_helpers import SLOW_IMAGE_TRAINING, resume_command, train_command
from imgtune.cli import app
from imgtune.config import DEFAULT_RULES, build_config
from imgtune.core.errors import JobError
from imgtune.core.io import read_jsonl
from imgtune.debugger.store import Trial, open_trial
from imgtune.runs.train import run_training_job
from imgtune.storage.jobs import Job

runner = CliRunner()


@pytest.fixture(scope="module")
def debugged_job(tmp_path_factory, dogs_mini, mobilenet_weights) -> Job:
    config = build_config(
        {
            "data": {"path": str(dogs_mini), "image_size": 96, "num_workers": 0},
            "model": {"backbone": "mobilenet_v2", "weights": str(mobilenet_weights)},
            "train": {"epochs": 6},
        }
    )
    return run_training_job(config, workspace=tmp_path_factory.mktemp("ws"), progress=False)


def test_default_job_writes_the_store_and_the_five_rule_results(debugged_job: Job):
    record = debugged_job.read()
    assert set(record["debugger"]) == set(DEFAULT_RULES)
    assert all(r["status"] in ("NoIssuesFound", "IssuesFound", "Error") for r in record["debugger"].values())
    rules = json.loads((debugged_job.path / "debugger/rules.json").read_text())["rules"]
    assert [r["rule"] for r in rules] == DEFAULT_RULES
    for r in rules:
        if r["status"] == "IssuesFound":
            assert r["findings"] and {"step", "message", "evidence"} <= set(r["findings"][0])
    trial = open_trial(debugged_job.path)
    collections = trial.collections()
    assert {"losses", "metrics", "weights", "biases", "gradients", "optimizer_variables"} <= set(collections)
    assert "head.0.weight" in collections["weights"]  # features mode: the head's parameters, named as in the model
    assert "gradient/head.0.weight" in collections["gradients"]
    assert trial.modes() == ["train", "eval", "predict"]
    loss = trial.tensor("loss")
    train_steps = loss.steps("train")
    assert [loss.mode_step(s, "train") for s in train_steps] == list(range(len(train_steps)))  # every step
    weight_steps = trial.tensor("head.0.weight").steps("train")
    assert [trial.tensor("head.0.weight").mode_step(s, "train") for s in weight_steps] == [0]  # every 100 steps
    gradient = trial.tensor("gradient/head.0.weight")  # PoorWeightInitialization asks for the first 10 steps
    assert [gradient.mode_step(s, "train") for s in gradient.steps("train")] == list(range(10))


def test_reader_values_reductions_and_frame(debugged_job: Job):
    trial = open_trial(debugged_job.name, debugged_job.path.parent)
    weight = trial.tensor("head.0.weight")
    step = weight.steps("train")[0]
    r = weight._record(step, "train")["r"]
    assert r["min"] <= r["mean"] <= r["max"] and r["l2"] > 0 and r["numel"] == 1280 * 128
    assert sum(weight.histogram(step)["counts"]) == 1280 * 128
    losses = trial.tensor("train_loss").reductions("mean", "train")
    assert [round(v, 6) for v in losses.values()] == [round(m["train_loss"], 6) for m in debugged_job.read_metrics()]
    frame = trial.to_frame()
    assert {"name", "collection", "mode", "step", "mode_step", "mean", "l2"} <= set(frame.columns)
    assert len(frame) == sum(len(s.steps()) for s in trial.tensors.values())


def test_debug_cli_rules_show_and_plot(debugged_job: Job, tmp_path: Path):
    result = runner.invoke(app, ["debug", "rules", str(debugged_job.path), "--json"])
    assert result.exit_code == 0, result.output
    offline = {r["rule"]: r["status"] for r in json.loads(result.stdout)["rules"]}
    online = {name: r["status"] for name, r in debugged_job.read()["debugger"].items()}
    assert offline == online
    one = runner.invoke(
        app,
        ["debug", "rules", str(debugged_job.path), "--rule", "Overfit", "--param", "ratio_threshold=1000", "--json"],
    )
    assert one.exit_code == 0, one.output
    assert json.loads(one.stdout)["rules"][0]["status"] == "NoIssuesFound"
    shown = runner.invoke(app, ["debug", "show", str(debugged_job.path), "--json"])
    assert shown.exit_code == 0 and "losses" in json.loads(shown.stdout)["collections"]
    png = tmp_path / "loss.png"
    plotted = runner.invoke(app, ["debug", "plot", str(debugged_job.path), "--tensor", "loss", "--out", str(png)])
    assert plotted.exit_code == 0, plotted.output
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
    missing = runner.invoke(app, ["debug", "plot", str(debugged_job.path), "--tensor", "nope", "--out", str(png)])
    assert missing.exit_code == 2 and "no tensor 'nope'" in missing.output


def test_no_debugger_flag(tmp_path, dogs_mini, mobilenet_weights):
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(dogs_mini),
            "--backbone",
            "mobilenet_v2",
            "--weights",
            str(mobilenet_weights),
            "--image-size",
            "64",
            "--epochs",
            "1",
            "--no-debugger",
            "--workspace",
            str(tmp_path),
            "--name",
            "quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert not (tmp_path / "quiet/debugger").exists()
    with pytest.raises(JobError, match="no debugger data"):
        open_trial("quiet", tmp_path)


@pytest.mark.slow
def test_reader_follows_a_running_job_and_survives_a_kill_and_resume(tmp_path, dogs_mini, mobilenet_weights):
    env = {**os.environ, "IMGTUNE_WORKSPACE": str(tmp_path)}
    cmd = train_command(dogs_mini, mobilenet_weights, "watched", "--epochs", "3", *SLOW_IMAGE_TRAINING)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    store = tmp_path / "watched/debugger/tensors.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (store.exists() and store.stat().st_size > 20_000):
        time.sleep(0.05)
    trial = Trial(store.parent)  # opened while the job runs
    seen = len(trial.steps())
    assert seen > 0
    while time.monotonic() < deadline and len(trial.refresh().steps()) == seen:
        time.sleep(0.05)
    assert len(trial.steps()) > seen  # refresh picked up what was written since
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = open_trial("watched", tmp_path)  # the store of a killed job reads fine
    assert killed.tensor("loss").steps("train")
    profiler = tmp_path / "watched/profiler"  # so do the profiler's samples and step records
    assert len(list(read_jsonl(profiler / "system.jsonl"))) > 0
    steps_before = [s for s in read_jsonl(profiler / "steps.jsonl") if s["phase"] == "train"]
    assert steps_before

    result = subprocess.run(
        resume_command("watched"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    final = open_trial("watched", tmp_path)
    loss = final.tensor("loss")
    mode_steps = [loss.mode_step(s, "train") for s in loss.steps("train")]
    assert mode_steps == list(range(3 * 19))  # 300 images / 16 = 19 batches per epoch, none twice, none lost
    assert json.loads((tmp_path / "watched/debugger/rules.json").read_text())["rules"][0]["status"] != "InProgress"
    steps_after = [s for s in read_jsonl(profiler / "steps.jsonl") if s["phase"] == "train"]
    assert len(steps_after) >= len(steps_before) + 19  # the resumed run appended its own
    assert (tmp_path / "watched/report.html").exists()


def test_opt_in_collections_and_raw_tensors(tmp_path, dogs_mini, mobilenet_weights):
    config = build_config(
        {
            "data": {"path": str(dogs_mini), "image_size": 64, "num_workers": 0},
            "model": {"backbone": "mobilenet_v2", "weights": str(mobilenet_weights)},
            "train": {"epochs": 1},
            "debugger": {
                "collections": ["losses", "weights", "activations", "inputs"],
                "activations_regex": r"1:ReLU",
                "train": {"save_interval": 2, "end_step": 3},
                "save_raw": True,
                "rules": ["ExplodingTensor"],
            },
        }
    )
    job = run_training_job(config, workspace=tmp_path, progress=False)
    trial = open_trial(job.path)
    assert set(trial.collections()) == {"losses", "weights", "activations", "inputs"}
    assert trial.tensor_names(collection="activations") == ["head.1_relu_input", "head.1_relu_output"]
    relu_out = trial.tensor("head.1_relu_output")
    assert [relu_out.mode_step(s, "train") for s in relu_out.steps("train")] == [0, 2]  # interval 2, end_step 3
    assert relu_out.reduction(relu_out.steps("train")[0], "min", "train") >= 0.0
    raw = trial.raw("train", relu_out.steps("train")[0])
    assert raw["head.0.weight"].shape == (128, 1280) and raw["inputs"].shape[1] == 1280
    assert job.read()["debugger"]["ExplodingTensor"]["status"] == "NoIssuesFound"


def test_bad_debugger_config_is_refused(tmp_path, dogs_mini):
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(dogs_mini),
            "--set",
            "debugger.collections=[weights, nope]",
            "--workspace",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2 and "unknown collection" in result.output
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(dogs_mini),
            "--set",
            "debugger.rules=[NoSuchRule]",
            "--pretrained",
            "none",
            "--workspace",
            str(tmp_path),
        ],
    )
    assert result.exit_code == 2 and "unknown rule 'NoSuchRule'" in result.output
    assert not list(tmp_path.iterdir())  # refused before any job directory was made


def test_check_input_images_says_why_it_cannot_judge_features(debugged_job: Job):
    result = runner.invoke(app, ["debug", "rules", str(debugged_job.path), "--rule", "CheckInputImages", "--json"])
    assert result.exit_code == 0, result.output
    verdict = json.loads(result.stdout)["rules"][0]
    assert verdict["status"] == "Error" and "input images" in verdict["error"]
