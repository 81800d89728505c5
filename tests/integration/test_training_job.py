"""Training jobs end to end on the shared photos: job directory, feature cache, bundle, resume, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from cli_helpers import SLOW_IMAGE_TRAINING, resume_command, train_command
from imgtune.cli import app
from imgtune.config import build_config
from imgtune.core.errors import JobError, WeightsError
from imgtune.data.transforms import load_image
from imgtune.models.bundle import load_bundle
from imgtune.models.factory import create_model
from imgtune.runs.evaluate import evaluate_job
from imgtune.runs.train import run_training_job
from imgtune.storage.jobs import Job, list_jobs

runner = CliRunner()


def mobilenet_config(dogs_mini: Path, weights: Path, **train) -> dict:
    return {
        "data": {"path": str(dogs_mini), "image_size": 96, "num_workers": 0},
        "model": {"backbone": "mobilenet_v2", "weights": str(weights)},
        "train": {"epochs": 6, "lr": 0.003, **train},
    }


@pytest.fixture(scope="module")
def finished_job(tmp_path_factory, dogs_mini, mobilenet_weights) -> Job:
    workspace = tmp_path_factory.mktemp("ws")
    return run_training_job(
        build_config(mobilenet_config(dogs_mini, mobilenet_weights)), workspace=workspace, progress=False
    )


def test_job_directory_holds_everything(finished_job: Job):
    record = finished_job.read()
    assert record["status"] == "completed"
    assert record["training_mode"] == "features"
    assert record["config"]["model"]["backbone"] == "mobilenet_v2"
    assert record["versions"]["torch"] == torch.__version__
    assert set(record["timings"]) >= {"initialization", "training_loop", "finalization", "total"}
    assert record["dataset"]["images"] == {"train": 300, "valid": 100, "test": 100}
    assert record["weights"]["loaded"] > 300 and record["weights"]["missing"] == []
    metrics = finished_job.read_metrics()
    assert [m["epoch"] for m in metrics] == list(range(1, record["epochs_run"] + 1))
    assert all({"train_loss", "valid_loss", "valid_accuracy", "lr"} <= set(m) for m in metrics)
    assert (finished_job.checkpoint_dir / "last.pt").exists()
    assert (finished_job.model_dir / "model.safetensors").exists()
    assert "completed" in finished_job.log_file.read_text()


def test_real_features_learn_the_breeds(finished_job: Job):
    test = finished_job.read()["test"]
    assert test["samples"] == 100
    assert test["accuracy"] > 0.5  # ten breeds: chance is 0.1
    assert test["top5_accuracy"] >= test["accuracy"]
    assert len(test["per_class_accuracy"]) == 10 and "001.Shih-Tzu" in test["per_class_accuracy"]
    assert sum(map(sum, test["confusion_matrix"])) == 100


@pytest.mark.slow
def test_bundle_reloads_and_agrees_with_the_job(finished_job: Job, dogs_mini: Path):
    bundle = load_bundle(finished_job.model_dir)
    assert [c.id for c in bundle.classes][:2] == ["001.Shih-Tzu", "002.Rhodesian_ridgeback"]
    assert bundle.classes[1].name == "Rhodesian ridgeback"
    assert bundle.preprocessing.image_size == 96
    image = bundle.preprocessing.eval_transform()(load_image(next((dogs_mini / "test/003.beagle").iterdir())))
    with torch.inference_mode():
        probs = bundle.model(image[None]).softmax(1)
    assert probs.shape == (1, 10) and float(probs.sum()) == pytest.approx(1.0, abs=1e-4)
    # The image path through the bundle matches the feature path used in training.
    result = evaluate_job(finished_job.path, str(dogs_mini), split="test", progress=False)
    assert result["accuracy"] == pytest.approx(finished_job.read()["test"]["accuracy"], abs=0.011)
    assert finished_job.read()["evaluations"][-1]["split"] == "test"


def test_bundle_with_damaged_weights_is_refused(finished_job: Job, tmp_path: Path):
    copy = tmp_path / "model"
    copy.mkdir()
    for f in finished_job.model_dir.iterdir():
        (copy / f.name).write_bytes(f.read_bytes())
    data = bytearray((copy / "model.safetensors").read_bytes())
    data[-10] ^= 0xFF
    (copy / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(JobError, match="checksum"):
        load_bundle(copy)


@pytest.mark.slow
def test_feature_cache_is_computed_once_and_shared(tmp_path, dogs_mini, mobilenet_weights, monkeypatch):
    monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path / "cache"))
    config = build_config(mobilenet_config(dogs_mini, mobilenet_weights, epochs=1, augment_views=2))
    run_training_job(config, workspace=tmp_path / "ws", progress=False)
    files = sorted((tmp_path / "cache/features").glob("*.safetensors"))
    assert len(files) == 5  # train clean + 2 augmented views, valid, test
    stamps = [f.stat().st_mtime_ns for f in files]
    second = run_training_job(config, workspace=tmp_path / "ws", progress=False)
    assert sorted((tmp_path / "cache/features").glob("*.safetensors")) == files
    assert [f.stat().st_mtime_ns for f in files] == stamps
    assert second.read()["status"] == "completed"


def test_partial_fine_tuning_on_images(tmp_path, dogs_mini, mobilenet_weights):
    raw = mobilenet_config(dogs_mini, mobilenet_weights, epochs=1, batch_size=32, optimizer="sgd", schedule="cosine")
    raw["model"]["freeze"] = "all_but_last"
    raw["data"]["image_size"] = 64
    job = run_training_job(build_config(raw), workspace=tmp_path, progress=False)
    record = job.read()
    assert record["training_mode"] == "images"
    assert record["status"] == "completed" and record["epochs_run"] == 1
    assert load_bundle(job.model_dir).model.spec.freeze == "all_but_last"


@pytest.mark.slow
def test_resnet50_from_scratch_runs_end_to_end_from_the_cli(tmp_path, dogs_mini):
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(dogs_mini),
            "--backbone",
            "resnet50",
            "--pretrained",
            "none",
            "--epochs",
            "1",
            "--image-size",
            "64",
            "--workspace",
            str(tmp_path),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed"
    assert summary["test"]["samples"] == 100
    assert load_bundle(summary["model"]).model.spec.backbone == "resnet50"


def test_missing_pretrained_weights_offline_is_one_clear_error(tmp_path, dogs_mini, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    monkeypatch.setenv("https_proxy", "http://127.0.0.1:9")  # nothing listens there: fails fast offline
    with pytest.raises(WeightsError) as info:
        create_model("resnet18", 3, pretrained="default")
    assert "--weights" in info.value.hint and "--pretrained none" in info.value.hint
    result = runner.invoke(
        app, ["train", "--data", str(dogs_mini), "--backbone", "resnet18", "--workspace", str(tmp_path)]
    )
    assert result.exit_code == 2
    assert "cannot download the pretrained weights of resnet18" in result.output
    assert "Traceback" not in result.output


def test_wrong_weights_file_is_reported(tmp_path, mobilenet_weights):
    with pytest.raises(WeightsError, match="none of the"):
        create_model("resnet18", 3, weights=str(mobilenet_weights))
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"not a torch file")
    with pytest.raises(WeightsError, match="cannot read weights"):
        create_model("resnet18", 3, weights=str(garbage))


def test_training_on_bad_data_completes_and_reports_exclusions(tmp_path, dogs_mini, mobilenet_weights):
    from bad_data import make_bad_dataset

    bad = make_bad_dataset(tmp_path / "bad", dogs_mini)
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            str(tmp_path / "bad"),
            "--backbone",
            "mobilenet_v2",
            "--weights",
            str(mobilenet_weights),
            "--epochs",
            "2",
            "--image-size",
            "64",
            "--workspace",
            str(tmp_path / "ws"),
            "--name",
            "bad-data",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "excluded files" in result.output
    record = Job.open("bad-data", tmp_path / "ws").read()
    excluded = {Path(e["path"]).relative_to(tmp_path / "bad").as_posix() for e in record["dataset"]["excluded"]}
    bad_files = {rel for rel, kind in bad.items() if kind != "empty_class"}
    assert bad_files <= excluded
    assert record["status"] == "completed"
    assert "011.empty_class" not in [c["id"] for c in record["dataset"]["classes"]]
    log = (tmp_path / "ws/bad-data/logs.txt").read_text()
    assert all(Path(rel).name in log for rel in bad_files)


@pytest.mark.slow
def test_killed_job_resumes_without_losing_epochs(tmp_path, dogs_mini, mobilenet_weights):
    workspace = tmp_path / "ws"
    env = {**os.environ, "IMGTUNE_WORKSPACE": str(workspace)}
    cmd = train_command(dogs_mini, mobilenet_weights, "killed", "--epochs", "4", *SLOW_IMAGE_TRAINING)
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = workspace / "killed/metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and metrics.read_text().count("\n") >= 1:
            epoch_time = json.loads(metrics.read_text().splitlines()[0])["epoch_time"]
            time.sleep(epoch_time / 2)  # well inside epoch 2
            break
        time.sleep(0.05)
    assert proc.poll() is None, "training ended before it could be killed"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    job = Job.open("killed", workspace)
    assert job.status() == "interrupted"
    done_before = len(job.read_metrics())
    assert 1 <= done_before < 4

    result = subprocess.run(
        resume_command("killed", "--json"),
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr
    record = job.read()
    assert record["status"] == "completed"
    assert record["resumed_from_epoch"] == done_before
    assert [m["epoch"] for m in job.read_metrics()] == [1, 2, 3, 4]


def test_jobs_list_and_show(finished_job: Job):
    workspace = finished_job.path.parent
    assert finished_job.name in [j.name for j in list_jobs(workspace)]
    listed = runner.invoke(app, ["jobs", "--workspace", str(workspace), "--json"])
    assert listed.exit_code == 0, listed.output
    rows = json.loads(listed.stdout)
    row = next(r for r in rows if r["name"] == finished_job.name)
    assert row["status"] == "completed" and row["best_valid_accuracy"] > 0.5
    shown = runner.invoke(app, ["jobs", "show", str(finished_job.path), "--json"])
    assert shown.exit_code == 0, shown.output
    assert json.loads(shown.stdout)["metrics"][0]["epoch"] == 1
    human = runner.invoke(app, ["jobs", "show", finished_job.name, "--workspace", str(workspace)])
    assert "test accuracy" in human.output
    missing = runner.invoke(app, ["jobs", "show", "no-such-job", "--workspace", str(workspace)])
    assert missing.exit_code == 2 and "no job 'no-such-job'" in missing.output


def test_config_file_and_overrides(tmp_path, dogs_mini, mobilenet_weights):
    config = tmp_path / "job.yaml"
    config.write_text(
        f"data:\n  path: {dogs_mini}\n  image_size: 64\n"
        f"model:\n  backbone: mobilenet_v2\n  weights: {mobilenet_weights}\n  head: linear\n"
        "train:\n  epochs: 2\n"
    )
    result = runner.invoke(
        app,
        [
            "train",
            "--config",
            str(config),
            "--set",
            "train.optimizer=adamw",
            "--epochs",
            "1",
            "--workspace",
            str(tmp_path),
            "--name",
            "from-file",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    record = Job.open("from-file", tmp_path).read()
    assert record["config"]["train"]["optimizer"] == "adamw"
    assert record["config"]["train"]["epochs"] == 1  # the flag wins over the file
    assert record["config"]["model"]["head"] == "linear"
    bad = runner.invoke(app, ["train", "--config", str(config), "--set", "train.lr=-1", "--workspace", str(tmp_path)])
    assert bad.exit_code == 2 and "train.lr" in bad.output


@pytest.mark.slow
def test_sigterm_stops_a_job_cleanly(tmp_path, dogs_mini, mobilenet_weights):
    env = {**os.environ, "IMGTUNE_WORKSPACE": str(tmp_path)}
    cmd = train_command(
        dogs_mini,
        mobilenet_weights,
        "termed",
        "--image-size",
        "64",
        "--epochs",
        "100000",
        "--set",
        "train.early_stopping.enabled=false",
    )
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "termed/metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 130
    job = Job.open("termed", tmp_path)
    assert job.status() == "stopped"
    assert len(job.read_metrics()) >= 1
    with pytest.raises(JobError, match="still running"):
        job.mark_running()  # this process is alive: a second run of the same job is refused
        run_training_job(resume="termed", workspace=tmp_path, progress=False)


def test_timm_backbones_with_a_pre_logits_layer_work():
    model = create_model("mobilenetv3_small_050", 4, pretrained="none")
    with torch.inference_mode():
        assert model.eval()(torch.randn(2, 3, 64, 64)).shape == (2, 4)


def test_resume_refuses_changed_classes(tmp_path, dogs_mini, mobilenet_weights):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(dogs_mini, data)
    job = run_training_job(
        build_config(mobilenet_config(data, mobilenet_weights, epochs=1) | {"name": "changing"}),
        workspace=tmp_path / "ws",
        progress=False,
    )
    job.update(status="failed")  # as if it had died after its first epoch
    for split in ("train", "valid", "test"):
        shutil.rmtree(data / split / "010.dingo")
    with pytest.raises(JobError, match="classes changed"):
        run_training_job(resume="changing", workspace=tmp_path / "ws", progress=False)


def test_evaluate_on_another_dataset_with_split_all(finished_job: Job, tmp_path: Path, dogs_mini: Path):
    import shutil

    other = tmp_path / "held-out"
    for class_id in ("001.Shih-Tzu", "003.beagle"):
        shutil.copytree(dogs_mini / "test" / class_id, other / class_id)
    (other / "unknown_breed").mkdir()
    shutil.copy(next((dogs_mini / "test/003.beagle").iterdir()), other / "unknown_breed/x.jpg")
    result = evaluate_job(finished_job.path, str(other), split="all", progress=False)
    assert result["samples"] == 20 and result["skipped_unknown_class"] == 1
    assert 0.0 <= result["accuracy"] <= 1.0


def test_jobs_open_by_the_name_given_and_files_are_readable(finished_job: Job, tmp_path: Path):
    job = Job.create(tmp_path, "dogs v2")
    job.write({"name": "dogs v2"})
    assert Job.open("dogs v2", tmp_path).path == job.path.resolve()
    assert oct(finished_job.job_file.stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    assert oct((finished_job.model_dir / "manifest.json").stat().st_mode & 0o777) == oct(0o666 & ~_umask())


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@pytest.mark.slow
def test_a_reused_pid_on_this_machine_blocks_resume_only_until_force(tmp_path, dogs_mini, mobilenet_weights):
    """A job recorded as running here under a pid that is now another live program: seen as interrupted when
    the pid's start time differs from the recorded one; when it matches (or an older job recorded none), refused
    without --force (it may be the job) and resumed with it (this process holds the job's lock, so the job's
    own runner is gone)."""
    import socket

    from imgtune.storage.jobs import process_started

    workspace = tmp_path / "ws"
    cmd = train_command(dogs_mini, mobilenet_weights, "reused", "--epochs", "1", "--image-size", "32",
                        "--workspace", str(workspace), "--json")  # fmt: skip
    assert subprocess.run(cmd, capture_output=True, timeout=600).returncode == 0
    other = subprocess.Popen(["sleep", "120"])  # a live process that is not the job
    try:
        job = Job.open("reused", workspace)
        job.update(status="running", pid=other.pid, host=socket.gethostname())  # the job's own start time kept
        assert job.status() == "interrupted"  # that pid started at another time: another program
        job.update(pid_started=process_started(other.pid))  # the recorded process looks alive
        assert job.status() == "running"
        refused = runner.invoke(app, ["train", "--resume", "reused", "--workspace", str(workspace)])
        assert refused.exit_code == 2 and "still running" in refused.output and "--force" in refused.output
        forced = runner.invoke(app, ["train", "--resume", "reused", "--force", "--workspace", str(workspace), "--json"])
        assert forced.exit_code == 0, forced.output
        assert job.read()["status"] == "completed"
        assert f"pid {other.pid} on this machine was recorded as running it" in job.log_file.read_text()
    finally:
        other.kill()
        other.wait()


@pytest.mark.slow
@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs in a mount namespace: needs root (CI runs as root)")
def test_a_full_disk_in_the_checkpointer_fails_the_job_with_the_reason(tmp_path, dogs_mini, mobilenet_weights):
    """The job's workspace on a 2 MB tmpfs (a mount namespace of its own: needs root, as CI runs): the first
    checkpoint (MobileNetV2's weights, over 2 MB with best.pt) cannot be written. The job ends `failed` with the
    disk's error, says so in one line (exit 2), and leaves no temp file behind."""
    import sys

    mount = tmp_path / "small-disk"
    mount.mkdir()
    train = train_command(dogs_mini, mobilenet_weights, "full", "--epochs", "2", "--image-size", "32",
                          "--no-debugger", "--no-profiler", "--workspace", str(mount / "runs"))  # fmt: skip
    show = (
        "import json, pathlib, sys; job = pathlib.Path(sys.argv[1]); "
        "print(json.dumps({'record': json.loads((job / 'job.json').read_text()), "
        "'files': sorted(p.name for p in job.rglob('*'))}))"
    )
    script = (
        f"mount -t tmpfs -o size=2m tmpfs {mount} && {subprocess.list2cmdline(train)} >/dev/null 2>{tmp_path}/err; "
        f"echo $? > {tmp_path}/exit; {sys.executable} -c {json.dumps(show)} {mount}/runs/full"
    )
    result = subprocess.run(["unshare", "-m", "sh", "-c", script], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    seen = json.loads(result.stdout)
    assert (tmp_path / "exit").read_text().strip() == "2"
    assert "No space left on device" in (tmp_path / "err").read_text()
    assert "continue the job with --resume full" in (tmp_path / "err").read_text()
    assert seen["record"]["status"] == "failed" and "[Errno 28] No space left on device" in seen["record"]["error"]
    assert not [name for name in seen["files"] if name.endswith(".tmp")]
