"""Job directories: status of a job whose process died, names, listing."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from imgtune.core.errors import JobError
from imgtune.storage.jobs import Job, _pid_alive, list_jobs


def test_a_dead_unreaped_process_counts_as_dead():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while _pid_alive(child.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # the child exits but is not reaped (a zombie) until wait()
    assert not _pid_alive(child.pid)
    child.wait()


def test_running_job_of_a_dead_process_is_interrupted(tmp_path):
    job = Job.create(tmp_path, "j")
    job.write({"name": "j"})
    job.mark_running()
    assert job.status() == "running"  # this test's own process is alive
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    job.update(pid=child.pid)
    assert job.status() == "interrupted"
    assert [j.name for j in list_jobs(tmp_path)] == ["j"]


def test_a_create_killed_halfway_blocks_no_name_and_lists_no_job(tmp_path):
    (tmp_path / "left-empty").mkdir()  # an older create killed between its mkdir and its job.json
    staged = tmp_path / ".half-made.creating-1-1"  # a create killed before its rename into place
    staged.mkdir()
    (staged / "job.json").write_text('{"name": "half-made"}')
    job = Job.create(tmp_path, "left-empty", record={"kind": "training"})
    assert job.read()["kind"] == "training" and job.read()["name"] == "left-empty"
    assert [j.name for j in list_jobs(tmp_path)] == ["left-empty"]
    assert Job.create(tmp_path, "half-made").read()["name"] == "half-made"
    (tmp_path / "not-empty").mkdir()
    (tmp_path / "not-empty" / "notes.txt").write_text("someone's files")
    with pytest.raises(JobError, match="already exists"):
        Job.create(tmp_path, "not-empty")
    assert (tmp_path / "not-empty" / "notes.txt").exists()
    assert not [p for p in tmp_path.iterdir() if ".creating-" in p.name and p != staged]  # nothing left behind
