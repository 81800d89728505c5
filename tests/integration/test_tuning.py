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
            with contextlib.suppress(ValueError, FileNotFoundError):  # being written, or a new trial being renamed
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


@pytest.mark.slow
@pytest.mark.ray
def test_a_tuning_job_resumed_without_its_ray_state_is_rebuilt_from_its_trial_jobs(tmp_path):
    """Resumed where Ray's state is not (another machine: it never crosses a bucket), a tuning job's Tuner starts
    from its trial jobs' own records: finished trials are not run again and count toward the trials, unfinished
    ones run first under their own names (continuing their jobs), the results list them all, and the log says so.
    Ray runs a stand-in trainable here that records what it was given, to see what the rebuilt state runs."""
    from imgtune.config import TuneOptions
    from imgtune.storage.record import JobRecord
    from imgtune.tuning import connect
    from imgtune.tuning.tuner import build_tuner, fit

    space = {"train.lr": {"values": [0.001, 0.01]}, "train.batch_size": {"values": [32, 64]}}
    job = Job(tmp_path / "tune")
    job.path.mkdir()

    def trial_job(name: str, lr: float, batch_size: int, status: str, finished: str | None, accuracies: list[float]):
        trial = Job(job.path / "trials" / name)
        trial.path.mkdir(parents=True)
        config = {"train": {"lr": lr, "batch_size": batch_size, "epochs": 2}}
        trial.write(JobRecord(name=name, status=status, finished=finished, config=config))
        for epoch, accuracy in enumerate(accuracies, 1):
            trial.append_metrics({"epoch": epoch, "valid_accuracy": accuracy})

    trial_job("trial-a", 0.001, 64, "completed", "2026-01-01T00:00:02", [0.5, 0.7])
    trial_job("trial-b", 0.01, 32, "completed", "2026-01-01T00:00:01", [0.6, 0.6])
    trial_job("trial-c", 0.01, 64, "running", None, [0.4])  # its driver died mid-trial

    def stand_in(config: dict, context: dict) -> None:
        from ray import tune

        name = tune.get_context().get_trial_name()
        (Path(context["ran"]) / name).write_text(json.dumps(config))
        tune.report({"valid_accuracy": 0.5, "epoch": 1, "job": name})

    def resume(options: TuneOptions, ran: Path) -> tuple[dict, dict[str, dict]]:
        ran.mkdir()
        tuner = build_tuner(job, stand_in, {"ran": str(ran)}, options, parse_space(space), [], resuming=True)
        results = fit(tuner, job, options, parse_space(space), progress=False, on_trial=None)
        return results, {p.name: json.loads(p.read_text()) for p in ran.iterdir()}

    connect(None)
    # grid: the two finished combinations are left out; trial-c continues with its own; one combination is new
    grid = TuneOptions(base={}, space=space, strategy="grid")
    results, ran = resume(grid, tmp_path / "ran-grid")
    assert ran.pop("trial-c") == {"train.lr": 0.01, "train.batch_size": 64}
    assert list(ran.values()) == [{"train.lr": 0.001, "train.batch_size": 32}]
    assert results["trials_count"] == 4 and {t["trial"] for t in results["trials"]} == {"trial-a", "trial-b",
                                                                                        "trial-c", *ran}  # fmt: skip
    assert results["best"]["trial"] == "trial-a" and results["best"]["objective"] == 0.7
    assert results["best"]["hyperparameters"] == {"train.lr": 0.001, "train.batch_size": 64}
    log = job.log_file.read_text()
    assert "Ray state rebuilt from 2 finished trial(s) (no Ray state was found in" in log
    assert "1 unfinished trial job(s) continue" in log and "2 finished combination(s) are left out, 2 remain" in log

    # Restored on this machine, the new state knows every trial job: nothing is rebuilt, nothing runs again ...
    assert build_tuner(job, stand_in, {}, grid, parse_space(space), [], resuming=True) is not None
    assert job.log_file.read_text() == log
    # ... unless a trial job it does not know came in since (run on another machine after this one stopped).
    trial_job("trial-d", 0.01, 32, "failed", "2026-01-01T00:00:03", [])
    bayesian = TuneOptions(base={}, space=space, max_trials=4, max_parallel=1)
    results, ran = resume(bayesian, tmp_path / "ran-bayesian")
    assert "does not know 1 trial job(s) run since elsewhere" in job.log_file.read_text()
    assert set(ran) == {"trial-c"}  # 3 finished (one errored) of 4 trials: only the unfinished one runs
    assert "Ray state rebuilt from 3 finished trial(s)" in job.log_file.read_text()
    by_name = {t["trial"]: t for t in results["trials"]}
    assert by_name.keys() == {"trial-a", "trial-b", "trial-c", "trial-d"} and by_name["trial-d"]["status"] == "errored"

    # With every trial finished, there is nothing left to run: the results are the trial jobs'.
    import shutil

    shutil.rmtree(job.path / "ray")
    Job(job.path / "trials" / "trial-c").update(status="completed", finished="2026-01-01T00:00:04")
    done = TuneOptions(base={}, space=space, max_trials=4, strategy="random")
    assert build_tuner(job, stand_in, {}, done, parse_space(space), [], resuming=True) is None
    results = fit(None, job, done, parse_space(space), progress=False, on_trial=None)
    assert [t["trial"] for t in results["trials"]] == ["trial-a", "trial-b", "trial-c", "trial-d"]
