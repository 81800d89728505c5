"""Jobs as MLflow runs against a real MLflow tracking server on 127.0.0.1 (sqlite backend store, a local artifact
folder) and against MLflow's own local store; registered models served and evaluated from `models:/` URIs; the
TensorBoard export read back by TensorBoard's own event reader."""

from __future__ import annotations

import base64
import json
import sys
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

import imgtune
from imgtune.storage.jobs import Job
from servers import running_server, without_proxies

pytestmark = pytest.mark.slow

MODEL = "dogs-classifier"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    """An MLflow tracking server in a subprocess on 127.0.0.1; yields its URI."""
    root = tmp_path_factory.mktemp("mlflow-server")
    command = lambda port: [  # noqa: E731
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root}/db.sqlite", "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    with running_server(command, "/health", root / "server.log", env=without_proxies(), ready_status=200) as url:
        yield url


def small_job(dogs_mini: Path, weights: Path, name: str, *overrides: str, workspace: Path) -> Job:
    """A frozen MobileNetV2 head on dogs-mini at 64 px, 2 epochs: seconds of training."""
    return imgtune.train(
        dogs_mini, backbone="mobilenet_v2", weights=weights, epochs=2, image_size=64, name=name,
        overrides=["data.num_workers=0", *overrides], workspace=workspace, progress=False,
    )  # fmt: skip


def some_test_photos(dogs_mini: Path, count: int = 4) -> list[Path]:
    return sorted((dogs_mini / "test").glob("*/*.jpg"))[::10][:count]


@pytest.fixture(scope="module")
def tracked(mlflow_uri: str, dogs_mini: Path, mobilenet_weights: Path, tmp_path_factory) -> Job:
    workspace = tmp_path_factory.mktemp("ws")
    return small_job(
        dogs_mini, mobilenet_weights, "tracked", "tracking.mlflow=true", f"tracking.mlflow_uri={mlflow_uri}",
        f"tracking.registered_model={MODEL}", "tracking.alias=champion", "tracking.experiment=dogs",
        workspace=workspace,
    )  # fmt: skip


def client(uri: str):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def test_a_training_job_is_an_mlflow_run(tracked: Job, mlflow_uri: str):
    record = tracked.record()
    assert record.status == "completed" and not record.plugin_failures and not record.tracking_gaps
    run = client(mlflow_uri).get_run(record.mlflow["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    assert client(mlflow_uri).get_experiment(run.info.experiment_id).name == "dogs"
    params = run.data.params
    assert params["train.epochs"] == "2" and params["model.backbone"] == "mobilenet_v2"
    assert params["data.image_size"] == "64"
    epochs = tracked.read_metrics()
    history = client(mlflow_uri).get_metric_history(run.info.run_id, "valid_accuracy")
    assert sorted((m.step, m.value) for m in history) == [(e["epoch"], e["valid_accuracy"]) for e in epochs]
    assert run.data.metrics["test_accuracy"] == pytest.approx(record.test["accuracy"])
    samples = client(mlflow_uri).get_metric_history(run.info.run_id, "system/cpu_utilization_percentage")
    assert len(samples) == record.profiler["samples"] > 0  # every profiler sample, as MLflow system metrics
    tags = run.data.tags
    assert tags["imgtune.job"] == "tracked" and tags["imgtune.status"] == "completed"
    assert tags["imgtune.backbone"] == "mobilenet_v2" and tags["imgtune.excluded_files"] == "0"
    for rule, result in record.debugger.items():
        assert tags[f"imgtune.debugger.{rule}"] == result["status"]
    artifacts = {a.path for a in client(mlflow_uri).list_artifacts(run.info.run_id)}
    assert {"report.html", "imgtune"} <= artifacts
    inner = {a.path for a in client(mlflow_uri).list_artifacts(run.info.run_id, "imgtune")}
    assert {"imgtune/rules.json", "imgtune/logs.txt", "imgtune/job.json", "imgtune/metrics.jsonl"} <= inner


def test_the_model_is_registered_and_its_pyfunc_predicts_as_imgtune_does(
    tracked: Job, mlflow_uri: str, dogs_mini: Path, monkeypatch: pytest.MonkeyPatch
):
    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    logged = tracked.record().mlflow
    version = client(mlflow_uri).get_model_version_by_alias(MODEL, "champion")
    assert version.version == logged["version"] and version.run_id == logged["run_id"]
    model = mlflow.pyfunc.load_model(f"models:/{MODEL}@champion")
    assert [c.name for c in model.metadata.get_input_schema().inputs] == ["image"]
    photos = some_test_photos(dogs_mini)
    answer = model.predict(pd.DataFrame({"image": [p.read_bytes() for p in photos]}))
    expected = imgtune.predict(photos, job=tracked.path, top_k=1)
    assert list(answer["class_id"]) == [r["classes"][0]["id"] for r in expected]
    with pytest.raises(Exception, match="not usable"):
        model.predict(pd.DataFrame({"image": [b"not an image"]}))
    with pytest.raises(Exception, match="expected encoded image bytes"):  # never a file of the server's
        model.predict(pd.DataFrame({"image": [str(photos[0])]}))


def test_registered_models_load_in_deploy_predict_evaluate_and_batch_transform(
    tracked: Job, mlflow_uri: str, dogs_mini: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    uri = f"models:/{MODEL}@champion"
    photos = some_test_photos(dogs_mini)
    from_job = imgtune.predict(photos, job=tracked.path, top_k=3)
    from_registry = imgtune.predict(photos, job=uri, top_k=3)
    assert [r["classes"][0]["id"] for r in from_registry] == [r["classes"][0]["id"] for r in from_job]
    evaluation = imgtune.evaluate(uri, dogs_mini, split="test", progress=False)
    assert evaluation["accuracy"] == pytest.approx(tracked.record().test["accuracy"], abs=0.02)
    assert evaluation["samples"] == tracked.record().test["samples"]  # split as the job split it: its config
    with imgtune.deploy(uri, port=0, background=True) as endpoint:
        request = urllib.request.Request(
            f"{endpoint.url}/invocations", photos[0].read_bytes(), {"Content-Type": "image/jpeg"}
        )
        answer = json.loads(urllib.request.urlopen(request, timeout=30).read())
    assert json.dumps(answer).count(from_job[0]["classes"][0]["id"]) >= 1
    output = tmp_path / "out.jsonl"
    summary = imgtune.batch_transform(uri, dogs_mini / "test" / "001.Shih-Tzu", output, progress=False)
    assert summary.predicted == 10 and summary.failed == 0
    with pytest.raises(imgtune.JobError, match="no MLflow model"):
        imgtune.predict(photos, job=f"models:/{MODEL}@no-such-alias")


def test_mlflow_models_serve_serves_the_registered_model(tracked: Job, mlflow_uri: str, dogs_mini: Path, tmp_path):
    env = {**without_proxies(), "MLFLOW_TRACKING_URI": mlflow_uri}
    command = lambda port: [  # noqa: E731
        sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager",
        "local", "-h", "127.0.0.1", "-p", str(port),
    ]  # fmt: skip
    photo = some_test_photos(dogs_mini, 1)[0]
    body = {"dataframe_split": {"columns": ["image"], "data": [[base64.b64encode(photo.read_bytes()).decode()]]}}
    with running_server(command, "/ping", tmp_path / "serve.log", env=env, ready_status=200) as url:
        request = urllib.request.Request(
            f"{url}/invocations", json.dumps(body).encode(), {"Content-Type": "application/json"}
        )
        predictions = json.loads(urllib.request.urlopen(request, timeout=60).read())["predictions"]
    expected = imgtune.predict([photo], job=tracked.path, top_k=1)[0]["classes"][0]
    assert predictions[0]["class_id"] == expected["id"]


def test_without_a_server_runs_go_to_mlflows_local_store(
    dogs_mini: Path, mobilenet_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    job = small_job(
        dogs_mini, mobilenet_weights, "offline", "tracking.mlflow=true", "tracking.registered_model=offline-model",
        "debugger.enabled=false", "profiler.enabled=false", workspace=tmp_path / "ws",
    )  # fmt: skip
    logged = job.record().mlflow
    assert logged["tracking_uri"] == f"sqlite:///{tmp_path / 'mlflow.db'}"  # MLflow's default store, made absolute
    run = client(logged["tracking_uri"]).get_run(logged["run_id"])
    assert run.data.metrics["valid_accuracy"] == job.read_metrics()[-1]["valid_accuracy"]
    assert logged["version"] == "1"


def test_a_failing_tracker_never_fails_training(
    dogs_mini: Path, mobilenet_weights: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "3")
    from servers import free_port

    nobody = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    job = small_job(
        dogs_mini, mobilenet_weights, "tracker-down", "tracking.mlflow=true", f"tracking.mlflow_uri={nobody}",
        "debugger.enabled=false", "profiler.enabled=false", workspace=tmp_path,
    )  # fmt: skip
    record = job.record()
    assert record.status == "completed" and (job.model_dir / "manifest.json").is_file()
    assert [f["plugin"] for f in record.plugin_failures] == ["mlflow"]
    assert record.tracking_gaps and "nothing logged" in record.tracking_gaps[0]
    assert "plugin mlflow failed" in job.log_file.read_text()


def test_a_tuning_job_is_a_parent_run_with_its_trials_nested(
    mlflow_uri: str, dogs_mini: Path, mobilenet_weights: Path, tmp_path: Path
):
    job = imgtune.tune(
        dogs_mini, backbone="mobilenet_v2", weights=mobilenet_weights, epochs=2, workspace=tmp_path, progress=False,
        overrides=["data.image_size=64", "data.num_workers=0", "tracking.mlflow=true",
                   f"tracking.mlflow_uri={mlflow_uri}", "tracking.experiment=tuning"],
        space={"train.lr": {"type": "categorical", "values": [0.0003, 0.003]}}, strategy="grid", max_parallel=1,
    )  # fmt: skip
    record = job.record()
    assert record.status == "completed" and not record.plugin_failures
    parent = record.mlflow["run_id"]
    mlflow_client = client(mlflow_uri)
    assert mlflow_client.get_run(parent).data.tags["imgtune.kind"] == "tuning"
    children = mlflow_client.search_runs(
        [record.mlflow["experiment_id"]], filter_string=f"tags.mlflow.parentRunId = '{parent}'"
    )
    trial_runs = {Job(job.path / t["job"]).record().mlflow["run_id"]: t for t in record.trials}
    assert {run.info.run_id for run in children} == set(trial_runs) and len(trial_runs) == 2
    for run in children:
        trial = trial_runs[run.info.run_id]
        assert run.info.status == "FINISHED"
        assert float(run.data.params["train.lr"]) == trial["hyperparameters"]["train.lr"]
        assert run.data.metrics["valid_accuracy"] == Job(job.path / trial["job"]).read_metrics()[-1]["valid_accuracy"]
    best = [run for run in children if run.data.tags.get("imgtune.best_trial") == "true"]
    assert len(best) == 1 and trial_runs[best[0].info.run_id]["job"] == record.best["job"]
    assert mlflow_client.get_run(parent).data.tags["imgtune.best_trial_run"] == best[0].info.run_id


def test_tensorboard_event_files_read_back(dogs_mini: Path, mobilenet_weights: Path, tmp_path: Path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    job = small_job(dogs_mini, mobilenet_weights, "tb", "tracking.tensorboard=true", workspace=tmp_path)
    assert not job.record().plugin_failures

    def read(folder: Path) -> EventAccumulator:
        events = EventAccumulator(str(folder), size_guidance={"scalars": 0, "histograms": 0})
        events.Reload()
        return events

    live = read(job.path / "tensorboard")  # written by the plugin as the job trained
    epochs = job.read_metrics()
    assert [(e.step, e.value) for e in live.Scalars("epoch/valid_accuracy")] == [
        (r["epoch"], pytest.approx(r["valid_accuracy"])) for r in epochs
    ]
    assert live.Scalars("test/accuracy")[0].value == pytest.approx(job.record().test["accuracy"])
    histograms = live.Tags()["histograms"]
    assert "debugger/gradient/head.0.weight" in histograms
    first = live.Histograms("debugger/gradient/head.0.weight")[0].histogram_value
    stored = next(
        json.loads(line)
        for line in (job.path / "debugger" / "tensors.jsonl").read_text().splitlines()
        if '"gradient/head.0.weight"' in line
    )
    assert first.num == sum(stored["h"]["counts"]) and first.min == pytest.approx(stored["h"]["min"])
    steps = (job.path / "profiler" / "steps.jsonl").read_text().splitlines()
    train_steps = [json.loads(s) for s in steps if '"phase": "train"' in s]
    forward = live.Scalars("profiler/train/forward_ms")
    assert len(forward) == len(train_steps) and forward[0].value == pytest.approx(train_steps[0]["forward"] * 1000)

    exported = imgtune.export_tensorboard(job, out=tmp_path / "export")
    again = imgtune.export_tensorboard(job, out=tmp_path / "export")
    assert exported["points"] > 0 and again["points"] == 0  # an export run again adds only what is new
    assert sorted(read(tmp_path / "export").Tags()["scalars"]) == sorted(live.Tags()["scalars"])
