"""The endpoint, predict and batch transform, on a model trained on dogs-mini.

Servers are real: `imgtune deploy` as a subprocess running uvicorn on 127.0.0.1, asked over HTTP (urllib,
httpx, boto3's sagemaker-runtime client, headless Chromium). S3 is moto's server on 127.0.0.1.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from bad_data import make_bad_dataset
from imgtune.cli import app
from imgtune.serving.predictor import Predictor
from servers import running_server

pytestmark = [pytest.mark.slow]


runner = CliRunner()
JOB = "dogs"
API_KEY = "s3cret-test-key"


@pytest.fixture(scope="module")
def workspace(dogs_workspace) -> Path:
    """The session's workspace holding `dogs` (frozen MobileNetV2, 3 epochs on dogs-mini; tests/conftest.py)."""
    return dogs_workspace


@pytest.fixture(scope="module")
def predictor(workspace) -> Predictor:
    return Predictor.load(JOB, workspace=workspace)


@pytest.fixture(scope="module")
def photos(dogs_mini) -> list[Path]:
    """One test photo from each of 5 classes."""
    classes = sorted(p for p in (dogs_mini / "test").iterdir() if p.is_dir())[:5]
    return [sorted(c.iterdir())[0] for c in classes]


def deploy(workspace: Path, log: Path, *options: str):
    command = lambda port: [  # noqa: E731
        sys.executable, "-m", "imgtune", "deploy", JOB, "--workspace", str(workspace), "--port", str(port), *options
    ]  # fmt: skip
    return running_server(command, "/ping", log, ready_status=200)


@pytest.fixture(scope="module")
def endpoint(workspace, s3_env, tmp_path_factory) -> str:
    """The default endpoint (PyTorch backend), with the moto S3 settings in its environment."""
    log = tmp_path_factory.mktemp("deploy") / "server.log"
    with deploy(workspace, log, "--allow-bucket", "serving-photos", "--fetch-timeout", "20") as url:
        yield url


@pytest.fixture(scope="module")
def guarded_endpoint(workspace, tmp_path_factory) -> str:
    """ONNX Runtime backend, an API key, and a queue of one image (a two-image request cannot fit)."""
    log = tmp_path_factory.mktemp("deploy-onnx") / "server.log"
    options = ["--backend", "onnx", "--api-key", API_KEY, "--max-batch-size", "1", "--max-queue", "1"]
    with deploy(workspace, log, *options) as url:
        yield url


def post(url: str, body: bytes, content_type: str | None, headers: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(url, data=body, method="POST", headers=headers or {})
    if content_type:
        request.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def burst(url: str, body: bytes, count: int, headers: dict) -> tuple[list[int], list[str]]:
    """`count` requests at once (httpx, one event loop); their statuses and error messages."""
    import httpx

    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                *(client.post(f"{url}/invocations", content=body, headers={**headers, "Content-Type": "image/jpeg"})
                  for _ in range(count))
            )  # fmt: skip

    responses = asyncio.run(send())
    return [r.status_code for r in responses], [r.json().get("error", {}).get("message", "") for r in responses]


def as_png(path: Path) -> bytes:
    buffer = io.BytesIO()
    Image.open(path).save(buffer, format="PNG")
    return buffer.getvalue()


def probabilities(prediction: dict) -> dict[str, float]:
    return {c["id"]: c["probability"] for c in prediction["classes"]}


# -- predictions -----------------------------------------------------------------------------------------


def test_predictions_equal_the_in_process_models(endpoint, predictor, photos):
    for photo in photos:
        status, answer = post(f"{endpoint}/invocations?top_k=3", photo.read_bytes(), "image/jpeg")
        assert status == 200, answer
        with Image.open(photo) as image:
            expected = predictor.predict([image], 3)[0]
        got = answer["predictions"][0]["classes"]
        assert [c["id"] for c in got] == [c["id"] for c in expected]
        assert np.allclose([c["probability"] for c in got], [c["probability"] for c in expected], atol=1e-5)
    assert sum(1 for photo in photos if post(f"{endpoint}/invocations", photo.read_bytes(), "image/jpeg")[1][
        "predictions"][0]["classes"][0]["id"] == photo.parent.name) >= 3  # fmt: skip  # a trained model


def test_every_accepted_body_gives_the_same_answer(endpoint, photos, s3_client):
    photo = photos[0]
    jpeg = photo.read_bytes()
    encoded = base64.b64encode(jpeg).decode()
    s3_client.create_bucket(Bucket="serving-photos")
    s3_client.put_object(Bucket="serving-photos", Key="dog.jpg", Body=jpeg)
    reference = probabilities(post(f"{endpoint}/invocations", jpeg, "image/jpeg")[1]["predictions"][0])
    bodies = [
        (jpeg, "application/x-image"),
        (as_png(photo), "image/png"),
        (json.dumps({"image": encoded}).encode(), "application/json"),
        (json.dumps({"image": f"data:image/jpeg;base64,{encoded}"}).encode(), "application/json"),
        (json.dumps({"url": "s3://serving-photos/dog.jpg"}).encode(), "application/json"),
    ]
    for body, content_type in bodies:
        status, answer = post(f"{endpoint}/invocations", body, content_type)
        assert status == 200, (content_type, answer)
        got = probabilities(answer["predictions"][0])
        assert got.keys() == reference.keys() and len(got) == 5  # the default top-k
        tolerance = 0.02 if content_type == "image/png" else 1e-5  # PNG of the decoded JPEG: the same pixels
        assert all(abs(got[k] - reference[k]) < tolerance for k in got), (content_type, got, reference)
    # several images in one request: JSON instances, or multipart file parts; options from the body
    instances = {"instances": [encoded, {"b64": encoded}, {"url": "s3://serving-photos/dog.jpg"}], "top_k": 2}
    status, answer = post(f"{endpoint}/invocations", json.dumps(instances).encode(), "application/json")
    assert status == 200 and len(answer["predictions"]) == 3
    assert all(len(p["classes"]) == 2 for p in answer["predictions"])
    boundary = "imgtune-test-boundary"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file{i}"; filename="{photo.name}"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + jpeg
        + b"\r\n"
        for i in range(2)
    )
    parts += f'--{boundary}\r\nContent-Disposition: form-data; name="top_k"\r\n\r\n1\r\n--{boundary}--\r\n'.encode()
    status, answer = post(f"{endpoint}/invocations", parts, f"multipart/form-data; boundary={boundary}")
    assert status == 200 and [len(p["classes"]) for p in answer["predictions"]] == [1, 1]
    # the raw logits, as the original endpoint returned them; options from the query and CustomAttributes
    status, answer = post(f"{endpoint}/invocations?logits=true", jpeg, "image/jpeg")
    logits = np.array(answer["predictions"][0]["logits"])
    assert logits.shape == (10,) and np.exp(logits).argmax() == answer["predictions"][0]["classes"][0]["index"]
    headers = {"X-Amzn-SageMaker-Custom-Attributes": "top_k=4,logits=false"}
    status, answer = post(f"{endpoint}/endpoints/{JOB}/invocations", jpeg, "image/jpeg", headers)
    assert status == 200 and len(answer["predictions"][0]["classes"]) == 4 and "logits" not in answer["predictions"][0]


def test_boto3_sagemaker_runtime_client_works_unchanged(endpoint, photos):
    import boto3
    from botocore.exceptions import ClientError

    client = boto3.client(
        "sagemaker-runtime",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    )
    jpeg = photos[1].read_bytes()
    response = client.invoke_endpoint(
        EndpointName=JOB, Body=jpeg, ContentType="image/jpeg", Accept="application/json", CustomAttributes="top_k=3"
    )
    answer = json.loads(response["Body"].read())
    assert response["ContentType"] == "application/json" and len(answer["predictions"][0]["classes"]) == 3
    assert answer == post(f"{endpoint}/invocations?top_k=3", jpeg, "image/jpeg")[1]
    with pytest.raises(ClientError) as refused:
        client.invoke_endpoint(EndpointName=JOB, Body=b"not a photo", ContentType="image/jpeg")
    assert refused.value.response["Error"]["Code"] == "ValidationError"
    assert "not an image" in refused.value.response["Error"]["Message"]
    with pytest.raises(ClientError) as unknown:
        client.invoke_endpoint(EndpointName="cats", Body=jpeg, ContentType="image/jpeg")
    assert unknown.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404


# -- bad requests ----------------------------------------------------------------------------------------


def test_bad_requests_get_clear_json_errors(endpoint, photos, tmp_path, dogs_mini):
    bad = make_bad_dataset(tmp_path / "bad", dogs_mini, per_class=1)
    by_kind = {kind: tmp_path / "bad" / path for path, kind in bad.items()}
    jpeg = photos[0].read_bytes()
    cases = [
        (b"\xff" * (6 * 1024 * 1024 + 1), "image/jpeg", 413, "at most 6,291,456"),
        (jpeg, "text/plain", 415, "unsupported content type 'text/plain'"),
        (jpeg, None, 415, "unsupported content type"),
        (by_kind["truncated"].read_bytes(), "image/jpeg", 400, "truncated"),
        (by_kind["text_as_jpg"].read_bytes(), "image/jpeg", 400, "not an image"),
        (by_kind["bomb"].read_bytes(), "image/png", 400, "decompression bomb"),
        (by_kind["gif"].read_bytes(), "image/jpeg", 400, "unsupported format GIF"),
        (b"", "image/jpeg", 400, "zero-byte"),
        (b"{not json", "application/json", 400, "not valid JSON"),
        (b'{"image": "***"}', "application/json", 400, "not valid base64"),
        (b'{"photo": 1}', "application/json", 400, 'needs "image"'),
        (b'{"url": "https://example.com/dog.jpg"}', "application/json", 400, "scheme 'https' is not allowed"),
        (b'{"url": "file:///etc/passwd"}', "application/json", 400, "scheme 'file' is not allowed"),
        (b'{"url": "s3://serving-photos/missing.jpg"}', "application/json", 400, "could not fetch"),
        (b'{"url": "s3://someone-elses/dog.jpg"}', "application/json", 400, "not one this endpoint fetches from"),
        (json.dumps({"instances": [base64.b64encode(jpeg).decode()] * 65}).encode(), "application/json", 413, "65"),
    ]
    huge = io.BytesIO()
    Image.new("1", (7000, 7000)).save(huge, format="PNG")  # 49 MP in a few KB: refused from its header
    cases.append((huge.getvalue(), "image/png", 400, "exceeds the limit of 25,000,000 pixels"))
    tall = io.BytesIO()
    Image.new("1", (2000, 1250)).save(tall, format="PNG")  # 2.5 MP in a few hundred bytes, under the image cap
    many = {"instances": [base64.b64encode(tall.getvalue()).decode()] * 41}  # 102.5 MP: over the request budget
    cases.append((json.dumps(many).encode(), "application/json", 413, "102,500,000 pixels in all (at most 100,0"))
    for body, content_type, status, message in cases:
        got, answer = post(f"{endpoint}/invocations", body, content_type)
        assert (got, answer["error"]["status"]) == (status, status), (message, answer)
        assert message in answer["error"]["message"], (message, answer)
    body = json.dumps({"image": base64.b64encode(jpeg).decode(), "top_k": 1.5}).encode()
    got, answer = post(f"{endpoint}/invocations", body, "application/json")
    assert got == 400 and "whole number" in answer["error"]["message"]
    boundary = "many-parts"
    parts = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="f{i}"; filename="d.jpg"\r\n\r\n'.encode() + b"x\r\n"
        for i in range(65)
    )
    got, answer = post(
        f"{endpoint}/invocations", parts + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"
    )
    assert got == 413 and "files" in answer["error"]["message"]  # at most 64 images a request, as with JSON
    for query in ("top_k=0", "top_k=11", "top_k=two", "logits=maybe"):
        got, answer = post(f"{endpoint}/invocations?{query}", jpeg, "image/jpeg")
        assert got == 400 and query.split("=")[0] in answer["error"]["message"]
    assert post(f"{endpoint}/endpoints/cats/invocations", jpeg, "image/jpeg")[0] == 404
    for url, method in ((f"{endpoint}/nowhere", "GET"), (f"{endpoint}/invocations", "GET")):
        try:
            urllib.request.urlopen(urllib.request.Request(url, method=method), timeout=10)
        except urllib.error.HTTPError as exc:
            assert exc.code in (404, 405) and json.loads(exc.read())["error"]["status"] == exc.code
        else:
            pytest.fail(f"{method} {url} answered 200")


def test_api_key_onnx_backend_and_a_bounded_queue(guarded_endpoint, endpoint, photos, workspace):
    jpeg = photos[2].read_bytes()
    assert post(f"{guarded_endpoint}/invocations", jpeg, "image/jpeg")[0] == 401
    assert post(f"{guarded_endpoint}/invocations", jpeg, "image/jpeg", {"X-API-Key": "wrong-key-123"})[0] == 401
    status, answer = post(f"{guarded_endpoint}/invocations?logits=true", jpeg, "image/jpeg", {"X-API-Key": API_KEY})
    assert status == 200, answer
    status, reference = post(f"{endpoint}/invocations?logits=true", jpeg, "image/jpeg")
    assert np.allclose(answer["predictions"][0]["logits"], reference["predictions"][0]["logits"], atol=1e-4)
    for private in ("/health/ready", "/metrics"):  # they describe the model and its traffic: behind the key
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(f"{guarded_endpoint}{private}", timeout=10)
        assert refused.value.code == 401
    ready = urllib.request.Request(f"{guarded_endpoint}/health/ready", headers={"X-API-Key": API_KEY})
    with urllib.request.urlopen(ready, timeout=10) as response:
        text = response.read().decode()
    model = json.loads(text)["model"]
    assert model["job"] == JOB and str(workspace) not in text  # no path of the server's in an answer
    assert model["backend"] == "onnx" and not list((workspace / JOB / "model").glob("*.onnx"))  # in the cache
    checked = model["checked_against_fp32_eager"]  # before serving, on the job's own photos
    assert checked["mean_cosine"] > 0.9999 and checked["top1_agreement"] == 1.0
    two = json.dumps({"instances": [base64.b64encode(jpeg).decode()] * 2}).encode()
    status, answer = post(
        f"{guarded_endpoint}/invocations", two, "application/json", {"Authorization": f"Bearer {API_KEY}"}
    )
    assert status == 413 and "queues at most 1" in answer["error"]["message"]  # two images can never fit
    by_url = json.dumps({"url": "s3://serving-photos/dog.jpg"}).encode()
    status, answer = post(f"{guarded_endpoint}/invocations", by_url, "application/json", {"X-API-Key": API_KEY})
    assert status == 400 and "fetches no URL" in answer["error"]["message"]  # URL fetches are off by default
    statuses, messages = burst(guarded_endpoint, jpeg, 24, {"X-API-Key": API_KEY})  # a queue of one image
    assert set(statuses) == {200, 503}, statuses  # some served, the rest refused at once, nothing else
    assert all("busy" in m for s, m in zip(statuses, messages, strict=True) if s == 503)


# -- load, metrics, readiness ----------------------------------------------------------------------------


def test_a_burst_of_concurrent_requests_is_batched_without_errors(endpoint, photos):
    import httpx

    def metric(text: str, name: str) -> float:
        return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " "))

    before = httpx.get(f"{endpoint}/metrics").text

    async def burst() -> list[int]:
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(timeout=120) as client:

            async def one(i: int) -> int:
                async with limit:
                    photo = photos[i % len(photos)]
                    response = await client.post(
                        f"{endpoint}/invocations", content=photo.read_bytes(), headers={"Content-Type": "image/jpeg"}
                    )
                    return response.status_code

            return await asyncio.gather(*(one(i) for i in range(64)))

    assert asyncio.run(burst()) == [200] * 64
    after = httpx.get(f"{endpoint}/metrics").text
    images = metric(after, "imgtune_images_total") - metric(before, "imgtune_images_total")
    batches = metric(after, "imgtune_batch_size_count") - metric(before, "imgtune_batch_size_count")
    assert images == 64 and batches < 64  # concurrent requests shared forward passes
    assert 'imgtune_requests_total{route="/invocations",status="200"}' in after
    assert "imgtune_request_latency_seconds_bucket" in after and "imgtune_model_ready 1.0" in after


@pytest.mark.ray
def test_two_replicas_on_ray_serve_answer_as_one_process_and_share_the_load(workspace, endpoint, photos, tmp_path):
    """`imgtune deploy --replicas 2` on an in-process Ray: the same routes (SageMaker and v2) and answers as the
    single process, the images spread over both replicas, and /metrics counting them per replica."""
    import httpx

    def answers(url: str) -> list[dict]:
        async def all_of_them() -> list[httpx.Response]:
            limit = asyncio.Semaphore(8)
            async with httpx.AsyncClient(timeout=120) as client:

                async def one(i: int) -> httpx.Response:
                    async with limit:
                        return await client.post(
                            f"{url}/invocations?logits=true&top_k=3",
                            content=photos[i % len(photos)].read_bytes(),
                            headers={"Content-Type": "image/jpeg"},
                        )

                return await asyncio.gather(*(one(i) for i in range(40)))

        responses = asyncio.run(all_of_them())
        assert [r.status_code for r in responses] == [200] * 40, responses[0].text
        return [r.json()["predictions"][0] for r in responses]

    single = answers(endpoint)
    log = tmp_path / "replicas.log"
    with deploy(workspace, log, "--replicas", "2") as url:
        for _ in range(600):  # /ping answers once one replica does; the line comes once both are up
            if "with 2 model replicas" in log.read_text():
                break
            time.sleep(0.1)
        replicated = answers(url)
        ready = httpx.get(f"{url}/health/ready").json()
        image = base64.b64encode(photos[0].read_bytes()).decode()
        v2_answer = httpx.post(
            f"{url}/v2/models/{JOB}/infer",
            json={"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [image]}]},
        ).json()
        refused = httpx.post(f"{url}/invocations", content=b"not a photo", headers={"Content-Type": "image/jpeg"})
        metrics = httpx.get(f"{url}/metrics").text
    for one, other in zip(single, replicated, strict=True):
        assert [c["label"] for c in one["classes"]] == [c["label"] for c in other["classes"]]
        assert np.allclose(one["logits"], other["logits"], atol=1e-4)
    per_replica = {
        line.split('replica="')[1].split('"')[0]: float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith("imgtune_replica_images_total{")
    }
    assert len(per_replica) == 2 and all(count > 0 for count in per_replica.values()), per_replica
    assert sum(per_replica.values()) == 41  # the 40 above and the v2 request
    assert ready["status"] == "ready" and ready["model"]["job"] == JOB
    assert v2_answer["outputs"][0]["data"][0] == single[0]["classes"][0]["label"]
    assert refused.status_code == 400 and "not an image" in refused.json()["error"]["message"]


def test_ping_answers_200_only_once_the_model_is_loaded(workspace):
    from fastapi.testclient import TestClient

    from imgtune.serving.app import create_app

    release = threading.Event()

    def load_when_released() -> Predictor:
        assert release.wait(60)
        return Predictor.load(JOB, workspace=workspace)

    with TestClient(create_app(load_when_released)) as client:
        assert client.get("/health/live").status_code == 200
        loading = client.get("/ping")
        assert loading.status_code == 503 and loading.json()["error"]["message"] == "the model is loading"
        assert client.post("/invocations", content=b"x", headers={"Content-Type": "image/jpeg"}).status_code == 503
        release.set()
        for _ in range(200):
            if client.get("/ping").status_code == 200:
                break
            threading.Event().wait(0.05)
        assert client.get("/ping").json() == {"status": "ready"}
        assert client.get("/health/ready").json()["model"]["classes"] == 10

    def broken() -> Predictor:
        return Predictor.load("no-such-job", workspace=workspace)

    with TestClient(create_app(broken)) as client:
        for _ in range(200):
            failed = client.get("/ping")
            if "failed" in failed.text:
                break
            threading.Event().wait(0.05)
        assert failed.status_code == 503 and "no job 'no-such-job'" in failed.json()["error"]["message"]


# -- the web page ----------------------------------------------------------------------------------------


@pytest.mark.browser
def test_the_web_page_classifies_an_uploaded_photo_in_chromium(endpoint, predictor, photos):
    from browser import artifacts_dir, chromium_page

    photo = photos[3]
    with Image.open(photo) as image:
        expected = [c["label"] for c in predictor.predict([image], 5)[0]]
    with chromium_page(900, 900) as (page, errors, requests):
        page.goto(endpoint + "/")
        page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
        page.set_input_files("#file", str(photo))
        page.wait_for_selector(".result")
        labels = page.locator(".result .label").all_inner_texts()
        percentages = page.locator(".result .pct").all_inner_texts()
        page.screenshot(path=str(artifacts_dir() / "endpoint-page.png"), full_page=True)
        page.set_input_files("#file", str(Path(__file__)))  # not an image: the page shows the reason
        page.wait_for_function("document.getElementById('error').textContent.length > 0")
        error_text = page.locator("#error").inner_text()
    assert len(errors) <= 1 and all("status of 415" in e for e in errors)  # only the refused upload's status
    assert all(url.startswith(endpoint) or url.startswith(("blob:", "data:")) for url in requests)  # offline
    assert labels == expected
    assert len(percentages) == 5 and all(p.endswith("%") for p in percentages)
    assert "unsupported content type" in error_text or "not an image" in error_text


# -- clients ---------------------------------------------------------------------------------------------


def test_predict_in_process_and_against_the_endpoint(endpoint, workspace, photos, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(photos[0].read_bytes()[:2000])
    files = [str(p) for p in photos[:2]] + [str(broken)]
    local = runner.invoke(
        app, ["predict", *files, "--job", JOB, "--workspace", str(workspace), "--top-k", "3", "--json"]
    )
    remote = runner.invoke(app, ["predict", *files, "--endpoint", endpoint, "--top-k", "3", "--json"])
    assert local.exit_code == remote.exit_code == 1  # one file was bad: reported, the others classified
    local_results, remote_results = json.loads(local.stdout), json.loads(remote.stdout)
    for mine, theirs in zip(local_results[:2], remote_results[:2], strict=True):
        assert [c["id"] for c in mine["classes"]] == [c["id"] for c in theirs["classes"]]
        assert np.allclose(
            [c["probability"] for c in mine["classes"]], [c["probability"] for c in theirs["classes"]], atol=1e-5
        )
    assert "truncated" in local_results[2]["error"] and "truncated" in remote_results[2]["error"]
    table = runner.invoke(app, ["predict", files[0], "--job", JOB, "--workspace", str(workspace)])
    assert table.exit_code == 0 and "probability" in table.stdout
    neither = runner.invoke(app, ["predict", files[0]])
    assert neither.exit_code == 2 and "--job JOB or --endpoint URL" in neither.output
    down = runner.invoke(app, ["predict", files[0], "--endpoint", "http://127.0.0.1:9"])
    assert down.exit_code == 2 and "cannot reach" in down.output


def test_batch_transform_reports_bad_files_and_resumes(workspace, predictor, tmp_path, dogs_mini):
    make_bad_dataset(tmp_path / "bad", dogs_mini, per_class=2)
    source = tmp_path / "bad" / "train"
    files = sorted(str(p) for p in source.rglob("*") if p.is_file())
    output = tmp_path / "out" / "predictions.csv"
    args = ["batch-transform", JOB, str(source), "--output", str(output), "--workspace", str(workspace), "--json"]
    first = runner.invoke(app, [*args, "--batch-size", "4"])
    assert first.exit_code == 0, first.output
    summary = json.loads(first.stdout)
    assert summary["files"] == len(files) and summary["failed"] >= 5  # truncated, gif, text, empty, bomb, ...
    assert summary["predicted"] + summary["failed"] == len(files)
    import csv

    rows = list(csv.DictReader(output.open()))
    assert sorted(r["file"] for r in rows) == files
    good = next(r for r in rows if r["status"] == "ok")
    with Image.open(good["file"]) as image:
        assert json.loads(good["top_k"])[0]["id"] == predictor.predict([image], 1)[0][0]["id"]
    assert {r["error"].split(":")[0] for r in rows if r["status"] == "error"} >= {"truncated image", "zero-byte file"}
    # a run killed mid-write: keep 4 rows and half a line; started again, it does only the rest
    lines = output.read_text().splitlines(keepends=True)
    output.write_text("".join(lines[:5]) + lines[5][:10])
    again = json.loads(runner.invoke(app, [*args]).stdout)
    assert again["already_done"] == 4 and again["predicted"] + again["failed"] == len(files) - 4
    rows_again = list(csv.DictReader(output.open()))
    assert sorted(r["file"] for r in rows_again) == files  # every file once: no duplicate, no loss
    bad_output = runner.invoke(
        app, ["batch-transform", JOB, str(source), "--output", "x.txt", "--workspace", str(workspace)]
    )
    assert bad_output.exit_code == 2 and ".csv or .jsonl" in bad_output.output


def test_batch_transform_from_s3_to_json_lines(workspace, s3_client, photos, tmp_path):
    s3_client.create_bucket(Bucket="serving-batch")
    for photo in photos:
        s3_client.put_object(Bucket="serving-batch", Key=f"incoming/{photo.name}", Body=photo.read_bytes())
    s3_client.put_object(Bucket="serving-batch", Key="incoming/readme.txt", Body=b"not a photo")
    output = tmp_path / "predictions.jsonl"
    result = runner.invoke(
        app,
        [
            "batch-transform",
            JOB,
            "s3://serving-batch/incoming",
            "-o",
            str(output),
            "--workspace",
            str(workspace),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    records = [json.loads(line) for line in output.read_text().splitlines()]
    assert len(records) == len(photos) + 1
    assert {r["file"] for r in records} == {f"s3://serving-batch/incoming/{p.name}" for p in photos} | {
        "s3://serving-batch/incoming/readme.txt"
    }
    assert next(r for r in records if r["file"].endswith("readme.txt"))["error"].startswith("not an image")
    assert all(len(r["classes"]) == 5 for r in records if r["status"] == "ok")


def malformed_requests(jpeg: bytes) -> list[tuple[str, str, str, bytes, dict[str, str]]]:
    """(what, method, path and query, body, headers) of requests a client should never send, and an endpoint must
    answer with a 4xx JSON error: bodies, JSON shapes, options, headers, content types, multipart."""
    b64 = base64.b64encode(jpeg).decode()
    as_json = {"Content-Type": "application/json"}

    def doc(value: object) -> bytes:
        return json.dumps(value).encode()

    def multipart(boundary: str, *parts: bytes) -> bytes:
        return b"".join(f"--{boundary}\r\n".encode() + p + b"\r\n" for p in parts) + f"--{boundary}--\r\n".encode()

    file_part = b'Content-Disposition: form-data; name="file"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    form = {"Content-Type": "multipart/form-data; boundary=xyz"}
    return [
        ("JSON nested 100,000 deep", "POST", "/invocations", b"[" * 100_000 + b"]" * 100_000, as_json),
        ("JSON object nested deep", "POST", "/invocations", b'{"a":' * 50_000 + b"1" + b"}" * 50_000, as_json),
        ("top_k 1e400", "POST", "/invocations", b'{"image": "%s", "top_k": 1e400}' % b64.encode(), as_json),
        ("top_k NaN", "POST", "/invocations", b'{"image": "%s", "top_k": NaN}' % b64.encode(), as_json),
        ("top_k -Infinity", "POST", "/invocations", b'{"image": "%s", "top_k": -Infinity}' % b64.encode(), as_json),
        ("top_k 1e308", "POST", "/invocations", doc({"image": b64, "top_k": 1e308}), as_json),
        ("top_k a list", "POST", "/invocations", doc({"image": b64, "top_k": [1]}), as_json),
        ("top_k an object", "POST", "/invocations", doc({"image": b64, "top_k": {"k": 1}}), as_json),
        ("top_k negative", "POST", "/invocations", doc({"image": b64, "top_k": -3}), as_json),
        ("logits a list", "POST", "/invocations", doc({"image": b64, "logits": [True]}), as_json),
        ("instances a string", "POST", "/invocations", doc({"instances": "abc"}), as_json),
        ("instances empty", "POST", "/invocations", doc({"instances": []}), as_json),
        ("instances of numbers", "POST", "/invocations", doc({"instances": [1, 2]}), as_json),
        ("instances of lists", "POST", "/invocations", doc({"instances": [[b64]]}), as_json),
        ("image a number", "POST", "/invocations", doc({"image": 5}), as_json),
        ("image null", "POST", "/invocations", doc({"image": None}), as_json),
        ("image not an image", "POST", "/invocations", doc({"image": base64.b64encode(b"hello").decode()}), as_json),
        ("url a number", "POST", "/invocations", doc({"url": 7}), as_json),
        ("url empty", "POST", "/invocations", doc({"url": ""}), as_json),
        ("url s3 without a key", "POST", "/invocations", doc({"url": "s3://"}), as_json),
        ("JSON an array", "POST", "/invocations", doc([b64]), as_json),
        ("JSON a string", "POST", "/invocations", doc(b64), as_json),
        ("JSON null", "POST", "/invocations", b"null", as_json),
        ("JSON not UTF-8", "POST", "/invocations", b"\xff\xfe{\x00", as_json),
        ("JSON empty", "POST", "/invocations", b"", as_json),
        ("a data URL of garbage", "POST", "/invocations", doc({"image": "data:image/png;base64,***"}), as_json),
        ("content type unknown", "POST", "/invocations", jpeg, {"Content-Type": "application/x-whatever"}),
        ("content type empty", "POST", "/invocations", jpeg, {"Content-Type": ""}),
        ("content type garbage", "POST", "/invocations", jpeg, {"Content-Type": ";;;==="}),
        ("an image of random bytes", "POST", "/invocations", bytes(range(256)) * 40, {"Content-Type": "image/png"}),
        (
            "gzip claimed, not gzip",
            "POST",
            "/invocations",
            b"\x1f\x8b garbage",
            {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"},
        ),  # fmt: skip
        ("multipart without a boundary", "POST", "/invocations", jpeg, {"Content-Type": "multipart/form-data"}),
        ("multipart, another boundary", "POST", "/invocations", multipart("abc", file_part + jpeg), form),
        ("multipart, empty", "POST", "/invocations", b"", form),
        (
            "multipart, a text field only",
            "POST",
            "/invocations",
            multipart("xyz", b'Content-Disposition: form-data; name="top_k"\r\n\r\n3'),
            form,
        ),  # fmt: skip
        ("multipart, cut short", "POST", "/invocations", multipart("xyz", file_part + jpeg)[:-40], form),
        ("multipart, a file that is not an image", "POST", "/invocations", multipart("xyz", file_part + b"oops"), form),
        (
            "CustomAttributes top_k=abc",
            "POST",
            "/invocations",
            jpeg,
            {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "top_k=abc"},
        ),  # fmt: skip
        (
            "CustomAttributes top_k=1e400",
            "POST",
            "/invocations",
            jpeg,
            {"Content-Type": "image/jpeg", "X-Amzn-SageMaker-Custom-Attributes": "top_k=1e400"},
        ),  # fmt: skip
        ("query top_k with a NUL", "POST", "/invocations?top_k=%00", jpeg, {"Content-Type": "image/jpeg"}),
        ("query logits=2", "POST", "/invocations?logits=2", jpeg, {"Content-Type": "image/jpeg"}),
        ("PUT", "PUT", "/invocations", jpeg, {"Content-Type": "image/jpeg"}),
        ("another endpoint's name", "POST", "/endpoints/cats/invocations", jpeg, {"Content-Type": "image/jpeg"}),
    ]


def test_a_fuzz_of_malformed_requests_gets_4xx_json_errors_and_the_server_lives_on(endpoint, photos):
    import re

    import httpx

    jpeg = photos[0].read_bytes()
    cases = malformed_requests(jpeg)
    assert len(cases) >= 30
    internals = re.compile(r"Traceback|File \"|/(?:tmp|root|home|work|usr|etc)/|Error:|Exception")
    with httpx.Client(timeout=60) as client:
        for what, method, path, body, headers in cases:
            answer = client.request(method, endpoint + path, content=body, headers=headers)
            assert 400 <= answer.status_code < 500, (what, answer.status_code, answer.text[:300])
            message = answer.json()["error"]["message"]
            assert not internals.search(message), (what, message)
        assert client.get(f"{endpoint}/ping").status_code == 200
        alive = client.post(f"{endpoint}/invocations", content=jpeg, headers={"Content-Type": "image/jpeg"})
        assert alive.status_code == 200 and alive.json()["predictions"][0]["classes"]


def test_deadlines_and_a_dead_batch_worker(workspace, photos):
    import socket

    from imgtune.config import ServeOptions
    from imgtune.serving.server import BackgroundEndpoint

    jpeg = photos[0].read_bytes()
    # a batch waits up to 3 s to fill, a request may take 1.5 s: 504; a body must arrive within 0.5 s: 408
    options = ServeOptions(max_batch_delay_ms=3000, request_timeout_s=1.5, body_timeout_s=0.5)
    with BackgroundEndpoint(workspace / JOB, options) as served:
        status, answer = post(f"{served.url}/invocations", jpeg, "image/jpeg")
        assert status == 504 and "no answer within 1.5 s" in answer["error"]["message"]
        with socket.create_connection((served.host, served.port), timeout=10) as connection:
            connection.sendall(
                b"POST /invocations HTTP/1.1\r\nHost: x\r\nContent-Type: image/jpeg\r\n"
                b"Content-Length: 100000\r\n\r\n" + jpeg[:100]
            )  # and then nothing more
            reply = b""
            while b"did not arrive" not in reply:
                chunk = connection.recv(4096)
                if not chunk:
                    break
                reply += chunk
            reply = reply.decode(errors="replace")
        assert reply.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in reply
        endpoint = served.server.config.app.state.endpoint
        task = endpoint.batcher.task
        task.get_loop().call_soon_threadsafe(task.cancel)  # the batch worker dies
        deadline = time.monotonic() + 10
        while endpoint.batcher.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        for probe in ("/ping", "/health/ready"):
            with pytest.raises(urllib.error.HTTPError) as unready:
                urllib.request.urlopen(f"{served.url}{probe}", timeout=10)
            assert unready.value.code == 503 and "batch worker has stopped" in unready.value.read().decode()
