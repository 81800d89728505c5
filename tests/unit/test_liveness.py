"""Is a job recorded as running still running? On another machine, its heartbeat says (imgtune.runs.lifecycle);
on this one, its pid and the pid's start time (imgtune.storage.jobs.Job.status)."""

from __future__ import annotations

import json
import re
import socket
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from imgtune.core.errors import JobError
from imgtune.runs.lifecycle import Heartbeat, check_resumable, heartbeat_limit
from imgtune.storage.jobs import Job, process_started, workspace_dir


def running_job(job: Job, **fields) -> Job:
    job.path.mkdir(parents=True, exist_ok=True)
    job.write({"name": job.name, "kind": "training", "status": "running", **fields})
    return job


def ago(seconds: float) -> str:
    return (datetime.now(UTC) - timedelta(seconds=seconds)).isoformat(timespec="seconds")


def test_a_job_running_elsewhere_is_dead_once_its_heartbeat_is_older_than_the_limit(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("IMGTUNE_PUSH_INTERVAL", "30")
    assert heartbeat_limit() == 120  # 3 push intervals (90 s), at least 2 minutes
    monkeypatch.setenv("IMGTUNE_PUSH_INTERVAL", "60")
    assert heartbeat_limit() == 180
    job = Job(workspace_dir("s3://runs-bucket/team") / "elsewhere")  # a job of a bucket, in this machine's mirror
    running_job(job, host="another-machine", pid=4242, heartbeat=ago(30))
    with pytest.raises(JobError, match=r"last heartbeat 3\d s ago") as alive:
        check_resumable(job)
    assert "taken as dead 180 s after its last heartbeat" in alive.value.hint
    check_resumable(job, force=True)  # the user knows better
    running_job(job, host="another-machine", pid=4242, heartbeat=ago(200))
    check_resumable(job)  # dead: no --force needed
    assert re.search(
        r"heartbeat from another-machine is 20\d s old \(over 180 s\), so it died", job.log_file.read_text()
    )
    running_job(job, host="another-machine", pid=4242)  # an older imgtune's job: no heartbeat, --force decides
    with pytest.raises(JobError, match="no heartbeat recorded"):
        check_resumable(job)


def test_a_pid_alive_under_another_start_time_is_not_the_job(tmp_path):
    other = subprocess.Popen(["sleep", "60"])
    try:
        started = process_started(other.pid)
        assert started is not None and abs(started - time.time()) < 60
        job = running_job(Job(tmp_path / "here"), host=socket.gethostname(), pid=other.pid, pid_started=started)
        assert job.status() == "running"  # the recorded process itself
        running_job(job, host=socket.gethostname(), pid=other.pid, pid_started=started - 3600)
        assert job.status() == "interrupted"  # the pid was reused by another program
    finally:
        other.kill()
        other.wait()
    assert job.status() == "interrupted"


def test_concurrent_updates_of_job_json_lose_nothing(tmp_path):
    """Threads (the heartbeat beside the training loop) each updating their own field of job.json."""
    job = running_job(Job(tmp_path / "busy"))
    job.durable = False

    def writer(field: str) -> None:
        for i in range(50):
            job.update(**{field: {"i": i}})

    threads = [threading.Thread(target=writer, args=(f,)) for f in ("dataset", "weights", "feature_extraction")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    record = json.loads(job.job_file.read_text())
    assert record["dataset"] == record["weights"] == record["feature_extraction"] == {"i": 49}


@pytest.mark.slow
def test_the_heartbeat_writes_the_time_into_job_json_until_stopped(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGTUNE_PUSH_INTERVAL", "0")  # beats every HEARTBEAT_MIN_INTERVAL (5 s)
    job = running_job(Job(tmp_path / "beating"), heartbeat=ago(3600))
    heartbeat = Heartbeat(job).start()
    time.sleep(6)
    heartbeat.stop()
    beat = json.loads(job.job_file.read_text())["heartbeat"]
    assert (datetime.now(UTC) - datetime.fromisoformat(beat)).total_seconds() < 10
    time.sleep(5.5)
    assert json.loads(job.job_file.read_text())["heartbeat"] == beat  # stopped: no more beats
