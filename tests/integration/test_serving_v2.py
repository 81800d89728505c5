"""The endpoint's Open Inference Protocol v2 routes (KServe v2, Triton's HTTP/REST API) on a model trained on
dogs-mini, asked with NVIDIA's own client (tritonclient.http) and with raw HTTP, against the same server's
SageMaker route.

The server is real: `imgtune deploy` as a subprocess running uvicorn on 127.0.0.1, with an API key.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from servers import running_server

pytestmark = [pytest.mark.slow]

JOB = "dogs"
API_KEY = "v2-test-key-123"
KEY = {"X-API-Key": API_KEY}  # tritonclient adds headers to the dict it is given: it gets key(), a copy
INTERNALS = re.compile(r"Traceback|File \"|/(?:tmp|root|home|work|usr|etc)/|Error:|Exception")


def key() -> dict[str, str]:
    return dict(KEY)


@pytest.fixture(scope="module")
def workspace(dogs_workspace) -> Path:
    """The session's workspace holding `dogs` (frozen MobileNetV2, 3 epochs on dogs-mini; tests/conftest.py)."""
    return dogs_workspace


@pytest.fixture(scope="module")
def photos(dogs_mini) -> list[Path]:
    """One test photo from each of 5 classes."""
    classes = sorted(p for p in (dogs_mini / "test").iterdir() if p.is_dir())[:5]
    return [sorted(c.iterdir())[0] for c in classes]


@pytest.fixture(scope="module")
def endpoint(workspace, tmp_path_factory) -> str:
    """`imgtune deploy dogs --api-key ...`: both protocols, one server, one key."""
    log = tmp_path_factory.mktemp("deploy-v2") / "server.log"
    command = lambda port: [  # noqa: E731
        sys.executable, "-m", "imgtune", "deploy", JOB, "--workspace", str(workspace), "--port", str(port),
        "--backend", "torch", "--api-key", API_KEY,
    ]  # fmt: skip
    with running_server(command, "/ping", log, ready_status=200) as url:
        yield url


@pytest.fixture()
def client(endpoint):
    import tritonclient.http as httpclient

    triton = httpclient.InferenceServerClient(url=endpoint.removeprefix("http://"), network_timeout=120)
    yield triton
    triton.close()


def sagemaker_answers(endpoint: str, photos: list[Path], top_k: int) -> list[list[dict]]:
    """The SageMaker route's top-k classes for each photo, from one JSON request."""
    import httpx

    body = {"instances": [base64.b64encode(p.read_bytes()).decode() for p in photos], "top_k": top_k}
    answer = httpx.post(f"{endpoint}/invocations", json=body, headers=KEY, timeout=120)
    assert answer.status_code == 200, answer.text
    return [prediction["classes"] for prediction in answer.json()["predictions"]]


def assert_same_answers(result, expected: list[list[dict]]) -> None:
    labels, index, probability = (result.as_numpy(name) for name in ("label", "index", "probability"))
    shape = (len(expected), len(expected[0]))
    assert labels.shape == index.shape == probability.shape == shape
    assert index.dtype == np.int64 and probability.dtype == np.float32
    assert index.tolist() == [[c["index"] for c in row] for row in expected]
    text = [[v.decode() if isinstance(v, bytes) else v for v in row] for row in labels]  # binary: bytes; JSON: str
    assert text == [[c["label"] for c in row] for row in expected]
    assert np.allclose(probability, [[c["probability"] for c in row] for row in expected], atol=1e-5)


# -- health and metadata ---------------------------------------------------------------------------------


def test_health_metadata_and_readiness_through_tritonclient(client, endpoint):
    import httpx
    from tritonclient.utils import InferenceServerException

    assert client.is_server_live() and client.is_server_ready()  # probes: no key needed
    assert httpx.get(f"{endpoint}/v2/health/live").json() == {"live": True}
    assert httpx.get(f"{endpoint}/v2/health/ready").json() == {"ready": True}
    assert client.is_model_ready(JOB, headers=key()) and client.is_model_ready(JOB, "1", headers=key())
    expected = {
        "name": JOB,
        "versions": ["1"],
        "platform": "imgtune",
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [-1]}],
        "outputs": [
            {"name": "label", "datatype": "BYTES", "shape": [-1, -1]},
            {"name": "index", "datatype": "INT64", "shape": [-1, -1]},
            {"name": "probability", "datatype": "FP32", "shape": [-1, -1]},
        ],
    }
    assert client.get_model_metadata(JOB, headers=key()) == expected
    assert client.get_model_metadata(JOB, "1", headers=key()) == expected
    server = client.get_server_metadata(headers=key())
    assert server["name"] == "imgtune" and "binary_tensor_data" in server["extensions"]
    for name, version, message in (("cats", "", "no model named 'cats'"), (JOB, "2", "has one version, '1'")):
        with pytest.raises(InferenceServerException) as unknown:
            client.get_model_metadata(name, version, headers=key())
        assert unknown.value.status() == "404" and message in unknown.value.message()
    assert not client.is_model_ready("cats", headers=key())


# -- inference -------------------------------------------------------------------------------------------


def test_json_and_binary_inference_equal_the_sagemaker_route(client, endpoint, photos):
    import tritonclient.http as httpclient

    images = [p.read_bytes() for p in photos]
    expected = sagemaker_answers(endpoint, photos, 3)
    for binary in (False, True):
        # in JSON, BYTES elements are base64 text; in binary, the raw image bytes
        data = images if binary else [base64.b64encode(image) for image in images]
        tensor = httpclient.InferInput("image", [len(images)], "BYTES")
        tensor.set_data_from_numpy(np.array(data, dtype=np.object_), binary_data=binary)
        outputs = [httpclient.InferRequestedOutput(n, binary_data=binary) for n in ("label", "index", "probability")]
        result = client.infer(
            JOB, [tensor], outputs=outputs, request_id=f"r-{binary}", parameters={"top_k": 3}, headers=key()
        )
        response = result.get_response()
        assert response["model_name"] == JOB and response["model_version"] == "1" and response["id"] == f"r-{binary}"
        assert all(("data" in o) != binary for o in response["outputs"])  # each output as it was asked for
        assert_same_answers(result, expected)
    # no outputs named: all three, in binary (tritonclient's default); shape [N, 1]; the default top_k is 5;
    # gzip-compressed request bodies
    tensor = httpclient.InferInput("image", [2, 1], "BYTES")
    tensor.set_data_from_numpy(np.array(images[:2], dtype=np.object_).reshape(2, 1))
    result = client.infer(JOB, [tensor], model_version="1", headers=key(), request_compression_algorithm="gzip")
    assert_same_answers(result, sagemaker_answers(endpoint, photos[:2], 5))
    only = client.infer(JOB, [tensor], outputs=[httpclient.InferRequestedOutput("index")], headers=key())
    assert [o["name"] for o in only.get_response()["outputs"]] == ["index"] and only.as_numpy("label") is None


def test_plain_http_json_as_in_the_readme(endpoint, photos):
    import httpx

    encoded = base64.b64encode(photos[0].read_bytes()).decode()
    request = {
        "inputs": [{"name": "image", "datatype": "BYTES", "shape": [2], "data": [encoded, {"b64": encoded}]}],
        "parameters": {"top_k": 2},
    }
    answer = httpx.post(f"{endpoint}/v2/models/{JOB}/infer", json=request, headers=KEY, timeout=120)
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/json", answer.text
    outputs = {o["name"]: o for o in answer.json()["outputs"]}
    assert list(outputs) == ["label", "index", "probability"] and "id" not in answer.json()
    expected = sagemaker_answers(endpoint, photos[:1], 2)[0]
    assert outputs["index"] == {
        "name": "index", "datatype": "INT64", "shape": [2, 2], "data": [c["index"] for c in expected] * 2
    }  # fmt: skip
    assert outputs["label"]["data"] == [c["label"] for c in expected] * 2
    assert np.allclose(outputs["probability"]["data"], [c["probability"] for c in expected] * 2, atol=1e-5)
    metrics = httpx.get(f"{endpoint}/metrics", headers=KEY).text
    assert 'imgtune_requests_total{route="/v2/models/{name}/infer",status="200"}' in metrics


# -- refusals --------------------------------------------------------------------------------------------


def test_the_api_key_guards_everything_but_the_probes(endpoint, photos):
    import httpx

    encoded = base64.b64encode(photos[0].read_bytes()).decode()
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [encoded]}]}
    with httpx.Client(timeout=60) as http:
        for headers in ({}, {"X-API-Key": "wrong-key-456"}):
            for method, path in (
                ("GET", "/v2"), ("GET", f"/v2/models/{JOB}"), ("GET", f"/v2/models/{JOB}/ready"),
                ("GET", "/v2/models/cats"), ("POST", f"/v2/models/{JOB}/infer"),
                ("POST", f"/v2/models/{JOB}/versions/1/infer"),
            ):  # fmt: skip
                answer = http.request(method, endpoint + path, json=request, headers=headers)
                assert answer.status_code == 401, (path, answer.text)
                assert "API key" in answer.json()["error"]  # v2's error shape: a string
        assert http.get(f"{endpoint}/v2/health/live").status_code == 200
        assert http.get(f"{endpoint}/v2/health/ready").status_code == 200
        bearer = {"Authorization": f"Bearer {API_KEY}"}
        assert http.post(f"{endpoint}/v2/models/{JOB}/infer", json=request, headers=bearer).status_code == 200


def malformed_v2_requests(jpeg: bytes) -> list[tuple[str, str, str, bytes, dict[str, str]]]:
    """(what, method, path, body, headers) of v2 requests that must get a 4xx JSON error."""
    b64 = base64.b64encode(jpeg).decode()
    infer = f"/v2/models/{JOB}/infer"

    def doc(value: object) -> bytes:
        return json.dumps(value).encode()

    def image(**tensor: object) -> dict:
        return {"name": "image", "datatype": "BYTES", "shape": [1], "data": [b64], **tensor}

    def binary(header: dict, data: bytes, length: int | None = None) -> tuple[bytes, dict[str, str]]:
        text = doc(header)
        size = str(len(text) if length is None else length)
        return text + data, {"Inference-Header-Content-Length": size}

    def element(data: bytes) -> bytes:
        return len(data).to_bytes(4, "little") + data

    def sized(size: object) -> dict:
        return {
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": size}}]
        }

    raw = element(jpeg)
    one = sized(len(raw))
    plain = doc({"inputs": [image()]})
    both = {"inputs": [image(parameters={"binary_data_size": len(raw)})]}  # data and binary data
    gzipped = {"Content-Encoding": "gzip"}
    cases: list[tuple[str, str, str, bytes, dict[str, str]]] = [
        ("not JSON", "POST", infer, b"{nope", {}),
        ("JSON nested 100,000 deep", "POST", infer, b"[" * 100_000 + b"]" * 100_000, {}),
        ("JSON an array", "POST", infer, doc([image()]), {}),
        ("JSON not UTF-8", "POST", infer, b"\xff\xfe{", {}),
        ("empty body", "POST", infer, b"", {}),
        ("no inputs", "POST", infer, doc({}), {}),
        ("inputs empty", "POST", infer, doc({"inputs": []}), {}),
        ("inputs an object", "POST", infer, doc({"inputs": image()}), {}),
        ("an input without a name", "POST", infer, doc({"inputs": [{"datatype": "BYTES"}]}), {}),
        ("an unknown input", "POST", infer, doc({"inputs": [image(name="pixels")]}), {}),
        ("the input twice", "POST", infer, doc({"inputs": [image(), image()]}), {}),
        ("datatype FP32", "POST", infer, doc({"inputs": [image(datatype="FP32")]}), {}),
        ("datatype missing", "POST", infer, doc({"inputs": [image(datatype=None)]}), {}),
        ("shape empty", "POST", infer, doc({"inputs": [image(shape=[])]}), {}),
        ("shape [0]", "POST", infer, doc({"inputs": [image(shape=[0], data=[])]}), {}),
        ("shape of strings", "POST", infer, doc({"inputs": [image(shape=["1"])]}), {}),
        ("shape [1, 3]", "POST", infer, doc({"inputs": [image(shape=[1, 3])]}), {}),
        ("shape [true]", "POST", infer, doc({"inputs": [image(shape=[True])]}), {}),
        ("shape says 2, data has 1", "POST", infer, doc({"inputs": [image(shape=[2])]}), {}),
        ("65 images", "POST", infer, doc({"inputs": [image(shape=[65], data=[b64] * 65)]}), {}),
        ("data a string", "POST", infer, doc({"inputs": [image(data=b64)]}), {}),
        ("data not base64", "POST", infer, doc({"inputs": [image(data=["***"])]}), {}),
        ("data a number", "POST", infer, doc({"inputs": [image(data=[7])]}), {}),
        ("data empty string", "POST", infer, doc({"inputs": [image(data=[""])]}), {}),
        ("data nested too deep", "POST", infer, doc({"inputs": [image(data=[[[b64]]])]}), {}),
        ("data not an image", "POST", infer, doc({"inputs": [image(data=["aGVsbG8="])]}), {}),
        ("no data", "POST", infer, doc({"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}]}), {}),
        ("shared memory", "POST", infer, doc({"inputs": [image(parameters={"shared_memory_region": "r"})]}), {}),
        ("parameters a list", "POST", infer, doc({"inputs": [image()], "parameters": [1]}), {}),
        ("id a number", "POST", infer, doc({"inputs": [image()], "id": 5}), {}),
        ("top_k 0", "POST", infer, doc({"inputs": [image()], "parameters": {"top_k": 0}}), {}),
        ("top_k 11", "POST", infer, doc({"inputs": [image()], "parameters": {"top_k": 11}}), {}),
        ("top_k two", "POST", infer, doc({"inputs": [image()], "parameters": {"top_k": "two"}}), {}),
        ("top_k 1e400", "POST", infer, b'{"inputs": [%s], "parameters": {"top_k": 1e400}}' % doc(image()), {}),
        ("top_k NaN", "POST", infer, b'{"inputs": [%s], "parameters": {"top_k": NaN}}' % doc(image()), {}),
        ("outputs unknown", "POST", infer, doc({"inputs": [image()], "outputs": [{"name": "logits"}]}), {}),
        ("outputs a string", "POST", infer, doc({"inputs": [image()], "outputs": "label"}), {}),
        ("output twice", "POST", infer, doc({"inputs": [image()], "outputs": [{"name": "index"}] * 2}), {}),
        (
            "classification extension",
            "POST",
            infer,
            doc({"inputs": [image()], "outputs": [{"name": "label", "parameters": {"classification": 3}}]}),
            {},
        ),  # fmt: skip
        (
            "binary_data not a bool",
            "POST",
            infer,
            doc({"inputs": [image()], "outputs": [{"name": "label", "parameters": {"binary_data": "yes"}}]}),
            {},
        ),  # fmt: skip
        ("binary_data_size without binary", "POST", infer, doc(sized(9)), {}),
        ("header length a word", "POST", infer, binary(one, raw)[0], {"Inference-Header-Content-Length": "ten"}),
        ("header length negative", "POST", infer, binary(one, raw)[0], {"Inference-Header-Content-Length": "-1"}),
        ("header length huge", "POST", infer, binary(one, raw)[0], {"Inference-Header-Content-Length": "9" * 5000}),
        ("header length 0", "POST", infer, *binary(one, raw, 0)),
        ("header length past the body", "POST", infer, *binary(one, raw, 10**9)),
        ("header length cuts the JSON", "POST", infer, *binary(one, raw, 20)),
        ("binary_data_size past the body", "POST", infer, *binary(sized(len(raw) + 100), raw)),
        ("binary_data_size negative", "POST", infer, *binary(sized(-1), raw)),
        ("binary_data_size a string", "POST", infer, *binary(sized("12"), raw)),
        ("bytes after the inputs", "POST", infer, *binary(one, raw + b"extra")),
        ("an element's length cut short", "POST", infer, *binary(sized(len(raw) + 2), raw + b"\x01\x00")),
        ("an element longer than the data", "POST", infer, *binary(sized(8), (100).to_bytes(4, "little") + b"abcd")),
        ("two elements for shape [1]", "POST", infer, *binary(sized(2 * len(raw)), raw + raw)),
        ("data and binary_data_size", "POST", infer, *binary(both, raw)),
        ("Content-Encoding br", "POST", infer, doc({"inputs": [image()]}), {"Content-Encoding": "br"}),
        ("gzip claimed, not gzip", "POST", infer, doc({"inputs": [image()]}), {"Content-Encoding": "gzip"}),
        ("gzip cut short", "POST", infer, gzip.compress(plain)[:-30], gzipped),
        ("gzip bomb", "POST", infer, gzip.compress(b" " * (64 * 1024 * 1024)), {"Content-Encoding": "gzip"}),
        ("body over 6 MB", "POST", infer, b" " * (6 * 1024 * 1024 + 1), {}),
        ("another model", "POST", "/v2/models/cats/infer", doc({"inputs": [image()]}), {}),
        ("another version", "POST", f"/v2/models/{JOB}/versions/2/infer", doc({"inputs": [image()]}), {}),
        ("GET infer", "GET", infer, b"", {}),
        ("an unknown v2 route", "GET", f"/v2/models/{JOB}/config", b"", {}),
        ("repository index", "POST", "/v2/repository/index", b"{}", {}),
    ]  # fmt: skip
    return cases


def test_a_fuzz_of_malformed_v2_requests_gets_4xx_json_errors_and_the_server_lives_on(client, endpoint, photos):
    import httpx
    import tritonclient.http as httpclient

    jpeg = photos[0].read_bytes()
    cases = malformed_v2_requests(jpeg)
    assert len(cases) >= 60
    statuses = {}
    with httpx.Client(timeout=60) as http:
        for what, method, path, body, headers in cases:
            answer = http.request(method, endpoint + path, content=body, headers={**KEY, **headers})
            assert 400 <= answer.status_code < 500, (what, answer.status_code, answer.text[:300])
            message = answer.json()["error"]
            assert isinstance(message, str) and message and not INTERNALS.search(message), (what, message)
            statuses[what] = answer.status_code
    assert statuses["another model"] == statuses["an unknown v2 route"] == 404 and statuses["GET infer"] == 405
    assert statuses["65 images"] == statuses["body over 6 MB"] == statuses["gzip bomb"] == 413
    assert statuses["Content-Encoding br"] == 415 and statuses["data not an image"] == 400
    assert client.is_server_ready() and client.is_model_ready(JOB, headers=key())
    tensor = httpclient.InferInput("image", [1], "BYTES")
    tensor.set_data_from_numpy(np.array([jpeg], dtype=np.object_))
    assert client.infer(JOB, [tensor], headers=key()).as_numpy("index").shape == (1, 5)


def test_readiness_while_loading_deadlines_and_a_dead_batch_worker(workspace, photos):
    from fastapi.testclient import TestClient

    from imgtune.config import ServeOptions
    from imgtune.serving.app import create_app
    from imgtune.serving.predictor import Predictor

    release = threading.Event()

    def load_when_released() -> Predictor:
        assert release.wait(60)
        return Predictor.load(JOB, "torch", workspace=workspace)

    encoded = base64.b64encode(photos[0].read_bytes()).decode()
    request = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1], "data": [encoded]}]}
    # a batch waits up to 3 s to fill, a request may take 1.5 s: 504
    options = ServeOptions(max_batch_delay_ms=3000, request_timeout_s=1.5)
    with TestClient(create_app(load_when_released, options)) as http:
        assert http.get("/v2/health/live").status_code == 200
        loading = http.get("/v2/health/ready")
        assert loading.status_code == 503 and loading.json() == {"ready": False, "error": "the model is loading"}
        assert http.get("/v2/models/any/ready").status_code == 503
        refused = http.post("/v2/models/any/infer", json=request)
        assert refused.status_code == 503 and refused.json() == {"error": "the model is loading"}
        release.set()
        deadline = time.monotonic() + 60
        while http.get("/v2/health/ready").status_code != 200 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert http.get("/v2/models/any/ready").json() == {"name": "any", "ready": True}  # no name set: any
        late = http.post("/v2/models/any/infer", json=request)
        assert late.status_code == 504 and late.json() == {"error": "no answer within 1.5 s; retry later"}
        endpoint = http.app.state.endpoint
        task = endpoint.batcher.task
        task.get_loop().call_soon_threadsafe(task.cancel)  # the batch worker dies
        while endpoint.batcher.alive and time.monotonic() < deadline:
            time.sleep(0.05)
        for probe in ("/v2/health/ready", "/v2/models/any/ready"):
            unready = http.get(probe)
            assert unready.status_code == 503 and "batch worker has stopped" in unready.json()["error"]
        assert http.get("/ping").json()["error"]["status"] == 503  # the SageMaker routes keep their own shape
