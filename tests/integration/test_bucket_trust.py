"""The bucket is a trust boundary (imgtune.runs.trust): what someone with write access to an s3:// workspace puts
into a job's job.json does not run code on another machine. The bucket is moto's server on 127.0.0.1; "another
machine" is another IMGTUNE_CACHE (a mirror of its own), as in tests/e2e/test_workspace_s3.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imgtune.cli import app
from imgtune.runs.trust import trusted_config, trusted_ray_address
from imgtune.storage.jobs import Job, workspace_dir

BUCKET = "trust-runs"
WORKSPACE = f"s3://{BUCKET}/team"
runner = CliRunner()


def machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> Path:
    """Commands from here on run as on machine `name`: its own cache, so its own mirror of the bucket."""
    cache = tmp_path / name
    monkeypatch.setenv("IMGTUNE_CACHE", str(cache))
    return cache


def rule_file_source(marker: Path) -> str:
    """A debugger rule file that, once imported, has created `marker`: what running it would leave behind."""
    return (
        "from pathlib import Path\n"
        f"Path({str(marker)!r}).touch()\n"
        "from imgtune.debugger.rules import Rule\n\n\n"
        "class Evil(Rule):\n"
        "    def invoke_at_step(self, trial, step):\n"
        "        return None\n"
    )


@pytest.mark.slow
def test_a_tampered_job_json_runs_no_rule_file_on_another_machine(
    s3_client: Any, tmp_path, dogs_mini, mobilenet_weights, monkeypatch
):
    s3_client.create_bucket(Bucket=BUCKET)
    machine(monkeypatch, tmp_path, "machine-a")
    train = [
        "train", "--data", str(dogs_mini), "--backbone", "mobilenet_v2", "--weights", str(mobilenet_weights),
        "--epochs", "2", "--image-size", "64", "--name", "victim", "--workspace", WORKSPACE, "--json",
    ]  # fmt: skip
    result = runner.invoke(app, train)
    assert result.exit_code == 0, result.output

    # Someone with write access to the bucket adds a rule file to the job and points its job.json at it (at
    # the path machine B's mirror will give it), and marks the job failed so that it can be resumed.
    machine(monkeypatch, tmp_path, "machine-b")
    mirrored = workspace_dir(WORKSPACE) / "victim" / "evil.py"
    marker = tmp_path / "code-ran"
    record = json.loads(s3_client.get_object(Bucket=BUCKET, Key="team/victim/job.json")["Body"].read())
    record["config"]["debugger"].update(
        rule_files=[str(mirrored)], rules=[*record["config"]["debugger"]["rules"], "Evil"]
    )
    record["status"] = "failed"
    s3_client.put_object(Bucket=BUCKET, Key="team/victim/evil.py", Body=rule_file_source(marker).encode())
    s3_client.put_object(Bucket=BUCKET, Key="team/victim/job.json", Body=json.dumps(record).encode())

    for command in (["jobs", "show", "victim"], ["debug", "rules", "victim"], ["report", "victim"]):
        result = runner.invoke(app, [*command, "--workspace", WORKSPACE])
        assert result.exit_code == 0, (command, result.output)
        assert not marker.exists(), command
    assert mirrored.is_file()  # the file was pulled with the job: only never imported
    log = (mirrored.parent / "logs.txt").read_text()
    assert f"debugger rule file(s) {mirrored}" in log and "not used here" in log  # the user is told

    resumed = runner.invoke(app, ["train", "--resume", "victim", "--workspace", WORKSPACE, "--json"])
    assert resumed.exit_code == 0, resumed.output
    assert json.loads(resumed.stdout)["status"] == "completed" and not marker.exists()

    # The same file, named by the user on the command line, runs: the refusal above is what kept it out.
    trusted = runner.invoke(app, ["debug", "rules", "victim", "--workspace", WORKSPACE, "--rule-file", str(mirrored)])
    assert trusted.exit_code == 0, trusted.output
    assert marker.exists()


def test_a_job_from_a_bucket_chooses_no_ray_cluster_and_no_mlflow_server(tmp_path, monkeypatch):
    monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path / "cache"))
    mirrored = Job(workspace_dir(WORKSPACE) / "tune-job")  # a job of an s3:// workspace, in its local mirror
    mirrored.path.mkdir(parents=True)
    local = Job(tmp_path / "runs" / "tune-job")
    local.path.mkdir(parents=True)
    assert mirrored.remote == f"{WORKSPACE}/tune-job" and local.remote is None
    assert trusted_ray_address(mirrored, "10.0.0.9:6379", None) is None  # refused: an in-process Ray
    assert "the Ray cluster 10.0.0.9:6379" in (mirrored.path / "logs.txt").read_text()
    assert trusted_ray_address(mirrored, "10.0.0.9:6379", "127.0.0.1:6380") == "127.0.0.1:6380"
    assert trusted_ray_address(local, "10.0.0.9:6379", None) == "10.0.0.9:6379"  # a local job's own stands
    assert trusted_ray_address(local, "10.0.0.9:6379", "127.0.0.1:6380") == "127.0.0.1:6380"
    # nor does it choose where this machine sends its MLflow credentials, or which registered model it moves
    config = {"tracking": {"mlflow": True, "mlflow_uri": "http://10.0.0.9:5000", "registered_model": "prod"}}
    refused = {"mlflow": True, "mlflow_uri": None, "registered_model": None}
    assert trusted_config(mirrored, config)["tracking"] == refused
    assert "MLflow settings (mlflow_uri http://10.0.0.9:5000" in (mirrored.path / "logs.txt").read_text()
    assert trusted_config(local, config) == config
    # a rule file its job.json names runs only when the resuming user names it too (train --resume --rule-file)
    debugging = {"debugger": {"rule_files": [str(tmp_path / "theirs.py")], "rules": []}}
    assert trusted_config(mirrored, debugging)["debugger"]["rule_files"] == []
    given = [str(tmp_path / "theirs.py")]
    assert trusted_config(mirrored, debugging, given)["debugger"]["rule_files"] == given


CLAIM = """
import json, os, sys, time
from imgtune.core.errors import JobError
from imgtune.storage.jobs import Job

workspace, name, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
time.sleep(max(0.0, start - time.time()))  # both processes go at the same moment
try:
    Job.create(workspace, name, record={"kind": "training", "status": "created"})
    print(json.dumps({"created": True}))
except JobError as exc:
    print(json.dumps({"created": False, "message": exc.message}))
"""


@pytest.mark.slow
def test_two_machines_claiming_one_job_name_at_once_exactly_one_gets_it(s3_client: Any, tmp_path):
    """Two processes, each with a cache (a mirror) of its own, create the same job name in the bucket at the
    same moment, five names in a row: exactly one of each pair succeeds, the other is told the name is taken.
    (A look in the bucket, then a local directory, would let both through: the claim is a conditional write.)"""
    import os
    import subprocess
    import sys
    import time

    s3_client.create_bucket(Bucket="claims")
    workspace = "s3://claims/team"
    for round_number in range(5):
        name = f"same-{round_number}"
        start = time.time() + 3.0  # after both interpreters have imported imgtune
        processes = [
            subprocess.Popen(
                [sys.executable, "-c", CLAIM, workspace, name, str(start)],
                env={**os.environ, "IMGTUNE_CACHE": str(tmp_path / f"machine-{side}")},
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )  # fmt: skip
            for side in "ab"
        ]
        answers = []
        for process in processes:
            out, err = process.communicate(timeout=120)
            assert process.returncode == 0, err
            answers.append(json.loads(out))
        assert sorted(a["created"] for a in answers) == [False, True], (name, answers)
        refused = next(a for a in answers if not a["created"])
        assert f"a job named '{name}' already exists in {workspace}" in refused["message"]
        claimed = json.loads(s3_client.get_object(Bucket="claims", Key=f"team/{name}/job.json")["Body"].read())
        assert claimed["name"] == name and claimed["kind"] == "training"


def test_one_writer_per_job_a_machine_taken_over_sends_nothing_more_and_others_add_beside(
    s3_client: Any, tmp_path, monkeypatch
):
    """job.json in the bucket says which machine writes the job: conditional writes make exactly one of two
    machines resuming one state the writer; the machine taken over sends nothing more, and its copy gives way
    to the bucket's. A later command (an evaluation) adds an object of its own beside the job's files, which
    the job's next run folds into job.json."""
    from imgtune.runs.lifecycle import JobLifecycle
    from imgtune.storage.jobs import JobTakenOver
    from imgtune.storage.record import JobRecord

    s3_client.create_bucket(Bucket="writers")
    workspace = "s3://writers/team"
    monkeypatch.setenv("IMGTUNE_PUSH_INTERVAL", "0")

    def in_bucket() -> dict[str, Any]:
        return json.loads(s3_client.get_object(Bucket="writers", Key="team/shared/job.json")["Body"].read())

    def keys() -> set[str]:
        listed = s3_client.list_objects_v2(Bucket="writers", Prefix="team/shared/").get("Contents", [])
        return {o["Key"].removeprefix("team/shared/") for o in listed}

    machine(monkeypatch, tmp_path, "machine-a")
    life_a = JobLifecycle.create(workspace, JobRecord(kind="training", name="shared", config={}), prefix="job")
    life_a.begin(resumed_from_epoch=0)
    assert in_bucket()["status"] == "running"

    # Machine d evaluates the job meanwhile: an object of its own, job.json untouched.
    machine(monkeypatch, tmp_path, "machine-d")
    Job.open("shared", workspace, shallow=True).amend(appended={"evaluations": [{"split": "valid"}]})
    assert in_bucket()["resumed_from_epoch"] == 0 and any(k.startswith("amendments/") for k in keys())
    machine(monkeypatch, tmp_path, "machine-a")  # (a job's bucket is known by the cache its mirror is in)
    life_a.job.update(epochs_run=1)  # the writer goes on, undisturbed by it
    assert in_bucket()["epochs_run"] == 1

    # Machines b and c both take machine a for dead and resume the same state at once: one of them wins.
    machine(monkeypatch, tmp_path, "machine-b")
    life_b = JobLifecycle.resume("shared", workspace, "training", force=True)
    machine(monkeypatch, tmp_path, "machine-c")
    life_c = JobLifecycle.resume("shared", workspace, "training", force=True)
    machine(monkeypatch, tmp_path, "machine-b")
    life_b.begin(resumed_from_epoch=1)
    assert in_bucket()["resumed_from_epoch"] == 1
    assert in_bucket()["evaluations"] == [{"split": "valid"}]  # folded in by the job's new run ...
    assert not any(k.startswith("amendments/") for k in keys())  # ... which removed the amendment's object
    machine(monkeypatch, tmp_path, "machine-c")
    (life_c.job.path / "metrics.jsonl").write_text('{"epoch": 2}\n')
    with pytest.raises(JobTakenOver, match="no longer this machine's to write"):
        life_c.begin(resumed_from_epoch=2)
    assert in_bucket()["resumed_from_epoch"] == 1 and "metrics.jsonl" not in keys()  # nothing of c's arrived
    life_c.fail(RuntimeError("lost the race"), "")

    # Machine a, taken over, sends nothing more; its end is recorded on machine a only.
    machine(monkeypatch, tmp_path, "machine-a")
    (life_a.job.path / "metrics.jsonl").write_text('{"epoch": 1}\n')
    with pytest.raises(JobTakenOver):
        life_a.job.update(epochs_run=2)
    life_a.fail(RuntimeError("the network came back"), "")  # no second error: the job is b's now
    assert in_bucket()["resumed_from_epoch"] == 1 and in_bucket()["status"] == "running"
    assert "metrics.jsonl" not in keys()
    assert "no longer this machine's to write" in (life_a.job.path / "logs.txt").read_text()

    # Looked at again on machine a, the job is the bucket's: a's unsent work gives way.
    seen = Job.open("shared", workspace)
    assert seen.record().resumed_from_epoch == 1 and not seen.metrics_file.exists()

    machine(monkeypatch, tmp_path, "machine-b")
    life_b.complete({"epochs_run": 2})
    assert in_bucket()["status"] == "completed" and in_bucket()["evaluations"] == [{"split": "valid"}]

    # Machine d still had its amendment's file: its object is gone (folded in), so it goes there too, and the
    # evaluation counts once.
    machine(monkeypatch, tmp_path, "machine-d")
    seen_d = Job.open("shared", workspace, shallow=True)
    assert seen_d.record().evaluations == [{"split": "valid"}] and not list(seen_d.path.glob("amendments/*"))


def test_a_pull_on_the_machine_running_a_job_leaves_it_alone_and_its_runner_still_learns_it_was_taken_over(
    s3_client: Any, tmp_path, monkeypatch
):
    from imgtune.runs.lifecycle import JobLifecycle
    from imgtune.storage.jobs import JobTakenOver
    from imgtune.storage.record import JobRecord

    s3_client.create_bucket(Bucket="runner")
    workspace = "s3://runner/team"
    monkeypatch.setenv("IMGTUNE_PUSH_INTERVAL", "0")

    def in_bucket() -> dict[str, Any]:
        return json.loads(s3_client.get_object(Bucket="runner", Key="team/busy/job.json")["Body"].read())

    machine(monkeypatch, tmp_path, "machine-a")
    life_a = JobLifecycle.create(workspace, JobRecord(kind="training", name="busy", config={}), prefix="job")
    life_a.begin(resumed_from_epoch=0)
    (life_a.job.path / "metrics.jsonl").write_text('{"epoch": 1}\n')  # work not sent yet

    machine(monkeypatch, tmp_path, "machine-b")  # takes it over
    life_b = JobLifecycle.resume("busy", workspace, "training", force=True)
    life_b.begin(resumed_from_epoch=7)

    machine(monkeypatch, tmp_path, "machine-a")
    seen = Job.open("busy", workspace)  # e.g. `imgtune jobs show` on the machine where the runner still runs
    assert seen.path == life_a.job.path and (seen.path / "metrics.jsonl").is_file()  # its work left alone
    assert seen.record().resumed_from_epoch == 0  # the runner's own copy, not the bucket's
    with pytest.raises(JobTakenOver):
        life_a.job.update(epochs_run=1)  # ... and its runner still finds out at its next push
    assert in_bucket()["resumed_from_epoch"] == 7
    life_a.fail(RuntimeError("taken over"), "")
    machine(monkeypatch, tmp_path, "machine-b")
    life_b.complete({})
    assert in_bucket()["status"] == "completed"
