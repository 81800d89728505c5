"""`imgtune pipeline`: the original notebook end to end on dogs-mini (check, tune, final training, endpoint,
one prediction per class through it, summary), and a dataset it refuses."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgtune.cli import app
from imgtune.storage.jobs import Job
from servers import http_status

pytestmark = [pytest.mark.slow, pytest.mark.ray]


runner = CliRunner()


def test_the_pipeline_runs_the_notebook_end_to_end(tmp_path, dogs_mini, mobilenet_weights):
    result = runner.invoke(
        app,
        ["pipeline", "--data", str(dogs_mini), "--backbone", "mobilenet_v2", "--weights", str(mobilenet_weights),
         "--epochs", "2", "--max-trials", "2", "--name", "notebook", "--workspace", str(tmp_path), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["job"] == "notebook"
    assert summary["best_hyperparameters"].keys() == {"train.lr", "train.batch_size"}
    final = Job.open(summary["final_job"], tmp_path).read()
    assert final["test"]["accuracy"] == summary["test_accuracy"] and final["test"]["samples"] == 100
    assert final["config"]["debugger"]["enabled"] and final["config"]["profiler"]["enabled"]
    tuning = Job.open(summary["tuning_job"], tmp_path).read()
    assert tuning["kind"] == "tuning" and len(tuning["trials"]) == 2 and tuning["final_job"] == summary["final_job"]
    # one test photo per class went through the endpoint, which is stopped now
    predictions = summary["sample_predictions"]
    classes = sorted(p.name for p in (dogs_mini / "test").iterdir() if p.is_dir())
    assert [p["class"] for p in predictions] == classes
    assert all(Path(p["file"]).parent.name == p["class"] and p["predicted"] in classes for p in predictions)
    assert sum(p["correct"] for p in predictions) >= 5  # a trained model, not chance (1 in 10)
    assert summary["endpoint"].startswith("http://127.0.0.1:") and http_status(summary["endpoint"] + "/ping") is None
    for path in summary["artifacts"].values():
        assert Path(path).exists()
    assert Job.open("notebook", tmp_path).read()["kind"] == "pipeline"
    assert set(summary["step_seconds"]) == {"data_check", "tuning", "final_training", "endpoint_start",
                                            "sample_predictions"}  # fmt: skip


def test_a_dataset_that_cannot_be_trained_on_stops_the_pipeline_first(tmp_path, dogs_mini):
    only_class = tmp_path / "data" / "train" / "003.beagle"
    shutil.copytree(dogs_mini / "train" / "003.beagle", only_class)
    result = runner.invoke(app, ["pipeline", "--data", str(tmp_path / "data"), "--workspace", str(tmp_path / "ws")])
    assert result.exit_code == 2 and "cannot be trained on" in result.output
    record = Job.open(next((tmp_path / "ws").iterdir()), tmp_path / "ws").read()
    assert record["status"] == "failed" and "tuning_job" not in record


@pytest.fixture(scope="module", autouse=True)
def _ray_shut_down_afterwards():
    yield
    import ray

    ray.shutdown()


def test_the_pipeline_reads_its_data_from_s3_and_keeps_its_jobs_there(
    tmp_path, dogs_mini, mobilenet_weights, s3_client, monkeypatch
):
    """Data under s3:// (moto on 127.0.0.1) for every step (check, the trials, the final job, the samples), and
    the workspace in a bucket: the pipeline, tuning (with its trials) and final jobs all end up there."""
    import ray

    ray.shutdown()  # trials' workers must start with this test's AWS settings in their environment
    s3_client.create_bucket(Bucket="pipeline-data")
    s3_client.create_bucket(Bucket="pipeline-runs")
    classes = sorted(p.name for p in (dogs_mini / "train").iterdir() if p.is_dir())[:3]
    for split, count in (("train", 8), ("valid", 4), ("test", 3)):
        for class_id in classes:
            for photo in sorted((dogs_mini / split / class_id).iterdir())[:count]:
                key = f"dogs/{split}/{class_id}/{photo.name}"
                s3_client.put_object(Bucket="pipeline-data", Key=key, Body=photo.read_bytes())
    result = runner.invoke(
        app,
        ["pipeline", "--data", "s3://pipeline-data/dogs", "--backbone", "mobilenet_v2", "--weights",
         str(mobilenet_weights), "--epochs", "2", "--max-trials", "2", "--workspace", "s3://pipeline-runs/ws",
         "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and [p["class"] for p in summary["sample_predictions"]] == classes
    assert summary["artifacts"]["kept_in"] == "s3://pipeline-runs/ws"

    def stored(key: str) -> bytes:
        return s3_client.get_object(Bucket="pipeline-runs", Key=f"ws/{key}")["Body"].read()

    keys = {o["Key"] for o in s3_client.list_objects_v2(Bucket="pipeline-runs")["Contents"]}
    pipeline, tuning_name, final_name = summary["job"], summary["tuning_job"], summary["final_job"]
    assert json.loads(stored(f"{pipeline}/job.json"))["final_job"] == final_name
    tuning = json.loads(stored(f"{tuning_name}/job.json"))
    assert tuning["status"] == "completed" and [t["status"] for t in tuning["trials"]] == ["completed", "completed"]
    for trial in tuning["trials"]:
        assert json.loads(stored(f"{tuning_name}/{trial['job']}/job.json"))["status"] == "completed"
    assert {f"ws/{tuning_name}/report.html", f"ws/{final_name}/report.html",
            f"ws/{final_name}/model/model.safetensors"} <= keys  # fmt: skip

    # From a machine with none of it (another IMGTUNE_CACHE), the final job opens from the bucket.
    monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path / "elsewhere"))
    final = Job.open(final_name, "s3://pipeline-runs/ws").read()
    assert final["config"]["data"]["path"] == "s3://pipeline-data/dogs" and final["test"]["samples"] == 9
