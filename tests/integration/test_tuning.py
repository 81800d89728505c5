"""Tuning jobs on a local Ray: search spaces, strategies, a crashing trial, results, the final training."""

from __future__ import annotations

import contextlib
import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from browser import assert_rendered_offline, render_report
from imgtune.cli import app
from imgtune.core.errors import ConfigError
from imgtune.storage.jobs import Job
from imgtune.tuning.space import DEFAULT_SPACE, load_space, parse_space

runner = CliRunner()


def base_config(dogs_mini: Path, weights: Path, epochs: int = 2) -> dict:
    return {
        "data": {"path": str(dogs_mini), "num_workers": 0},
        "model": {"backbone": "mobilenet_v2", "weights": str(weights)},
        "train": {"epochs": epochs},
        "debugger": {"enabled": False},
        "profiler": {"enabled": False, "report": False},
    }


@pytest.fixture(scope="module", autouse=True)
def _ray_shut_down_afterwards():
    yield
    import ray

    ray.shutdown()


# -- search spaces ------------------------------------------------------------------------------------------


def test_default_space_is_the_original_projects():
    space = load_space(None)
    assert space.keys == ["train.lr", "train.batch_size"]
    lr, batch = space.parameters
    assert (lr.low, lr.high, lr.scale) == (0.001, 0.1, "log")
    assert batch.values == (16, 32, 64, 128, 256)
    assert space.to_dict() == DEFAULT_SPACE


def test_space_types_scales_and_grids():
    space = parse_space(
        {
            "train.epochs": {"type": "int", "low": 2, "high": 6},
            "train.momentum": {"type": "float", "low": 0.9, "high": 0.999, "scale": "reverse_log", "grid_points": 3},
            "model.head": {"values": ["mlp", "linear"]},
        }
    )
    epochs, momentum, head = space.parameters
    assert epochs.grid_values() == [2, 4, 6] and epochs.value(3.6) == 4 and isinstance(epochs.value(3.6), int)
    grid = momentum.grid_values()  # log-spaced in 1 - momentum: 0.1, 0.01, 0.001 up to rounding
    assert [round(1 - g, 6) for g in grid] == [0.999, 0.99, 0.9]
    assert momentum.value(0.01) == pytest.approx(0.99) and momentum.sample_of(0.99) == pytest.approx(0.01)
    assert head.grid_values() == ["mlp", "linear"]
    assert space.values({"train.epochs": 5.2, "model.head": "linear"}) == {"train.epochs": 5, "model.head": "linear"}


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ({"train.lr": {"type": "float", "low": 0.1, "high": 0.01}}, "must be below"),
        ({"train.lr": {"type": "float", "low": 0.0, "high": 0.1, "scale": "log"}}, "log scale needs low > 0"),
        ({"train.lr": {"type": "float", "low": 0.1, "high": 1.0, "scale": "reverse_log"}}, "high < 1"),
        ({"train.lr": {"type": "float", "low": 0.1, "high": 1.0, "scale": "cubic"}}, "scale must be one of"),
        ({"train.batch_size": {"type": "categorical", "values": []}}, "non-empty list"),
        ({"train.lr": {"type": "float", "low": 0.1}}, "numeric low and high"),
        ({"train.lr": {"type": "float", "low": 0.1, "high": 0.2, "step": 1}}, "unknown field"),
        ({}, "must map config keys"),
    ],
)
def test_bad_spaces_are_refused(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(raw)


def test_space_keys_and_values_are_checked_against_the_job_config(dogs_mini, mobilenet_weights):
    base = base_config(dogs_mini, mobilenet_weights)
    with pytest.raises(ConfigError, match="train.lrate"):
        parse_space({"train.lrate": {"type": "float", "low": 0.001, "high": 0.1}}).check_against(base)
    with pytest.raises(ConfigError, match="batch_size"):  # 0 is not a valid batch size
        parse_space({"train.batch_size": {"values": [0, 32]}}).check_against(base)


# -- tuning jobs --------------------------------------------------------------------------------------------


def feature_files(cache: Path) -> set[Path]:
    return set((cache / "features").rglob("*")) if (cache / "features").exists() else set()


@pytest.mark.slow
@pytest.mark.ray
def test_bayesian_tuning_shares_one_feature_cache_and_never_sees_test(
    tmp_path, dogs_mini, mobilenet_weights, imgtune_cache
):
    from imgtune.config import TuneOptions
    from imgtune.runs.tune import run_tuning_job

    seen: list[dict] = []
    options = TuneOptions(base=base_config(dogs_mini, mobilenet_weights), space=DEFAULT_SPACE, max_trials=3)
    job = run_tuning_job(options, workspace=tmp_path, progress=False, on_trial=seen.append)
    cached_after_first_job = feature_files(imgtune_cache)
    record = job.read()
    assert record["status"] == "completed" and record["kind"] == "tuning"
    trials = record["trials"]
    assert len(trials) == 3 and len(seen) == 3
    for trial in trials:
        assert trial["status"] == "completed" and trial["epochs"] == 2
        values = trial["hyperparameters"]
        assert isinstance(values["train.batch_size"], int) and values["train.batch_size"] in (16, 32, 64, 128, 256)
        assert isinstance(values["train.lr"], float) and 0.001 <= values["train.lr"] <= 0.1
        trial_job = Job(job.path / trial["job"])
        trial_record = trial_job.read()
        assert trial_record["status"] == "completed"
        assert "test" not in trial_record  # trials never evaluate the test split
        assert trial_record["config"]["train"]["lr"] == values["train.lr"]
        assert trial["objective"] == max(m["valid_accuracy"] for m in trial_job.read_metrics())
        assert trial_record["training_mode"] == "features"
    objectives = [t["objective"] for t in trials]
    assert objectives == sorted(objectives, reverse=True)  # best first
    assert record["best"]["trial"] == trials[0]["trial"]
    assert record["feature_cache_seconds"] >= 0
    assert cached_after_first_job  # the cache was made once, before the trials ...
    # ... and a second tuning job on the same data adds nothing to it: every trial reads the same features
    run_tuning_job(
        TuneOptions(base=base_config(dogs_mini, mobilenet_weights), space=DEFAULT_SPACE, max_trials=1),
        workspace=tmp_path,
        progress=False,
    )
    assert feature_files(imgtune_cache) == cached_after_first_job


@pytest.mark.slow
@pytest.mark.ray
def test_grid_runs_every_combination(tmp_path, dogs_mini, mobilenet_weights):
    from imgtune.config import TuneOptions
    from imgtune.runs.tune import run_tuning_job

    space = {"train.lr": {"values": [0.001, 0.01]}, "train.batch_size": {"values": [32, 64]}}
    job = run_tuning_job(
        TuneOptions(base=base_config(dogs_mini, mobilenet_weights, epochs=1), space=space, strategy="grid"),
        workspace=tmp_path,
        progress=False,
    )
    combos = {
        (t["hyperparameters"]["train.lr"], t["hyperparameters"]["train.batch_size"]) for t in job.read()["trials"]
    }
    assert combos == {(0.001, 32), (0.001, 64), (0.01, 32), (0.01, 64)}


@pytest.mark.slow
@pytest.mark.ray
def test_a_crashing_trial_is_recorded_and_the_job_goes_on(tmp_path, dogs_mini, mobilenet_weights):
    from imgtune.config import TuneOptions
    from imgtune.runs.tune import run_tuning_job

    space = {"train.device": {"values": ["cpu", "cuda:7"]}, "train.lr": {"values": [0.003]}}  # no 8th GPU here
    job = run_tuning_job(
        TuneOptions(base=base_config(dogs_mini, mobilenet_weights, epochs=1), space=space, strategy="grid"),
        workspace=tmp_path,
        progress=False,
    )
    record = job.read()
    assert record["status"] == "completed"
    by_device = {t["hyperparameters"]["train.device"]: t for t in record["trials"]}
    assert by_device["cpu"]["status"] == "completed" and by_device["cpu"]["objective"] > 0.3
    crashed = by_device["cuda:7"]
    assert crashed["status"] == "errored" and crashed["objective"] is None
    assert 'File "' in crashed["error"] and "ConfigError: train.device is cuda" in crashed["error"]  # a traceback
    assert Job(job.path / crashed["job"]).read()["status"] == "failed"
    assert record["best"]["hyperparameters"]["train.device"] == "cpu"


@pytest.mark.slow
@pytest.mark.ray
def test_random_with_median_stopping_and_warm_start(tmp_path, dogs_mini, mobilenet_weights):
    from imgtune.config import TuneOptions
    from imgtune.runs.tune import run_tuning_job

    base = base_config(dogs_mini, mobilenet_weights, epochs=3)
    first = run_tuning_job(
        TuneOptions(base=base, space=DEFAULT_SPACE, strategy="random", max_trials=4, early_stopping="median"),
        workspace=tmp_path,
        progress=False,
    )
    trials = first.read()["trials"]
    assert {t["status"] for t in trials} <= {"completed", "early-stopped"}
    for t in trials:
        assert (t["status"] == "early-stopped") == (t["epochs"] < 3)
    second = run_tuning_job(
        TuneOptions(base=base, space=DEFAULT_SPACE, max_trials=2, warm_start=[first.name]),
        workspace=tmp_path,
        progress=False,
    )
    assert second.read()["warm_start_points"] == len(trials)
    assert len(second.read()["trials"]) == 2


@pytest.mark.slow
@pytest.mark.ray
def test_cli_tune_show_and_train_the_best(tmp_path, dogs_mini, mobilenet_weights, monkeypatch):
    # relative paths, as a user types them: trials run in Ray workers with another working directory
    monkeypatch.chdir(tmp_path)
    Path("dogs").symlink_to(dogs_mini)
    Path("backbone.pth").symlink_to(mobilenet_weights)
    common = ["--workspace", "runs"]
    result = runner.invoke(
        app,
        ["tune", "--data", "dogs", "--backbone", "mobilenet_v2", "--weights", "backbone.pth",
         "--epochs", "2", "--max-trials", "2", "--strategy", "random", "--name", "search", "--json", *common],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and len(summary["trials"]) == 2
    assert {t["status"] for t in summary["trials"]} == {"completed"}
    runs = tmp_path / "runs"
    report = (runs / "search" / "report.html").read_text()  # the tuning report, written at the end
    assert "Parallel coordinates" in report and "per epoch" in report and summary["trials"][0]["trial"] in report
    rendered = render_report(runs / "search" / "report.html", "tuning-report")  # in real Chromium
    assert_rendered_offline(rendered)
    assert rendered.figures == 4  # objective per trial, parallel coordinates, lr vs batch size, curves
    shown = json.loads(runner.invoke(app, ["tune", "show", "search", "--json", *common]).stdout)
    assert shown["best"] == summary["best"]
    best = json.loads(runner.invoke(app, ["tune", "best", "search", "--json", *common]).stdout)
    assert best["hyperparameters"].keys() == {"train.lr", "train.batch_size"}
    result = runner.invoke(app, ["tune", "best", "search", "--train", "--json", *common])
    assert result.exit_code == 0, result.output
    final = json.loads(result.stdout)
    record = Job.open(final["job"], runs).read()
    assert record["config"]["train"]["lr"] == best["hyperparameters"]["train.lr"]
    assert record["config"]["debugger"]["enabled"] and record["config"]["profiler"]["enabled"]
    assert final["test"]["samples"] == 100 and final["report"]  # the final model is tested, and reported
    assert not math.isnan(final["best"]["valid_accuracy"])
    assert Job.open("search", runs).read()["final_job"] == final["job"]
    bad = runner.invoke(app, ["tune", "--data", str(dogs_mini), "--strategy", "psychic", *common])
    assert bad.exit_code == 2 and "unknown strategy" in bad.output


def test_trials_say_when_a_cluster_node_lacks_the_shared_paths(tmp_path, dogs_mini):
    from imgtune.core.errors import JobError
    from imgtune.tuning.tuner import require_shared_paths, with_absolute_paths

    base = with_absolute_paths({"data": {"path": "s3://bucket/dogs"}, "model": {"weights": "w.pth"}})
    assert base["data"]["path"] == "s3://bucket/dogs" and base["model"]["weights"] == str(Path.cwd() / "w.pth")
    context = {"trials_dir": str(tmp_path), "cache": str(tmp_path / "not-mounted"), "features_shared": False}
    require_shared_paths({**context, "base": {"data": {"path": str(dogs_mini)}}})  # all there
    with pytest.raises(JobError, match="not-mounted not found") as error:
        require_shared_paths({**context, "features_shared": True, "base": base})
    assert "every node mounts" in error.value.hint


@pytest.mark.slow
@pytest.mark.ray
def test_trials_reuse_ray_workers_and_a_driver_killed_as_a_trial_starts_leaves_no_stray_trial(
    tmp_path, dogs_mini, mobilenet_weights
):
    """Trials on Ray Tune run one after another in the worker processes Ray reuses (with the debugger on, they do
    not train as one batch of heads). A trial waits until Ray has recorded it before it makes its training job, so a
    driver killed just as a trial started resumes that trial under its own name: every trial job in the tuning job
    is one of its trials. An in-process Ray starts quietly."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import psutil

    cmd = [sys.executable, "-m", "imgtune", "tune", "--data", str(dogs_mini), "--backbone", "mobilenet_v2",
           "--weights", str(mobilenet_weights), "--epochs", "2", "--max-trials", "5", "--max-parallel", "1",
           "--name", "reused", "--workspace", str(tmp_path), "--set", "data.num_workers=0",
           "--set", "debugger.enabled=true"]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}  # as a user starts it: Ray's default auth
    first_stderr = tmp_path / "first.err"
    with first_stderr.open("w") as stderr:
        driver = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=stderr, start_new_session=True)
    trials = tmp_path / "reused" / "trials"

    def statuses() -> dict[str, str]:
        found = {}
        for job_file in trials.glob("*/job.json"):
            with contextlib.suppress(ValueError):  # being written
                found[job_file.parent.name] = json.loads(job_file.read_text()).get("status")
        return found

    def finished() -> dict[str, str]:
        return {name: Job(trials / name).read()["finished"] for name, s in statuses().items() if s == "completed"}

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not ("completed" in statuses().values() and len(statuses()) >= 2):
        assert driver.poll() is None, first_stderr.read_text()[-3000:]
        time.sleep(0.05)
    before = finished()
    assert before and len(statuses()) > len(before), "no trial had started after a finished one"
    for pid in [driver.pid, *(p.pid for p in psutil.Process(driver.pid).children(recursive=True))]:
        with contextlib.suppress(ProcessLookupError):  # the driver and its local Ray, as if the machine went down
            os.kill(pid, signal.SIGKILL)
    driver.wait()

    resume = [sys.executable, "-m", "imgtune", "tune", "--resume", "reused", "--workspace", str(tmp_path), "--json"]
    resumed = subprocess.run(resume, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["status"] == "completed" and [t["status"] for t in summary["trials"]] == ["completed"] * 5
    assert sorted(p.name for p in trials.iterdir()) == sorted(t["trial"] for t in summary["trials"])  # none stray
    after = finished()
    assert all(after[name] == when for name, when in before.items())  # finished trials were not run again
    # Each trial job records the process that ran it: Ray reused its workers (one per driver here), not one a trial
    pids = {Job(trials / t["trial"]).read()["pid"] for t in summary["trials"]}
    assert len(pids) < len(summary["trials"])
    for stderr in (first_stderr.read_text(), resumed.stderr):
        assert "Token authentication" not in stderr and "RAY_AUTH_MODE" not in stderr
