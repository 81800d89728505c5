"""Workspaces in a bucket (`--workspace s3://...`) against a real S3 API: moto's server mode on 127.0.0.1.

A job runs in a local mirror and is pushed to the bucket; "another machine" is a process with another
IMGTUNE_CACHE (so no mirror of its own) that lists, shows, evaluates, serves and resumes the job from the
bucket alone.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from cli_helpers import SLOW_IMAGE_TRAINING, resume_command, train_command
from imgtune.cli import app
from imgtune.storage.jobs import MIRRORS_DIR, workspace_dir

BUCKET = "imgtune-runs"
WORKSPACE = f"s3://{BUCKET}/team"
runner = CliRunner()


@pytest.fixture(scope="module")
def bucket(s3_client: Any) -> Any:
    s3_client.create_bucket(Bucket=BUCKET)
    return s3_client


def objects(s3: Any, prefix: str) -> dict[str, bytes]:
    """Every object under `prefix` in the bucket, by key relative to it."""
    keys = [o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
            for o in page.get("Contents", [])]  # fmt: skip
    return {key[len(prefix) :]: s3.get_object(Bucket=BUCKET, Key=key)["Body"].read() for key in keys}


def as_host(hostname: str, command: list[str]) -> list[str]:
    """`command` in a UTS namespace of its own whose hostname is `hostname` (needs root, as the suite does):
    a job it runs is recorded as running on that machine."""
    return ["unshare", "--uts", "sh", "-c", f'hostname {hostname} && exec "$@"', "sh", *command]


def on_another_machine(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, name: str) -> Path:
    """A fresh IMGTUNE_CACHE: no mirror of any job, nothing but the bucket."""
    cache = tmp_path / name
    monkeypatch.setenv("IMGTUNE_CACHE", str(cache))
    return cache


@pytest.mark.slow
def test_a_job_is_kept_in_the_bucket_and_used_from_another_machine(
    bucket, tmp_path, dogs_mini, mobilenet_weights, monkeypatch
):
    on_another_machine(monkeypatch, tmp_path, "machine-a")
    result = runner.invoke(
        app,
        ["train", "--data", str(dogs_mini), "--backbone", "mobilenet_v2", "--weights", str(mobilenet_weights),
         "--epochs", "3", "--image-size", "96", "--name", "shared", "--workspace", WORKSPACE, "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["remote"] == f"{WORKSPACE}/shared" and summary["status"] == "completed"
    local = Path(summary["path"])
    assert local == workspace_dir(WORKSPACE) / "shared"

    # The bucket holds the whole job, byte for byte as the machine that ran it has it.
    stored = objects(bucket, "team/shared/")
    local_files = {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*")
                   if p.is_file() and not p.name.startswith(".imgtune-")}  # fmt: skip
    assert stored == local_files
    assert {"job.json", "metrics.jsonl", "model/model.safetensors", "model/manifest.json", "report.html",
            "checkpoints/last.pt", "debugger/rules.json", "profiler/rules.json"} <= stored.keys()  # fmt: skip
    assert json.loads(stored["job.json"])["status"] == "completed"
    photo = next((dogs_mini / "test" / "003.beagle").glob("*.jpg"))
    predict = ["predict", "--job", "shared", "--workspace", WORKSPACE, str(photo), "--json"]
    here = json.loads(runner.invoke(app, predict).stdout)

    # Another machine lists it, evaluates it (the result reaches the bucket) and classifies a photo with it.
    on_another_machine(monkeypatch, tmp_path, "machine-b")
    listed = json.loads(runner.invoke(app, ["jobs", "--workspace", WORKSPACE, "--json"]).stdout)
    assert [(j["name"], j["status"], j["remote"]) for j in listed] == [("shared", "completed", f"{WORKSPACE}/shared")]
    evaluated = runner.invoke(
        app, ["evaluate", "shared", "--data", str(dogs_mini), "--split", "valid", "--workspace", WORKSPACE, "--json"]
    )
    assert evaluated.exit_code == 0, evaluated.output
    # ... as an object of its own: job.json is the job's runner's only
    stored_now = objects(bucket, "team/shared/")
    assert stored_now["job.json"] == stored["job.json"]
    amendments = [json.loads(data) for key, data in stored_now.items() if key.startswith("amendments/")]
    assert [e["split"] for a in amendments for e in a["append"]["evaluations"]] == ["valid"]
    on_another_machine(monkeypatch, tmp_path, "machine-c")
    shown = json.loads(runner.invoke(app, ["jobs", "show", "shared", "--workspace", WORKSPACE, "--json"]).stdout)
    assert [e["split"] for e in shown["evaluations"]] == ["valid"]
    predicted = runner.invoke(app, predict)
    assert predicted.exit_code == 0, predicted.output
    there = json.loads(predicted.stdout)
    # (each machine times the inference paths itself and may pick another: equal up to float error)
    assert [c["id"] for c in there[0]["classes"]] == [c["id"] for c in here[0]["classes"]]
    assert [c["probability"] for c in there[0]["classes"]] == pytest.approx(
        [c["probability"] for c in here[0]["classes"]], abs=1e-3
    )

    # A name the bucket already holds is refused, though this machine never saw the job.
    again = runner.invoke(app, ["train", "--data", str(dogs_mini), "--name", "shared", "--workspace", WORKSPACE])
    assert again.exit_code == 2 and "a job named 'shared' already exists" in again.output


@pytest.mark.slow
def test_a_killed_job_resumes_on_another_machine_from_the_bucket(bucket, tmp_path, dogs_mini, mobilenet_weights):
    env = {**os.environ, "IMGTUNE_WORKSPACE": WORKSPACE, "IMGTUNE_PUSH_INTERVAL": "0",
           "IMGTUNE_CACHE": str(tmp_path / "machine-a")}  # fmt: skip
    cmd = train_command(dogs_mini, mobilenet_weights, "killed", "--epochs", "4", *SLOW_IMAGE_TRAINING)
    proc = subprocess.Popen(as_host("machine-a", cmd), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:  # until an epoch and its checkpoint are pushed
        stored = objects(bucket, "team/killed/")
        if stored.get("metrics.jsonl", b"").count(b"\n") >= 1 and "checkpoints/last.pt" in stored:
            break
        time.sleep(0.2)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    pushed_epochs = objects(bucket, "team/killed/")["metrics.jsonl"].count(b"\n")
    assert 1 <= pushed_epochs < 4

    env["IMGTUNE_CACHE"] = str(tmp_path / "machine-b")
    refused = subprocess.run(resume_command("killed"), env=env, capture_output=True, text=True, timeout=600)
    assert refused.returncode == 2, refused.stderr  # this machine cannot tell whether machine-a is still at it
    assert "recorded as running on machine-a" in refused.stderr and "--force" in refused.stderr
    result = subprocess.run(
        resume_command("killed", "--force", "--json"), env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr
    stored = objects(bucket, "team/killed/")
    record = json.loads(stored["job.json"])
    assert record["status"] == "completed" and 1 <= record["resumed_from_epoch"] <= pushed_epochs
    assert [json.loads(line)["epoch"] for line in stored["metrics.jsonl"].splitlines()] == [1, 2, 3, 4]
    assert "resuming" in stored["logs.txt"].decode()


def bucket_files_parse(stored: dict[str, bytes]) -> list[int]:
    """Every object of a job parses (JSON, JSON Lines, checkpoints as tensors only); returns the epochs its
    metrics.jsonl records."""
    import io

    import torch

    for key, data in stored.items():
        if key.endswith(".json"):
            json.loads(data)
        elif key.endswith(".jsonl"):
            [json.loads(line) for line in data.splitlines()]
        elif key.endswith(".pt"):
            torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    return [json.loads(line)["epoch"] for line in stored.get("metrics.jsonl", b"").splitlines()]


@pytest.mark.slow
def test_a_bucket_job_killed_during_its_pushes_resumes_on_the_other_machine_every_time(
    bucket, tmp_path, dogs_mini, mobilenet_weights
):
    """Chaos for a job in a bucket: pushed after every step of its work (push interval 0, so most moments are in
    a push), SIGKILLed at 5 seeded random moments (the start, then after each run's first pushed epoch), and
    resumed each time on the other of two machines from the bucket alone. The bucket always holds whole files and
    each finished epoch once, and the job completes."""
    import random

    epochs, name, prefix = 8, "chaos", "team/chaos/"
    env = {**os.environ, "IMGTUNE_WORKSPACE": WORKSPACE, "IMGTUNE_PUSH_INTERVAL": "0", "PYTHONUNBUFFERED": "1"}
    start = train_command(dogs_mini, mobilenet_weights, name, "--epochs", str(epochs), *SLOW_IMAGE_TRAINING,
                          "--set", "train.early_stopping.enabled=false")  # fmt: skip
    moments = random.Random(19)
    killed, machines = 0, ["machine-a", "machine-b"]
    with (tmp_path / "chaos.log").open("ab") as log:
        for kill in range(5):
            host = machines[kill % 2]
            env["IMGTUNE_CACHE"] = str(tmp_path / host)
            claimed = "job.json" in objects(bucket, prefix)
            command = resume_command(name, "--force") if claimed else start  # (the other machine's heartbeat is fresh)
            process = subprocess.Popen(as_host(host, command), env=env, stdout=log, stderr=log)
            # The first kill at a seeded moment of the start (data check, claim, first pushes); each later one a
            # seeded moment after this run pushed an epoch of its own (so it lands mid-job, most likely in a push,
            # however fast the machine trains).
            before = bucket_files_parse(objects(bucket, prefix))
            deadline = time.monotonic() + (moments.uniform(3.0, 8.0) if kill == 0 else 600)
            delay = moments.uniform(0.0, 2.0)
            while process.poll() is None and time.monotonic() < deadline:
                if kill and len(bucket_files_parse(objects(bucket, prefix))) > len(before):
                    deadline = min(deadline, time.monotonic() + delay)
                time.sleep(0.05)
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                killed += 1
            process.wait()
            recorded = bucket_files_parse(objects(bucket, prefix))
            assert recorded == list(range(1, len(recorded) + 1)), (kill, recorded)  # each epoch once, in order
            if json.loads(objects(bucket, prefix).get("job.json", b"{}")).get("status") == "completed":
                break
    env["IMGTUNE_CACHE"] = str(tmp_path / machines[1])
    stored = objects(bucket, prefix)
    if json.loads(stored.get("job.json", b"{}")).get("status") != "completed":
        result = subprocess.run(
            as_host(machines[1], resume_command(name, "--force")), env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        stored = objects(bucket, prefix)
    assert bucket_files_parse(stored) == list(range(1, epochs + 1))
    record = json.loads(stored["job.json"])
    assert record["status"] == "completed" and record["epochs_run"] == epochs
    assert "model/model.safetensors" in stored
    assert killed >= 3 and stored["logs.txt"].decode().count("resuming") >= 2, (killed, stored["logs.txt"][-2000:])


def test_a_missing_bucket_is_one_clear_error(s3_env, dogs_mini):
    result = runner.invoke(app, ["train", "--data", str(dogs_mini), "--workspace", "s3://imgtune-no-such-bucket/x"])
    assert result.exit_code == 2
    assert "there is no bucket 'imgtune-no-such-bucket'" in result.output and "Traceback" not in result.output
    result = runner.invoke(app, ["jobs", "--workspace", "s3://bucket/../x"])
    assert result.exit_code == 2 and "bad workspace address 's3://bucket/../x'" in result.output


def test_a_mirror_has_one_writer_whose_push_is_one_way_and_stops_once_another_writer_took_over(bucket, tmp_path):
    from imgtune.storage.remote import Conflict, SyncedFolder

    url = f"s3://{BUCKET}/sync-test"
    local = tmp_path / "mirror"
    (local / "sub").mkdir(parents=True)
    for name in ("job.json", "written-here.txt", "written-both.txt", "changed-there.txt", "removed-here.txt",
                 "sub/same.txt"):  # fmt: skip
        (local / name).write_text(f"first {name}\n")
    mirror = SyncedFolder(url, local, ".record.json", keep_local_changes=True, guard="job.json")
    assert sorted(mirror.push()) == sorted(["job.json", "written-here.txt", "written-both.txt", "changed-there.txt",
                                            "removed-here.txt", "sub/same.txt"])  # fmt: skip
    assert mirror.push() == []  # in step

    # The writer's work goes on here; someone writes two of its files in the bucket by hand.
    (local / "written-here.txt").write_text("a running job wrote this\n")
    (local / "written-both.txt").write_text("this machine wrote this\n")
    bucket.put_object(Bucket=BUCKET, Key="sync-test/written-both.txt", Body=b"another machine wrote this first\n")
    bucket.put_object(Bucket=BUCKET, Key="sync-test/changed-there.txt", Body=b"another machine wrote this\n")
    (local / "removed-here.txt").unlink()
    mirror.pull()
    assert (local / "changed-there.txt").read_text() == "another machine wrote this\n"
    assert (local / "written-here.txt").read_text() == "a running job wrote this\n"  # changed here: kept
    assert (local / "written-both.txt").read_text() == "this machine wrote this\n"  # kept: the writer's own
    assert not (local / "removed-here.txt").exists()  # the object did not change: the deletion stands

    # The push is one way: the writer's files win, its deletions go, nothing comes back.
    assert sorted(mirror.push()) == ["written-both.txt", "written-here.txt"]
    stored = objects(bucket, "sync-test/")
    assert stored == {"job.json": b"first job.json\n", "written-here.txt": b"a running job wrote this\n",
                      "written-both.txt": b"this machine wrote this\n",
                      "changed-there.txt": b"another machine wrote this\n",
                      "sub/same.txt": b"first sub/same.txt\n"}  # fmt: skip
    copied: list[int] = []
    mirror.pull(on_start=copied.append)
    assert copied == [0]  # in step: nothing to copy after a push

    # A push cut short after it put job.json, before it recorded that: the object is still known for its own.
    (local / "job.json").write_text("second job.json\n")
    record = json.loads((local / ".record.json").read_text())
    mirror.push()
    record["files"]["job.json"]["pending"] = json.loads((local / ".record.json").read_text())["files"]["job.json"][
        "remote"]["etag"]  # fmt: skip
    (local / ".record.json").write_text(json.dumps(record))  # the record as the cut-short push left it
    (local / "written-here.txt").write_text("after the cut\n")
    assert sorted(mirror.push()) == ["job.json", "written-here.txt"]  # job.json again, over its own object
    stored.update({"job.json": b"second job.json\n", "written-here.txt": b"after the cut\n"})
    assert objects(bucket, "sync-test/") == stored

    # Two copies of one state both write job.json (two machines resuming one job): exactly one wins; the other
    # sends nothing at all, and learns who won.
    other = SyncedFolder(url, tmp_path / "other", ".record.json", keep_local_changes=True, guard="job.json")
    other.pull()
    (other.local / "sub" / "same.txt").write_text("a reader's change\n")
    with pytest.raises(Conflict):  # a copy that only read the folder is not its writer
        other.push()
    other.become_writer()  # (as a machine resuming the job does)
    (other.local / "job.json").write_text("the other machine runs it\n")
    (other.local / "sub" / "same.txt").write_text("the other machine's epoch\n")
    assert sorted(other.push()) == ["job.json", "sub/same.txt"]
    (local / "job.json").write_text("this machine runs it\n")
    (local / "written-here.txt").write_text("this machine's late epoch\n")
    with pytest.raises(Conflict) as lost:
        mirror.push()
    assert lost.value.found is not None
    stored.update({"job.json": b"the other machine runs it\n", "sub/same.txt": b"the other machine's epoch\n"})
    assert objects(bucket, "sync-test/") == stored  # nothing of the loser's reached the bucket

    # Once another writer took over, a pull drops this copy's unsent changes: the bucket wins everywhere.
    (local / "stale-new-file.txt").write_text("never sent\n")
    mirror.pull()
    assert {p.relative_to(local).as_posix(): p.read_bytes() for p in local.rglob("*")
            if p.is_file() and not p.name.startswith(".record.json")} == stored  # fmt: skip

    # The conditional write itself: over a changed object, or where there is none, it loses.
    from imgtune.storage.remote import _filesystem, _put_conditionally, create_exclusively

    fs, root = _filesystem(url)
    with pytest.raises(Conflict):
        _put_conditionally(fs, f"{root}/job.json", b"x", '"0123456789abcdef0123456789abcdef"', f"{url}/job.json")
    with pytest.raises(Conflict):
        _put_conditionally(fs, f"{root}/no-such.json", b"x", '"0123456789abcdef0123456789abcdef"', url)
    assert create_exclusively(f"{url}/claimed.json", b"1") is not None
    assert create_exclusively(f"{url}/claimed.json", b"2") is None
    assert objects(bucket, "sync-test/")["claimed.json"] == b"1"
    bucket.delete_object(Bucket=BUCKET, Key="sync-test/claimed.json")

    # Another command's own file: created where there is none, replaced only over the object it last saw.
    (other.local / "report.html").write_text("a report\n")
    other.push_files(["report.html"])
    (local / "report.html").write_text("a report from a stale copy\n")
    with pytest.raises(Conflict):
        mirror.push_files(["report.html"])
    assert objects(bucket, "sync-test/")["report.html"] == b"a report\n"
    stored["report.html"] = b"a report\n"

    # A nested writer's folder (a tuning job's trial, trials/NAME) that its parent pulled keeps its own record:
    # the parent never pushes its files, and the trial pushes its own changes.
    trial = SyncedFolder(f"{url}/trials/t1", tmp_path / "a" / "trials" / "t1", ".record.json", True, guard="job.json")
    trial.local.mkdir(parents=True)
    (trial.local / "job.json").write_text("a trial\n")
    trial.push()
    parent = SyncedFolder(url, tmp_path / "parent", ".record.json", True, guard="job.json", nested_dirs=("trials",))
    parent.pull()
    pulled_trial = tmp_path / "parent" / "trials" / "t1"
    assert (pulled_trial / "job.json").read_text() == "a trial\n" and (pulled_trial / ".record.json").is_file()
    parent.become_writer()
    (pulled_trial / "metrics.jsonl").write_text("{}\n")
    assert parent.push() == []  # not the parent's to send
    nested = SyncedFolder(f"{url}/trials/t1", pulled_trial, ".record.json", True, guard="job.json")
    nested.become_writer()
    assert nested.push() == ["metrics.jsonl"]
    assert objects(bucket, "sync-test/trials/t1/") == {"metrics.jsonl": b"{}\n", "job.json": b"a trial\n"}
    stored.update({"trials/t1/metrics.jsonl": b"{}\n", "trials/t1/job.json": b"a trial\n"})

    # A plain copy (a dataset) takes the bucket's version and drops files the bucket no longer has.
    copy = SyncedFolder(url, tmp_path / "copy", ".record.json")
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "extra.txt").write_text("not in the bucket\n")
    assert sorted(copy.pull(delete_missing=True)) == sorted(stored)
    assert {p.relative_to(tmp_path / "copy").as_posix(): p.read_bytes() for p in (tmp_path / "copy").rglob("*")
            if p.is_file() and not p.name.startswith(".record.json")} == stored  # fmt: skip


def test_a_jobs_ray_state_never_crosses_the_bucket(bucket, tmp_path):
    """A tuning job's Ray state (JOB/ray: pickles, which run code when loaded) is the machine's that wrote it: a
    push never sends it, never deletes or overwrites what others put under ray/ in the bucket; a pull never
    downloads a ray/ key, whoever put it there and however its case is written. The job's other files, its
    trials' included, sync as ever."""
    from imgtune.storage.jobs import LOCAL_ONLY_DIRS, SYNC_RECORD
    from imgtune.storage.remote import SyncedFolder

    url, prefix = f"s3://{BUCKET}/ray-test/tune", "ray-test/tune/"
    shared = {"job.json": b"{}", "trials/trial-1/job.json": b"{}", "trials/trial-1/metrics.jsonl": b"{}\n",
              "raylet-notes.txt": b"not Ray's state"}  # fmt: skip
    own_state = {"ray/experiment/tuner.pkl": b"machine a's state", "ray/experiment/experiment_state-1.json": b"{}"}

    def mirror(machine: str) -> SyncedFolder:
        return SyncedFolder(url, tmp_path / machine / "tune", SYNC_RECORD, True, local_only_dirs=LOCAL_ONLY_DIRS)

    def local_files(folder: SyncedFolder) -> dict[str, bytes]:
        return {p.relative_to(folder.local).as_posix(): p.read_bytes() for p in folder.local.rglob("*")
                if p.is_file() and not p.name.startswith(SYNC_RECORD)}  # fmt: skip

    a = mirror("machine-a")
    for rel, data in {**shared, **own_state}.items():
        (a.local / rel).parent.mkdir(parents=True, exist_ok=True)
        (a.local / rel).write_bytes(data)
    assert sorted(a.push()) == sorted(shared)
    assert objects(bucket, prefix) == shared  # machine a's Ray state stayed on machine a

    # Someone with write access to the bucket puts a state of their own there, and changes one of a's files.
    planted = {"ray/experiment/tuner.pkl": b"planted pickle", "ray/experiment/experiment_state-2.json": b"{}",
               "Ray/experiment/tuner.pkl": b"planted pickle"}  # fmt: skip
    for rel, data in planted.items():
        bucket.put_object(Bucket=BUCKET, Key=prefix + rel, Body=data)
    bucket.put_object(Bucket=BUCKET, Key=prefix + "trials/trial-1/metrics.jsonl", Body=b"{}\n{}\n")
    shared["trials/trial-1/metrics.jsonl"] = b"{}\n{}\n"
    a.pull()
    assert local_files(a) == {**shared, **own_state}  # the trial's change came; nothing under ray/ did

    # a changes its state (its experiment goes on) and drops a file of it: the bucket's ray/ keys stay as they were,
    # neither overwritten nor deleted.
    (a.local / "ray/experiment/tuner.pkl").write_bytes(b"machine a's newer state")
    (a.local / "ray/experiment/experiment_state-1.json").unlink()
    assert a.push() == []
    assert (a.local / "ray/experiment/tuner.pkl").read_bytes() == b"machine a's newer state"
    assert objects(bucket, prefix) == {**shared, **planted}

    # Another machine, which never saw the job, gets every file of it but none of the ray/ keys.
    b = mirror("machine-b")
    assert sorted(b.pull()) == sorted(shared)
    assert local_files(b) == shared and not (b.local / "ray").exists() and not (b.local / "Ray").exists()
    assert b.push() == [] and objects(bucket, prefix) == {**shared, **planted}

    # A mirror an older imgtune synced (its ray/ files pushed and recorded) forgets them: its deletions there are
    # not sent, and the bucket's ray/ keys are not pulled back over its own state.
    old = SyncedFolder(url, tmp_path / "machine-c" / "tune", SYNC_RECORD, True)
    old.pull()
    assert local_files(old) == {**shared, **planted}
    c = mirror("machine-c")
    (c.local / "ray/experiment/experiment_state-2.json").unlink()
    (c.local / "ray/experiment/tuner.pkl").write_bytes(b"machine c's own state")
    assert c.push() == [] and c.pull() is not None
    assert (c.local / "ray/experiment/tuner.pkl").read_bytes() == b"machine c's own state"
    assert objects(bucket, prefix) == {**shared, **planted}


@pytest.mark.slow
@pytest.mark.ray
def test_a_tuning_job_whose_driver_died_resumes_on_another_machine_from_the_bucket(
    bucket, tmp_path, dogs_mini, mobilenet_weights
):
    import psutil

    env = {**os.environ, "IMGTUNE_WORKSPACE": WORKSPACE, "IMGTUNE_PUSH_INTERVAL": "0",
           "IMGTUNE_CACHE": str(tmp_path / "machine-a")}  # fmt: skip
    # one trial at a time (one worker, one head per batch), so that the kill comes between two of them
    cmd = [sys.executable, "-m", "imgtune", "tune", "--data", str(dogs_mini), "--backbone", "mobilenet_v2",
           "--weights", str(mobilenet_weights), "--epochs", "20", "--max-trials", "12", "--max-parallel", "1",
           "--heads-per-worker", "1", "--set", "data.image_size=96", "--name", "tune-killed",
           "--set", "data.num_workers=0"]  # fmt: skip
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    driver = subprocess.Popen(as_host("machine-a", cmd), env=env, start_new_session=True, **quiet)

    def finished_in_bucket() -> dict[str, str]:
        stored = objects(bucket, "team/tune-killed/trials/")
        return {
            key.split("/")[0]: json.loads(data)["finished"]
            for key, data in stored.items()
            if key.endswith("/job.json") and key.count("/") == 1 and json.loads(data).get("status") == "completed"
        }

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None and not finished_in_bucket():
        time.sleep(0.1)
    before = finished_in_bucket()
    assert before and driver.poll() is None, "no trial was pushed before the driver ended"
    # Killed now, the bucket may hold a finished trial whose tuning job's push (its study) did not come yet.
    for pid in [driver.pid, *(p.pid for p in psutil.Process(driver.pid).children(recursive=True))]:
        with contextlib.suppress(ProcessLookupError):  # the driver and its local Ray, as if the machine died
            os.kill(pid, signal.SIGKILL)
    driver.wait()

    env["IMGTUNE_CACHE"] = str(tmp_path / "machine-b")
    resumed = subprocess.run(
        [sys.executable, "-m", "imgtune", "tune", "--resume", "tune-killed", "--force", "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["status"] == "completed" and len(summary["trials"]) == 12
    unfinished = [(t["trial"], t["status"], (t.get("error") or "")[-2000:]) for t in summary["trials"]]
    assert all(t["status"] == "completed" for t in summary["trials"]), [u for u in unfinished if u[1] != "completed"]
    after = finished_in_bucket()
    assert len(after) == 12 and all(after[name] == finished for name, finished in before.items())  # not re-run
    assert json.loads(objects(bucket, "team/tune-killed/")["job.json"])["status"] == "completed"


class _Touch:
    """Unpickled, it creates `path`: what a planted Ray state could do (any code, as this process's user)."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self) -> tuple[Any, tuple[Path]]:
        return (Path.touch, (self.path,))


@pytest.mark.slow
@pytest.mark.ray
def test_a_tuning_job_resumed_elsewhere_never_loads_a_ray_state_planted_in_the_bucket(
    bucket, tmp_path, dogs_mini, mobilenet_weights
):
    """Ray's experiment state never crosses the bucket, so a pickle planted under the job's ray/ prefix never runs on
    the machine that resumes it: that machine rebuilds the state from the trial jobs' own records, runs none of the
    finished trials again, continues the unfinished ones under their own names and lists them all in the results."""
    import pickle

    import psutil

    env = {**os.environ, "IMGTUNE_WORKSPACE": WORKSPACE, "IMGTUNE_PUSH_INTERVAL": "0",
           "IMGTUNE_CACHE": str(tmp_path / "machine-a")}  # fmt: skip
    # trials on Ray Tune one at a time (the debugger on: not batched heads), so that the kill comes between two
    cmd = [sys.executable, "-m", "imgtune", "tune", "--data", str(dogs_mini), "--backbone", "mobilenet_v2",
           "--weights", str(mobilenet_weights), "--epochs", "2", "--max-trials", "3", "--max-parallel", "1",
           "--set", "data.image_size=96", "--set", "data.num_workers=0", "--set", "debugger.enabled=true",
           "--name", "tune-planted"]  # fmt: skip
    driver = subprocess.Popen(
        as_host("machine-a", cmd), env=env, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )

    def trials_in_bucket() -> dict[str, dict[str, Any]]:
        stored = objects(bucket, "team/tune-planted/trials/")
        return {key.split("/")[0]: json.loads(data) for key, data in stored.items() if key.count("/") == 1
                and key.endswith("/job.json")}  # fmt: skip

    def finished(trials: dict[str, dict[str, Any]]) -> dict[str, str]:
        return {name: record["finished"] for name, record in trials.items() if record.get("status") == "completed"}

    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and driver.poll() is None and not finished(trials_in_bucket()):
        time.sleep(0.1)
    assert finished(trials_in_bucket()) and driver.poll() is None, "no trial was pushed before the driver ended"
    for pid in [driver.pid, *(p.pid for p in psutil.Process(driver.pid).children(recursive=True))]:
        with contextlib.suppress(ProcessLookupError):  # the driver and its local Ray, as if the machine died
            os.kill(pid, signal.SIGKILL)
    driver.wait()
    before = trials_in_bucket()
    assert len(finished(before)) < 3
    assert not objects(bucket, "team/tune-planted/ray/")  # machine a never sent its Ray state

    # Someone who can write to the bucket plants a Ray state that Tuner.restore would take, listing every trial.
    marker = tmp_path / "planted-code-ran"
    payload = pickle.dumps(_Touch(marker))
    pickle.loads(pickle.dumps(_Touch(tmp_path / "payload-works")))
    assert (tmp_path / "payload-works").exists()  # loading such a pickle does run its code
    state = {"trial_data": [[json.dumps({"trial_id": name.removeprefix("trial-"), "custom_trial_name": name}), "{}"]
                            for name in before]}  # fmt: skip
    planted = {"ray/experiment/tuner.pkl": payload, "ray/experiment/searcher-state-2099-01-01_00-00-00.pkl": payload,
               "ray/experiment/experiment_state-2099-01-01_00-00-00.json": json.dumps(state).encode()}  # fmt: skip
    for key, data in planted.items():
        bucket.put_object(Bucket=BUCKET, Key=f"team/tune-planted/{key}", Body=data)
    # ... and points the job at a Ray cluster of theirs (here a loopback port where none listens: were it used,
    # the resume would fail to connect)
    tampered = json.loads(objects(bucket, "team/tune-planted/")["job.json"])
    tampered["options"]["ray_address"] = "127.0.0.1:6399"
    bucket.put_object(Bucket=BUCKET, Key="team/tune-planted/job.json", Body=json.dumps(tampered).encode())

    env["IMGTUNE_CACHE"] = str(tmp_path / "machine-b")
    resumed = subprocess.run(
        [sys.executable, "-m", "imgtune", "tune", "--resume", "tune-planted", "--force", "--json"],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert not marker.exists(), "the planted Ray state was unpickled"
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    summary = json.loads(resumed.stdout)
    assert summary["status"] == "completed" and len(summary["trials"]) == 3
    assert all(t["status"] == "completed" and t["objective"] is not None for t in summary["trials"])
    names = [t["trial"] for t in summary["trials"]]
    after = trials_in_bucket()
    assert sorted(after) == sorted(names) and set(before) <= set(names)  # unfinished ones continued, none stray
    assert all(after[name]["finished"] == when for name, when in finished(before).items())  # not run again
    assert summary["best"]["trial"] == names[0]
    record = json.loads(objects(bucket, "team/tune-planted/")["job.json"])
    assert record["status"] == "completed" and [t["trial"] for t in record["trials"]] == names
    log = objects(bucket, "team/tune-planted/")["logs.txt"].decode()
    assert f"Ray state rebuilt from {len(finished(before))} finished trial(s) (the job came from {WORKSPACE}" in log
    assert "the Ray cluster 127.0.0.1:6399" in log and "the Ray cluster 127.0.0.1:6399" in resumed.stderr  # told
    assert record["ray"]["address"] == "in-process"
    in_bucket = {f"ray/{key}": data for key, data in objects(bucket, "team/tune-planted/ray/").items()}
    assert in_bucket == planted  # neither taken nor touched by machine b
    own = tmp_path / "machine-b" / MIRRORS_DIR / "s3" / BUCKET / "team" / "tune-planted" / "ray"
    assert (own / "experiment").is_dir()  # machine b's own state, made here ...
    assert all(p.read_bytes() != payload for p in own.rglob("*") if p.is_file())  # ... none of it from the bucket
