"""The HTTP endpoint: FastAPI on uvicorn, speaking the managed platform's container contract.

- `GET /ping` (200 once the model is loaded, 503 before), `GET /health/live`, `GET /health/ready`;
- `POST /invocations` and `POST /endpoints/{name}/invocations` (what boto3's sagemaker-runtime client calls);
- `GET /metrics` (Prometheus), `GET /` (a page to try a photo);
- the Open Inference Protocol v2 (KServe v2, Triton's HTTP API) under `/v2` (imgtune.serving.v2).

The model loads in a worker thread after the server starts; concurrent requests' images are batched
(imgtune.serving.batching). Every error is a JSON body `{"error": {"status": ..., "message": ...}, "message": ...}`
(the top-level message and an x-amzn-ErrorType header are what boto3 reads); under /v2 it is `{"error": message}`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import threading
import time
from collections.abc import Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.formparsers import MultiPartException

from imgtune.config import ServeOptions
from imgtune.data.check import BadImage, declared_pixels, decode_image
from imgtune.serving import v2
from imgtune.serving.batching import DynamicBatcher, ModelRunner, QueueFull
from imgtune.serving.inputs import (
    ACCEPTED_TYPES,
    CUSTOM_ATTRIBUTES,
    JSON_TYPE,
    MAX_INSTANCES,
    MULTIPART_TYPE,
    RAW_IMAGE_TYPES,
    RequestError,
    check_url,
    custom_attributes,
    fetch_url,
    json_instances,
    media_type,
    parse_options,
)
from imgtune.serving.predictor import Predictor

log = logging.getLogger("imgtune.serving")
TEMPLATES = Path(__file__).parent / "templates"
DRAIN_LIMIT_BYTES = 64 * 1024 * 1024


class EndpointMetrics:
    """Prometheus metrics of one endpoint (its own registry, so several apps in a process stay apart)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "imgtune_requests", "HTTP requests by route and status", ["route", "status"], registry=self.registry
        )
        self.latency = Histogram(
            "imgtune_request_latency_seconds",
            "Time from request to response",
            ["route"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
            registry=self.registry,
        )
        self.errors = Counter("imgtune_errors", "Error responses by status", ["status"], registry=self.registry)
        self.batch_size = Histogram(
            "imgtune_batch_size",
            "Images per forward pass",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )
        self.images = Counter("imgtune_images", "Images classified", registry=self.registry)
        self.replica_images = Counter(  # only with --replicas: which replica classified them
            "imgtune_replica_images", "Images classified by each model replica", ["replica"], registry=self.registry
        )
        self.queue_depth = Gauge("imgtune_queue_depth", "Images waiting for the model", registry=self.registry)
        self.ready = Gauge("imgtune_model_ready", "1 once the model is loaded", registry=self.registry)

    def observe(self, route: str, status: int, seconds: float) -> None:
        self.requests.labels(route, str(status)).inc()
        self.latency.labels(route).observe(seconds)
        if status >= 400:
            self.errors.labels(str(status)).inc()


# SageMaker's error types, so boto3 raises them by name with our message (it reads `message` and this header)
ERROR_TYPES = {401: "AccessDeniedException", 503: "ServiceUnavailable", 500: "InternalFailure"}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    error_type = ERROR_TYPES.get(status, "ValidationError" if status < 500 else "InternalFailure")
    return JSONResponse(
        {"error": {"status": status, "message": message}, "message": message},
        status_code=status,
        headers={"x-amzn-ErrorType": error_type, **(headers or {})},
    )


def error_for(request: Request, status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """The error in the shape the route's protocol reads: v2's `{"error": message}`, or SageMaker's."""
    if v2.is_v2(request.url.path):
        return v2.error_response(status, message, headers)
    return error_response(status, message, headers)


RunnerFactory = Callable[[Predictor, ServeOptions, EndpointMetrics], ModelRunner]


def local_batcher(predictor: Predictor, options: ServeOptions, metrics: EndpointMetrics) -> ModelRunner:
    """The model in this process, behind a dynamic batcher (one forward pass at a time)."""
    return DynamicBatcher(
        lambda tensors: list(predictor.logits(tensors)),
        max_batch_size=options.max_batch_size,
        max_delay_s=options.max_batch_delay_ms / 1000,
        max_queue=options.max_queue,
        on_batch=metrics.batch_size.observe,
    )


class Endpoint:
    """The state behind the routes: the predictor once loaded (its preprocessing and labels), the runner its
    images go to (a batcher here, or replicas elsewhere), the metrics."""

    def __init__(
        self,
        model: Predictor | Callable[[], Predictor],
        options: ServeOptions,
        runner: RunnerFactory = local_batcher,
    ):
        self.model = model
        self.options = options
        self.make_runner = runner
        self.metrics = EndpointMetrics()
        self.predictor: Predictor | None = None
        self.batcher: ModelRunner | None = None
        self.load_error: str | None = None
        # decoding is CPU and memory: many large images at once must not take every core and gigabytes
        self.decode_slots = threading.BoundedSemaphore(options.max_concurrent_decodes or os.cpu_count() or 1)

    async def load(self) -> None:
        try:
            predictor = self.model if isinstance(self.model, Predictor) else await asyncio.to_thread(self.model)
        except Exception as exc:
            self.load_error = f"{type(exc).__name__}: {exc}"
            log.error("the model did not load: %s", self.load_error)
            return
        self.batcher = self.make_runner(predictor, self.options, self.metrics)
        self.batcher.start()
        self.predictor = predictor
        self.metrics.ready.set(1)

    async def close(self) -> None:
        if self.batcher is not None:
            await self.batcher.stop()

    def unready_reason(self) -> str | None:
        """Why the endpoint cannot answer now (None when it can): /ping, the readiness probes, every route."""
        if self.predictor is not None:
            if self.batcher is not None and not self.batcher.alive:  # requests would wait for ever: not ready
                return "the model's batch worker has stopped; restart the endpoint"
            return None
        if self.load_error:
            return f"the model failed to load: {self.load_error}"
        return "the model is loading"

    def not_ready(self) -> JSONResponse | None:
        reason = self.unready_reason()
        return None if reason is None else error_response(503, reason)

    def check_key(self, request: Request) -> None:
        if self.options.api_key is None:
            return
        given = request.headers.get("x-api-key") or ""
        authorization = request.headers.get("authorization") or ""
        if not given and authorization.lower().startswith("bearer "):
            given = authorization[7:].strip()
        if not secrets.compare_digest(given.encode(), self.options.api_key.encode()):
            raise RequestError(401, "missing or wrong API key (send it as X-API-Key or Authorization: Bearer)")

    async def read_body(self, request: Request) -> bytes:
        limit = self.options.max_payload_bytes
        declared = request.headers.get("content-length")
        stream = request.stream()
        if declared and declared.isdigit() and int(declared) > limit:
            await self._drain(stream)
            raise RequestError(413, f"the body is {int(declared):,} bytes (at most {limit:,})")
        chunks: list[bytes] = []

        async def receive() -> None:
            size = 0
            async for chunk in stream:
                size += len(chunk)
                if size > limit:
                    await self._drain(stream)
                    raise RequestError(413, f"the body is over {limit:,} bytes")
                chunks.append(chunk)

        try:  # a client that sends slowly (or stops) must not hold a connection and its buffers for ever
            await asyncio.wait_for(receive(), self.options.body_timeout_s)
        except TimeoutError:
            raise RequestError(408, f"the body did not arrive within {self.options.body_timeout_s:g} s") from None
        return b"".join(chunks)

    async def _drain(self, stream: Any) -> None:
        """Read (and drop) what the client is still sending, up to a bound, so that it reads the 413 we answer
        instead of a connection reset; past the bound, the connection is simply closed."""
        drained = 0
        async for chunk in stream:
            drained += len(chunk)
            if drained > DRAIN_LIMIT_BYTES:
                break

    async def images_and_options(self, request: Request) -> tuple[list[bytes], list[dict[str, Any]]]:
        kind = media_type(request.headers.get("content-type"))
        if kind not in RAW_IMAGE_TYPES and kind not in (JSON_TYPE, MULTIPART_TYPE):
            await self._drain(request.stream())
            raise RequestError(
                415, f"unsupported content type {kind or '(none)'!r}; send one of {', '.join(ACCEPTED_TYPES)}"
            )
        body = await self.read_body(request)
        if kind in RAW_IMAGE_TYPES:
            return [body], []
        if kind == JSON_TYPE:
            instances, options = json_instances(body)
            self.check_room(len(instances))
            for instance in instances:  # every URL checked before any is fetched
                if "url" in instance:
                    check_url(instance["url"], self.options.allowed_url_schemes, self.options.allowed_buckets)
            images = []
            budget = self.options.max_payload_bytes - len(body)  # what the URLs fetch counts against the payload
            for instance in instances:
                if "url" in instance:
                    data = await self.fetch(instance["url"], max(budget, 0))
                    budget -= len(data)
                    images.append(data)
                else:
                    images.append(instance["image"])
            return images, [options]

        async def replay() -> dict[str, Any]:
            return {"type": "http.request", "body": body, "more_body": False}

        try:
            form = await Request(request.scope, replay).form(
                max_files=MAX_INSTANCES, max_part_size=self.options.max_payload_bytes
            )
        except (MultiPartException, StarletteHTTPException) as exc:  # (Starlette turns the first into the second)
            message = str(getattr(exc, "message", None) or getattr(exc, "detail", exc))
            too_many = "too many files" in message.lower()
            raise RequestError(413 if too_many else 400, f"bad multipart body: {message}") from None
        try:
            parts = [part for _, part in form.multi_items() if isinstance(part, UploadFile)]
            self.check_room(len(parts))
            images = [await part.read() for part in parts]
            fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        finally:
            await form.close()
        if not images:
            raise RequestError(400, "the multipart body has no file part")
        return images, [fields]

    async def fetch(self, url: str, max_bytes: int) -> bytes:
        """An allowed URL's bytes within the fetch timeout (a slow store answers as a failed fetch does)."""
        timeout = self.options.fetch_timeout_s
        try:
            return await asyncio.wait_for(run_in_threadpool(fetch_url, url, max_bytes, timeout), timeout)
        except TimeoutError:
            raise RequestError(400, f"could not fetch {url}") from None

    def check_room(self, count: int) -> None:
        """Refuse a request whose images could never fit (413) or do not fit now (503), before any work."""
        if count > self.options.max_queue:
            raise RequestError(
                413, f"{count} images in one request; this endpoint queues at most {self.options.max_queue}"
            )
        if self.batcher is not None and self.batcher.depth + count > self.options.max_queue:
            raise RequestError(503, f"the server is busy: {self.batcher.depth} images are waiting; retry shortly")

    def decode(self, images: list[bytes]) -> list[Any]:
        """Decode and preprocess each image (in a worker thread); the first bad one refuses the request, and so
        does a request whose images declare more pixels in all than its budget (read from their headers, before
        any is decoded: many small files that each pass the per-image cap must not take seconds and gigabytes)."""
        assert self.predictor is not None
        budget = self.options.max_request_pixels
        cap = self.options.max_image_pixels  # an image over it is refused on its own, with that reason
        declared = sum(pixels for data in images if (pixels := declared_pixels(data, cap) or 0) <= cap)
        if declared > budget:
            raise RequestError(
                413, f"the request's {len(images)} images hold {declared:,} pixels in all (at most {budget:,})"
            )
        tensors = []
        for number, data in enumerate(images, 1):
            try:
                with self.decode_slots, decode_image(data, self.options.max_image_pixels) as image:
                    tensors.append(self.predictor.preprocess(image))
            except BadImage as exc:
                where = f"image {number}: " if len(images) > 1 else ""
                raise RequestError(400, f"{where}{exc}") from None
        return tensors

    async def invoke(
        self,
        request: Request,
        key_checked: bool = False,
        *,
        check: Callable[[], None] | None = None,
        answer: Callable[[], Awaitable[Response]] | None = None,
    ) -> Response:
        """Answer a request that carries images: the key, then `check()` (the protocol's other preconditions),
        then readiness (a refusal drains the body first); then `answer()` (SageMaker's when None) within the
        request deadline (504)."""
        try:
            if not key_checked:
                self.check_key(request)
            if check is not None:
                check()
            reason = self.unready_reason()
            if reason is not None:
                raise RequestError(503, reason)
        except RequestError:
            await self._drain(request.stream())  # so that the client reads our answer, not a reset connection
            raise
        try:
            pending = answer() if answer is not None else self._answer(request)
            return await asyncio.wait_for(pending, self.options.request_timeout_s)
        except TimeoutError:
            raise RequestError(504, f"no answer within {self.options.request_timeout_s:g} s; retry later") from None

    async def logit_rows(self, images: list[bytes]) -> list[Any]:
        """Each encoded image's logits, in order: room in the queue, decoding (bounded), the batcher, the metrics.
        Both protocols classify through here."""
        assert self.batcher is not None
        self.check_room(len(images))
        tensors = await run_in_threadpool(self.decode, images)
        try:
            rows = await self.batcher.submit_many(tensors)
        except QueueFull as exc:
            raise RequestError(503, f"the server is busy: {exc}; retry shortly") from None
        self.metrics.images.inc(len(rows))
        return rows

    async def _answer(self, request: Request) -> Response:
        assert self.predictor is not None and self.batcher is not None
        images, option_sources = await self.images_and_options(request)
        option_sources += [dict(request.query_params), custom_attributes(request.headers.get(CUSTOM_ATTRIBUTES))]
        options = parse_options(option_sources, len(self.predictor.labels))
        rows = await self.logit_rows(images)
        predictions = []
        for row in rows:
            prediction: dict[str, Any] = {"classes": self.predictor.classes(row, options.top_k)}
            if options.logits:
                prediction["logits"] = [float(v) for v in row]
            predictions.append(prediction)
        return JSONResponse({"predictions": predictions})


def create_app(
    model: Predictor | Callable[[], Predictor],
    options: ServeOptions | None = None,
    runner: RunnerFactory = local_batcher,
) -> FastAPI:
    """The endpoint's app; `model` is a loaded Predictor or a function that loads one (called at startup);
    `runner` makes what its images are classified by (the model in this process, unless told otherwise)."""
    endpoint = Endpoint(model, options or ServeOptions(), runner)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loading = asyncio.create_task(endpoint.load())
        yield
        loading.cancel()
        await endpoint.close()

    app = FastAPI(title="imgtune endpoint", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.endpoint = endpoint

    @app.middleware("http")
    async def measure(request: Request, call_next: Callable) -> Response:
        started = time.perf_counter()
        status = 500  # unless a response comes back
        try:
            response = await call_next(request)
            status = response.status_code
            return response
        finally:
            route = getattr(request.scope.get("route"), "path", "unmatched")
            endpoint.metrics.observe(route, status, time.perf_counter() - started)

    @app.exception_handler(RequestError)
    async def request_error(request: Request, exc: RequestError) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return error_for(request, exc.status, exc.message, headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_for(request, exc.status_code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_for(request, 422, "; ".join(str(error.get("msg")) for error in exc.errors()))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("request failed")  # the details go to the server's log, never into an answer
        return error_for(request, 500, "internal error (the server's log has the details)")

    @app.get("/ping")
    async def ping() -> Response:
        return endpoint.not_ready() or JSONResponse({"status": "ready"})

    @app.get("/health/live")
    async def live() -> dict[str, str]:
        return {"status": "alive"}

    @app.get("/health/ready")
    async def ready(request: Request) -> Response:
        endpoint.check_key(request)  # it describes the model: not for anyone without the key
        unavailable = endpoint.not_ready()
        if unavailable is not None:
            return unavailable
        assert endpoint.predictor is not None and endpoint.batcher is not None
        model, queue = endpoint.predictor.describe(), endpoint.batcher.depth
        return JSONResponse({"status": "ready", "model": model, "queue": queue})

    @app.post("/invocations")
    async def invocations(request: Request) -> Response:
        return await endpoint.invoke(request)

    @app.post("/endpoints/{name}/invocations")
    async def named_invocations(name: str, request: Request) -> Response:
        endpoint.check_key(request)  # before saying which endpoint this is
        if endpoint.options.endpoint_name and name != endpoint.options.endpoint_name:
            raise RequestError(404, f"no endpoint named {name!r} here (this is {endpoint.options.endpoint_name!r})")
        return await endpoint.invoke(request, key_checked=True)

    v2.add_routes(app, endpoint)  # the Open Inference Protocol v2, on the same machinery

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        endpoint.check_key(request)
        if endpoint.batcher is not None:
            endpoint.metrics.queue_depth.set(endpoint.batcher.depth)
        return Response(generate_latest(endpoint.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    page = _render_page(endpoint.options)

    @app.get("/", response_class=HTMLResponse)
    async def index() -> HTMLResponse:
        return HTMLResponse(page)

    return app


def _render_page(options: ServeOptions) -> str:
    import jinja2

    environment = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True)
    return environment.get_template("index.html.j2").render(
        needs_key=options.api_key is not None, max_payload_mb=options.max_payload_bytes / 1024 / 1024
    )
