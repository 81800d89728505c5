"""Chaos: a tuning job's driver SIGKILLed at 5 seeded random moments, each in another phase of the job (the data
check and feature cache, Ray starting, trials training, between trials, the end: a seeded random delay after the
event in the job's files that starts the phase, so that where the kills land does not depend on the machine's
speed), and resumed after each kill, always completes: the requested trials each finished exactly once (none lost,
none recorded twice, none trained again once its job completed, no point sampled twice), every file whole, no
process of a killed driver left behind. The driver is the CLI in a subprocess, as a user runs it; each kill takes
its whole process session (its process group and the Ray worker processes, which have groups of their own), as if
the machine had gone down."""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
from test_chaos import files_parse
from typer.testing import CliRunner

from imgtune.cli import app
from imgtune.storage.jobs import Job

MAX_TRIALS = 6
EPOCHS = 30  # per trial, early stopping off: a batch of trials trains long enough to be killed in it
SEED = 19
FINISHED_LINE = re.compile(r" trial (\S+) (?:finished|errored): ")


def tune_command(data: Path, weights: Path, name: str, *options: str) -> list[str]:
    return [
        sys.executable, "-m", "imgtune", "tune", "--data", str(data), "--backbone", "mobilenet_v2",
        "--weights", str(weights), "--name", name, *options,
    ]  # fmt: skip


# -- the job's state, as its files say it -------------------------------------------------------------------------


def read_json(path: Path) -> dict | None:
    with contextlib.suppress(FileNotFoundError, ValueError):  # (not there yet)
        return json.loads(path.read_text())
    return None


def log_lines(job: Path) -> list[str]:
    return (job / "logs.txt").read_text().splitlines() if (job / "logs.txt").exists() else []


def finished_in_log(job: Path) -> list[str]:
    """The trials the job's log says finished, one line each time it said so."""
    return [m.group(1) for line in log_lines(job) if (m := FINISHED_LINE.search(line))]


def trial_records(job: Path) -> dict[str, dict]:
    return {p.parent.name: r for p in (job / "trials").glob("*/job.json") if (r := read_json(p)) is not None}


def in_session(sid: int) -> list[psutil.Process]:
    """The live processes of session `sid` (a driver started with start_new_session, and all it started: Ray's
    workers have process groups of their own, not sessions); a killed process nobody reaped is dead."""
    found = []
    for process in psutil.process_iter():
        with contextlib.suppress(psutil.Error, OSError):
            if os.getsid(process.pid) == sid and process.status() != psutil.STATUS_ZOMBIE:
                found.append(process)
    return found


def kill_everything(driver: subprocess.Popen) -> None:
    """SIGKILL the driver's process group, then whatever else of its session is still alive (until none is)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(driver.pid, signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 30
    while (left := in_session(driver.pid)) and time.monotonic() < deadline:
        for process in left:
            with contextlib.suppress(psutil.Error):
                process.kill()
        time.sleep(0.1)
    assert not in_session(driver.pid), [p.cmdline() for p in in_session(driver.pid)]


# -- the moments: a phase of the job (an event in its files), then a seeded random delay -------------------------

Event = Callable[[Path, subprocess.Popen, int], bool]  # (job dir, driver, log lines before this driver) -> seen?


def driver_took_the_job(job: Path, driver: subprocess.Popen, _: int) -> bool:
    return (read_json(job / "job.json") or {}).get("pid") == driver.pid


def feature_cache_ready(job: Path, _: subprocess.Popen, before: int) -> bool:
    return any("feature cache ready" in line for line in log_lines(job)[before:])


def a_trial_trains(job: Path, driver: subprocess.Popen, _: int) -> bool:
    """A trial job running in a live process of this driver's session (not one a killed driver left running)."""
    for record in trial_records(job).values():
        pid = record.get("pid")
        if record.get("status") == "running" and isinstance(pid, int):
            with contextlib.suppress(OSError):
                if os.getsid(pid) == driver.pid:
                    return True
    return False


def a_trial_finished(job: Path, _: subprocess.Popen, before: int) -> bool:
    return any(FINISHED_LINE.search(line) for line in log_lines(job)[before:])


def every_trial_finished(job: Path, _: subprocess.Popen, __: int) -> bool:
    return len(set(finished_in_log(job))) >= MAX_TRIALS


# One kill per phase, in the order a job goes through them: (phase, event, the delay's bounds in seconds).
KILLS: list[tuple[str, Event, tuple[float, float]]] = [
    ("data check / feature cache", driver_took_the_job, (0.5, 4.0)),  # a cold feature cache takes ~25 s here
    ("Ray starting, the first batch", feature_cache_ready, (0.0, 8.0)),
    ("trials training", a_trial_trains, (0.0, 1.0)),
    ("between trials", a_trial_finished, (0.0, 0.3)),
    ("the end: results, report, Ray's shutdown", every_trial_finished, (0.0, 1.5)),
]


def wait_for(event: Event, job: Path, driver: subprocess.Popen, before: int, timeout: float = 240) -> bool:
    deadline = time.monotonic() + timeout
    while driver.poll() is None and time.monotonic() < deadline:
        if event(job, driver, before):
            return True
        time.sleep(0.02)
    return False


# -- the test -----------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def features_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A cache of this module's own: the first job's data check and feature cache are work its first kill lands in,
    not a hit in the session's cache; the second job finds them there (the first kill lands in Ray's start)."""
    return tmp_path_factory.mktemp("chaos-tuning-cache")


@pytest.mark.slow
@pytest.mark.ray
@pytest.mark.parametrize(
    ("case", "trials"),
    [
        ("batched", ()),  # the default: trials train as batches of heads in a long-lived Ray actor, Optuna's journal
        ("ray-tune", ("--set", "debugger.enabled=true")),  # each trial a Ray Tune trial; Ray's state in JOB/ray
    ],
)
def test_a_tuning_job_whose_driver_is_killed_at_random_moments_completes_with_every_trial_once(
    tmp_path, dogs_mini, mobilenet_weights, features_cache, case, trials
):
    """5 kills, one per phase, for each of the two ways trials run; then the job is resumed to its end."""
    name = f"chaos-{case}"
    runs = tmp_path / "runs"
    job = runs / name
    options = ("--workspace", str(runs), "--json")
    start = tune_command(
        dogs_mini, mobilenet_weights, name, "--epochs", str(EPOCHS), "--max-trials", str(MAX_TRIALS),
        "--max-parallel", "1", "--heads-per-worker", "2", "--set", "data.image_size=32",
        "--set", "data.num_workers=0", "--set", "train.early_stopping.enabled=false", *trials, *options,
    )  # fmt: skip
    resume = [sys.executable, "-m", "imgtune", "tune", "--resume", name, *options]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "IMGTUNE_CACHE": str(features_cache)}
    moments = random.Random(f"{SEED} {case}")
    log_path = tmp_path / "drivers.log"
    sessions: list[int] = []
    finished_at: dict[str, str] = {}  # a completed trial job's end: never again (it is not trained again)
    landed: list[tuple[str, float, str]] = []  # (phase, delay, the tuning job's status after the kill)
    took = 0  # resumed drivers that took the job (so its log says "resuming")

    def check_files_after_a_kill() -> None:
        files_parse(job, ignore=("ray",))  # (JOB/ray: Ray's own experiment state, pickles)
        journal = job / "optuna.journal"
        lines = journal.read_text().splitlines() if journal.exists() else []
        for line in lines[:-1]:  # a kill may cut its last line short (skipped on resume), never one before
            json.loads(line)
        for trial, record in trial_records(job).items():
            epochs = [m["epoch"] for m in Job(job / "trials" / trial).read_metrics()]
            assert epochs == list(range(1, len(epochs) + 1)), (trial, epochs)  # each epoch once, in order
            if record.get("status") == "completed":
                assert finished_at.setdefault(trial, record["finished"]) == record["finished"], trial

    def driver_log() -> str:
        return log_path.read_text()[-4000:]

    try:
        with log_path.open("ab") as log:
            for phase, event, (low, high) in KILLS:
                resuming = (job / "job.json").exists()
                before = len(log_lines(job))
                command = resume if resuming else start
                driver = subprocess.Popen(command, stdout=log, stderr=log, env=env, start_new_session=True)
                sessions.append(driver.pid)
                delay = moments.uniform(low, high)
                if wait_for(event, job, driver, before):
                    deadline = time.monotonic() + delay
                    while driver.poll() is None and time.monotonic() < deadline:
                        time.sleep(0.01)
                if resuming and driver_took_the_job(job, driver, before):
                    took += 1
                running = driver.poll() is None
                kill_everything(driver)
                assert running or driver.returncode == 0, driver_log()
                record = read_json(job / "job.json") or {}
                landed.append((phase, round(delay, 2), Job(job).status() if record else "no job yet"))
                if record:
                    check_files_after_a_kill()
                if record.get("status") == "completed":
                    break
        if (read_json(job / "job.json") or {}).get("status") != "completed":
            with log_path.open("ab") as log:
                driver = subprocess.Popen(resume, stdout=log, stderr=log, env=env, start_new_session=True)
                sessions.append(driver.pid)
                assert driver.wait(timeout=600) == 0, driver_log()
                took += 1
    finally:
        for sid in sessions:  # a failed test leaves nothing running either
            for process in in_session(sid):
                with contextlib.suppress(psutil.Error):
                    process.kill()

    # Every kill landed in its phase of a running job; the job went on from there each time.
    mid_job = [kill for kill in landed if kill[2] == "interrupted"]
    assert len(mid_job) >= 4, landed  # (the last kill may land after the job completed: the end of the end)
    assert sum("resuming" in line for line in log_lines(job)) >= took >= 4, (took, landed)
    # The requested trials, each finished once: in the record, the trials listing, the study and the trial jobs.
    record = Job(job).read()
    assert record["status"] == "completed" and record["trials_count"] == MAX_TRIALS, landed
    # resumed the way it started every time, also when killed before its trials started
    assert bool(record.get("trials_batched")) == (case == "batched"), ("trials not batched after a resume", landed)
    listed = CliRunner().invoke(app, ["tune", "show", name, "--all", "--json", "--workspace", str(runs)])
    assert listed.exit_code == 0, listed.output
    for trials_listed in (record["trials"], json.loads(listed.stdout)["trials"]):
        names = [t["trial"] for t in trials_listed]
        assert len(names) == len(set(names)) == MAX_TRIALS, (names, landed)
        assert {(t["status"], t["epochs"]) for t in trials_listed} == {("completed", EPOCHS)}, trials_listed
    assert sorted(p.name for p in (job / "trials").iterdir()) == sorted(names)  # no stray trial job
    points = {json.dumps(t["hyperparameters"], sort_keys=True) for t in record["trials"]}
    assert len(points) == MAX_TRIALS, points  # a resumed search samples new points, not its first trials' again
    for trial in record["trials"]:
        trial_job = Job(job / trial["job"])
        assert trial_job.read()["status"] == "completed"
        metrics = trial_job.read_metrics()
        assert [m["epoch"] for m in metrics] == list(range(1, EPOCHS + 1)), trial["trial"]
        assert trial["objective"] == max(m["valid_accuracy"] for m in metrics)
        assert finished_at.get(trial["trial"], trial_job.read()["finished"]) == trial_job.read()["finished"]
    said = finished_in_log(job)  # the log tells of every trial's end, and of no other trial
    assert set(said) == set(names), said
    if case == "batched":
        import optuna

        from imgtune.tuning.batched import STUDY_FILE, STUDY_NAME, JournalFile

        storage = optuna.storages.JournalStorage(JournalFile(job / STUDY_FILE))
        study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
        states = [t.state for t in study.trials]
        assert states == [optuna.trial.TrialState.COMPLETE] * MAX_TRIALS, states
        for line in (job / STUDY_FILE).read_text().splitlines():  # whole, every line: none cut and appended to
            json.loads(line)
    files_parse(job, ignore=("ray",))
    assert not [p for sid in sessions for p in in_session(sid)], "processes of the drivers are still running"
    # A job is completed once its end (report, pushes, trackers) is done, or it resumes to do it again.
    assert (job / "report.html").is_file(), f"completed without its report: its end was cut short {landed}"
