"""Job directories: status of a job whose process died, names, listing."""

from __future__ import annotations

import subprocess
import sys
import time

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
