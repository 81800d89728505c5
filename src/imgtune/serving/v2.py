"""The Open Inference Protocol v2 (KServe v2, Triton's HTTP/REST API), beside the SageMaker routes.

Routes (NAME is the endpoint's name: the job's, unless --endpoint-name says otherwise; its one version is "1",
and every model route also answers as /v2/models/NAME/versions/1/...):
- `GET /v2/health/live` and `GET /v2/health/ready`: probes, never behind the API key (ready is /ping's answer);
- `GET /v2` (server metadata), `GET /v2/models/NAME` (model metadata), `GET /v2/models/NAME/ready`;
- `POST /v2/models/NAME/infer`.

An inference request has one input, `image`: BYTES, shape [N] or [N, 1], each element one encoded image. In JSON
the elements are base64 strings (or `{"b64": ...}` objects); with Triton's binary tensor data extension (the
`Inference-Header-Content-Length` header says how many bytes of the body are the JSON header) an input whose
`parameters.binary_data_size` is S takes the next S bytes after the header, each element a 4-byte little-endian
length and then its bytes. The outputs are `label` (BYTES, the class's name), `index` (INT64) and `probability`
(FP32), each [N, top_k], most probable first; the request's `parameters.top_k` chooses k with the SageMaker
routes' default and limits (5, at most the model's classes), so both protocols give the same answer. An output
asked for with `parameters.binary_data: true` (or every output, with the request's `binary_data_output: true`)
comes back in binary, after a JSON header whose length the response's Inference-Header-Content-Length gives.

Errors are `{"error": "message"}` with the HTTP status (what tritonclient and KServe's clients read).
"""

from __future__ import annotations

import json
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from imgtune.serving.inputs import MAX_INSTANCES, RequestError, decode_base64, parse_options

if TYPE_CHECKING:
    from imgtune.serving.app import Endpoint

PREFIX = "/v2"
MODEL_VERSION = "1"
PLATFORM = "imgtune"
INPUT = "image"
OUTPUTS = {"label": "BYTES", "index": "INT64", "probability": "FP32"}  # in the metadata's order
HEADER_LENGTH = "Inference-Header-Content-Length"
ENCODINGS = ("identity", "gzip", "deflate")  # request bodies tritonclient may compress


def is_v2(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def model_metadata(name: str) -> dict[str, Any]:
    return {
        "name": name,
        "versions": [MODEL_VERSION],
        "platform": PLATFORM,
        "inputs": [{"name": INPUT, "datatype": "BYTES", "shape": [-1]}],
        "outputs": [{"name": n, "datatype": t, "shape": [-1, -1]} for n, t in OUTPUTS.items()],
    }


# -- requests ----------------------------------------------------------------------------------------------


@dataclass
class RequestedOutput:
    name: str
    binary: bool


@dataclass
class InferRequest:
    images: list[bytes]
    outputs: list[RequestedOutput]
    id: str | None = None
    top_k: Any = None  # as sent: parse_options checks it against the model's classes
    parameters: dict[str, Any] = field(default_factory=dict)


def check_encoding(content_encoding: str | None) -> str:
    encoding = (content_encoding or "identity").strip().lower()
    if encoding not in ENCODINGS:
        raise RequestError(415, f"unsupported Content-Encoding {encoding[:40]!r}; send gzip, deflate or none")
    return encoding


def inflate(body: bytes, encoding: str, limit: int) -> bytes:
    """A gzip or deflate body, uncompressed, at most `limit` bytes (a small body may inflate to gigabytes)."""
    if encoding == "identity":
        return body
    inflater = zlib.decompressobj(16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS)
    try:
        data = inflater.decompress(body, limit + 1)
    except zlib.error:
        raise RequestError(400, f"the body is not valid {encoding} data") from None
    if len(data) > limit:
        raise RequestError(413, f"the body inflates to over {limit:,} bytes (the payload limit)")
    if not inflater.eof:
        raise RequestError(400, f"the {encoding} body is cut short")
    return data


def parse_infer_request(body: bytes, header_length: str | None) -> InferRequest:
    """The images, options and requested outputs of an inference request (JSON, or JSON and binary tensors)."""
    header, binary = _split(body, header_length)
    document = _load_json(header)
    if not isinstance(document, dict):
        raise RequestError(400, 'the inference request must be a JSON object with "inputs"')
    request_id = document.get("id")
    if request_id is not None and not isinstance(request_id, str):
        raise RequestError(400, '"id" must be a string')
    parameters = _object(document.get("parameters"), '"parameters"')
    binary_output = parameters.get("binary_data_output", False)
    if not isinstance(binary_output, bool):
        raise RequestError(400, "parameters.binary_data_output must be true or false")
    inputs = document.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise RequestError(400, f'"inputs" must be a non-empty list holding the input {INPUT!r}')
    images: list[bytes] | None = None
    offset = 0  # into the binary part: inputs take their bytes in order
    for tensor in inputs:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise RequestError(400, 'every input must be an object with a "name"')
        if tensor["name"] != INPUT:
            raise RequestError(
                400, f"unknown input {tensor['name'][:64]!r}: this model has one input, {INPUT!r} (BYTES, shape [N])"
            )
        if images is not None:
            raise RequestError(400, f"the input {INPUT!r} is given twice")
        images, offset = _input_images(tensor, binary, offset)
    if offset != len(binary):
        raise RequestError(400, f"{len(binary) - offset:,} bytes after the JSON header belong to no input")
    assert images is not None
    return InferRequest(
        images=images,
        outputs=_requested_outputs(document.get("outputs"), binary_output),
        id=request_id,
        top_k=parameters.get("top_k"),
        parameters=parameters,
    )


def _split(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    if header_length is None:
        return body, b""
    text = header_length.strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 12):
        raise RequestError(400, f"{HEADER_LENGTH} must be a whole number of bytes, not {text[:40]!r}")
    length = int(text)
    if not 0 < length <= len(body):
        raise RequestError(400, f"{HEADER_LENGTH} is {length:,} but the body is {len(body):,} bytes")
    return body[:length], body[length:]


def _load_json(header: bytes) -> Any:
    try:
        return json.loads(header)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise RequestError(400, f"the inference request is not valid JSON: {exc}") from None
    except RecursionError:
        raise RequestError(400, "the inference request's JSON is nested too deeply") from None


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise RequestError(400, f"{where} must be an object")
    return value


def _whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _input_images(tensor: dict[str, Any], binary: bytes, offset: int) -> tuple[list[bytes], int]:
    """The input's images, and the offset of the next input's binary data."""
    where = f"input {INPUT!r}"
    datatype = tensor.get("datatype")
    if datatype != "BYTES":
        given = "(none)" if datatype is None else repr(str(datatype)[:40])
        raise RequestError(400, f"{where} must be BYTES (each element an encoded image), not {given}")
    shape = tensor.get("shape")
    if (
        not isinstance(shape, list)
        or len(shape) not in (1, 2)
        or not all(_whole(d) for d in shape)
        or shape[0] < 1
        or (len(shape) == 2 and shape[1] != 1)
    ):
        raise RequestError(400, f"{where} must have shape [N] or [N, 1] with N >= 1, not {str(shape)[:40]}")
    count = shape[0]
    if count > MAX_INSTANCES:
        raise RequestError(413, f"{count} images in one request (at most {MAX_INSTANCES})")
    parameters = _object(tensor.get("parameters"), f"{where}'s parameters")
    if any(key.startswith("shared_memory") for key in parameters):
        raise RequestError(400, "shared memory is not supported: send the tensor in the body")
    size = parameters.get("binary_data_size")
    if size is not None and "data" in tensor:
        raise RequestError(400, f'{where} has both "data" and parameters.binary_data_size: send one')
    if size is not None:
        if not _whole(size) or size < 0:
            raise RequestError(400, f"{where}: binary_data_size must be a whole number of bytes")
        if offset + size > len(binary):
            raise RequestError(
                400, f"{where}: binary_data_size is {size:,} but {len(binary) - offset:,} bytes follow the JSON header"
            )
        images = _binary_elements(binary[offset : offset + size], where)
        offset += size
    elif "data" in tensor:
        images = _json_elements(tensor["data"], count, where)
    else:
        raise RequestError(400, f'{where} has no "data" and no parameters.binary_data_size')
    if len(images) != count:
        raise RequestError(400, f"{where} has shape {shape} but holds {len(images)} element(s)")
    return images, offset


def _binary_elements(buffer: bytes, where: str) -> list[bytes]:
    """Triton's BYTES serialization: each element a 4-byte little-endian length, then its bytes."""
    elements: list[bytes] = []
    position = 0
    while position < len(buffer):
        number = len(elements) + 1
        if position + 4 > len(buffer):
            raise RequestError(400, f"{where}: element {number}'s 4-byte length is cut short")
        size = int.from_bytes(buffer[position : position + 4], "little")
        position += 4
        if position + size > len(buffer):
            raise RequestError(
                400, f"{where}: element {number} says {size:,} bytes but {len(buffer) - position:,} remain"
            )
        elements.append(buffer[position : position + size])
        position += size
        if len(elements) > MAX_INSTANCES:
            raise RequestError(413, f"more than {MAX_INSTANCES} images in one request")
    return elements


def _json_elements(data: Any, count: int, where: str) -> list[bytes]:
    """Base64 strings (or {"b64": ...}), flat or one per row ([[...], [...]] for shape [N, 1])."""
    if not isinstance(data, list):
        raise RequestError(400, f'{where}: "data" must be a list of base64 strings')
    flat = [item for row in data for item in (row if isinstance(row, list) else [row])]
    if len(flat) != count:
        raise RequestError(400, f"{where} has shape [{count}, ...] but holds {len(flat)} element(s)")
    elements = []
    for number, item in enumerate(flat, 1):
        if isinstance(item, dict) and set(item) == {"b64"}:
            item = item["b64"]
        elements.append(decode_base64(item, f"{where}, element {number}"))
    return elements


def _requested_outputs(raw: Any, binary_default: bool) -> list[RequestedOutput]:
    if raw is None or raw == []:
        return [RequestedOutput(name, binary_default) for name in OUTPUTS]
    if not isinstance(raw, list):
        raise RequestError(400, '"outputs" must be a list')
    outputs: list[RequestedOutput] = []
    for tensor in raw:
        if not isinstance(tensor, dict) or not isinstance(tensor.get("name"), str):
            raise RequestError(400, 'every requested output must be an object with a "name"')
        name = tensor["name"]
        if name not in OUTPUTS:
            raise RequestError(400, f"unknown output {name[:64]!r}; this model has {', '.join(OUTPUTS)}")
        if any(output.name == name for output in outputs):
            raise RequestError(400, f"the output {name!r} is asked for twice")
        parameters = _object(tensor.get("parameters"), f"output {name!r}'s parameters")
        if "classification" in parameters:
            raise RequestError(
                400, "the classification extension is not supported: ask for label, index and probability with "
                "the request's parameters.top_k",
            )  # fmt: skip
        if any(key.startswith("shared_memory") for key in parameters):
            raise RequestError(400, "shared memory is not supported: outputs come back in the body")
        binary = parameters.get("binary_data", binary_default)
        if not isinstance(binary, bool):
            raise RequestError(400, f"output {name!r}: binary_data must be true or false")
        outputs.append(RequestedOutput(name, binary))
    return outputs


# -- responses ---------------------------------------------------------------------------------------------


def encode_infer_response(
    model_name: str, request: InferRequest, classes: list[list[dict[str, Any]]]
) -> tuple[bytes, dict[str, str], str]:
    """The response body, its extra headers and its media type; `classes` is each image's top-k, as
    Predictor.classes gives them (every row the same k)."""
    shape = [len(classes), len(classes[0]) if classes else 0]
    values: dict[str, list[Any]] = {
        "label": [c["label"] for row in classes for c in row],
        "index": [int(c["index"]) for row in classes for c in row],
        "probability": [float(np.float32(c["probability"])) for row in classes for c in row],
    }
    tensors, buffers = [], []
    for output in request.outputs:
        tensor: dict[str, Any] = {"name": output.name, "datatype": OUTPUTS[output.name], "shape": shape}
        if output.binary:
            buffer = _to_binary(output.name, values[output.name])
            tensor["parameters"] = {"binary_data_size": len(buffer)}
            buffers.append(buffer)
        else:
            tensor["data"] = values[output.name]
        tensors.append(tensor)
    document: dict[str, Any] = {"model_name": model_name, "model_version": MODEL_VERSION}
    if request.id is not None:
        document["id"] = request.id
    document["outputs"] = tensors
    header = json.dumps(document, separators=(",", ":")).encode()
    if not buffers:
        return header, {}, "application/json"
    return header + b"".join(buffers), {HEADER_LENGTH: str(len(header))}, "application/octet-stream"


def _to_binary(name: str, values: list[Any]) -> bytes:
    if OUTPUTS[name] == "BYTES":
        encoded = [str(v).encode() for v in values]
        return b"".join(len(e).to_bytes(4, "little") + e for e in encoded)
    return np.asarray(values, dtype="<i8" if OUTPUTS[name] == "INT64" else "<f4").tobytes()


# -- routes ------------------------------------------------------------------------------------------------


def add_routes(app: FastAPI, endpoint: Endpoint) -> None:
    """The v2 routes, on the endpoint's machinery: its API key, body limits, deadline, decoding and batcher."""

    def model_name(name: str) -> str:
        return endpoint.options.endpoint_name or name

    def check_model(name: str, version: str | None = None) -> None:
        expected = endpoint.options.endpoint_name
        if expected and name != expected:
            raise RequestError(404, f"no model named {name[:64]!r} here (this endpoint serves {expected!r})")
        if version is not None and version != MODEL_VERSION:
            raise RequestError(404, f"model {model_name(name)!r} has one version, {MODEL_VERSION!r}")

    @app.get(f"{PREFIX}/health/live")
    async def live() -> dict[str, bool]:
        return {"live": True}

    @app.get(f"{PREFIX}/health/ready")
    async def ready() -> Response:
        reason = endpoint.unready_reason()
        if reason is not None:
            return JSONResponse({"ready": False, "error": reason}, status_code=503)
        return JSONResponse({"ready": True})

    @app.get(PREFIX)
    async def server_metadata(request: Request) -> dict[str, Any]:
        endpoint.check_key(request)
        return {"name": PLATFORM, "version": _version(), "extensions": ["binary_tensor_data"]}

    # the model routes read NAME (and VERSION) from the path: each is mounted with and without /versions/VERSION
    def path_model(request: Request) -> tuple[str, str | None]:
        return request.path_params["name"], request.path_params.get("version")

    async def metadata(request: Request) -> dict[str, Any]:
        name, version = path_model(request)
        endpoint.check_key(request)  # before saying which model this is
        check_model(name, version)
        return model_metadata(model_name(name))

    async def model_ready(request: Request) -> Response:
        name, version = path_model(request)
        endpoint.check_key(request)
        check_model(name, version)
        reason = endpoint.unready_reason()
        if reason is not None:
            return JSONResponse({"name": model_name(name), "ready": False, "error": reason}, status_code=503)
        return JSONResponse({"name": model_name(name), "ready": True})

    async def infer(request: Request) -> Response:
        name, version = path_model(request)

        def check() -> None:
            check_model(name, version)
            check_encoding(request.headers.get("content-encoding"))

        return await endpoint.invoke(request, check=check, answer=lambda: answer(request, model_name(name)))

    async def answer(request: Request, name: str) -> Response:
        assert endpoint.predictor is not None
        encoding = check_encoding(request.headers.get("content-encoding"))
        body = inflate(await endpoint.read_body(request), encoding, endpoint.options.max_payload_bytes)
        parsed = parse_infer_request(body, request.headers.get(HEADER_LENGTH))
        options = parse_options([{"top_k": parsed.top_k}], len(endpoint.predictor.labels))
        rows = await endpoint.logit_rows(parsed.images)
        classes = [endpoint.predictor.classes(row, options.top_k) for row in rows]
        content, headers, media_type = encode_infer_response(name, parsed, classes)
        return Response(content, media_type=media_type, headers=headers)

    routes: list[tuple[str, Callable, str]] = [
        ("", metadata, "GET"),
        ("/ready", model_ready, "GET"),
        ("/infer", infer, "POST"),
    ]
    for suffix, route, method in routes:
        for base in (f"{PREFIX}/models/{{name}}", f"{PREFIX}/models/{{name}}/versions/{{version}}"):
            app.add_api_route(base + suffix, route, methods=[method])


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("imgtune")
    except PackageNotFoundError:
        return "unknown"
