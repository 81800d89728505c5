"""`imgtune deploy --replicas N`: the endpoint on Ray Serve, its model on N replicas.

Two deployments make one Serve application:

- `endpoint` (one replica, no CPU reserved): the endpoint's own FastAPI app (imgtune.serving.app), so both
  protocols, the limits, the key and the errors are exactly the single process's. It reads, decodes and
  preprocesses each request, then hands the request's images to the model deployment in one call;
- `model` (N replicas): the job's model on one backend, each replica batching the calls it gets with Ray Serve's
  `@serve.batch` (up to `--max-batch-size` images per forward pass, `--max-batch-delay-ms`; a request with more
  images is sent in parts). Each answer names its replica,
  and the endpoint counts images per replica in /metrics (`imgtune_replica_images{replica=...}`).

Ray is the in-process one (on 127.0.0.1) unless `--ray-address` names a cluster; Serve's HTTP proxy listens on
`--host`/`--port`. Each model replica computes on `--threads` threads (default: the cluster's CPUs shared among
the replicas) and reserves as many CPUs, or its share when there are more replicas than CPUs. The backend is
chosen once, before the replicas start, and each replica runs that one. On a cluster of several machines, the
job's directory must be at the same path on each (a shared file system), as for tuning jobs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray
import torch
from ray import serve
from ray.serve.handle import DeploymentHandle

from imgtune.config import ServeOptions
from imgtune.core.errors import ConfigError, JobError
from imgtune.models.backends import Backend
from imgtune.models.bundle import load_bundle
from imgtune.serving.app import EndpointMetrics, create_app
from imgtune.serving.batching import QueueFull
from imgtune.serving.predictor import Predictor

log = logging.getLogger("imgtune.serving")
APP_NAME = "imgtune"


class ModelReplica:
    """One model replica: the job's model on a backend, computing each batch of calls in one forward pass."""

    def __init__(
        self, model_dir: str, backend: str, threads: int, max_batch_size: int, max_batch_delay_ms: float
    ) -> None:
        self.predictor = Predictor.load(model_dir, backend, threads)
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.classify.set_max_batch_size(max_batch_size)
        self.classify.set_batch_wait_timeout_s(max_batch_delay_ms / 1000)

    def describe(self) -> dict[str, Any]:
        return {"backend": self.predictor.backend.name, "choice": self.predictor.choice}

    @serve.batch(  # max_batch_size images (not calls) per forward pass; both limits set from the options
        max_batch_size=32, batch_wait_timeout_s=0.005, batch_size_fn=lambda requests: sum(len(r) for r in requests)
    )
    async def classify(self, requests: list[np.ndarray]) -> list[tuple[np.ndarray, str]]:
        """Each request's images (an [n, 3, H, W] array) to their logits, all of them in one forward pass."""
        images = torch.from_numpy(np.concatenate(requests))
        logits = await asyncio.to_thread(self.predictor.logits, list(images))  # off the replica's event loop
        bounds = np.cumsum([len(r) for r in requests])[:-1]
        return [(part, self.replica) for part in np.split(logits, bounds)]


class ReplicaBackend(Backend):
    """The model as the endpoint deployment sees it: computed on the replicas, under the backend they chose."""

    def __init__(self, handle: DeploymentHandle, name: str) -> None:  # noqa: D107 (no module to build)
        self.handle, self.name, self.device = handle, name, torch.device("cpu")

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        logits, _ = self.handle.classify.remote(batch.numpy()).result()
        return torch.from_numpy(logits)


class ReplicaPool:
    """The endpoint's model runner (imgtune.serving.batching.ModelRunner) with --replicas: each request's images
    go to the model deployment in one call; Serve routes it to a replica, which batches it with others."""

    def __init__(self, handle: DeploymentHandle, options: ServeOptions, metrics: EndpointMetrics) -> None:
        self.handle = handle
        self.max_queue = options.max_queue
        self.max_batch_size = options.max_batch_size  # a replica's forward pass: a request is sent in such parts
        self.metrics = metrics
        self.in_flight = 0

    @property
    def depth(self) -> int:
        return self.in_flight

    @property
    def alive(self) -> bool:
        return True  # Serve replaces a replica that dies; the request deadline bounds any wait

    def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def submit_many(self, items: list[torch.Tensor]) -> list[np.ndarray]:
        if self.in_flight + len(items) > self.max_queue:
            raise QueueFull(f"{self.in_flight} images are waiting (at most {self.max_queue})")
        self.in_flight += len(items)
        parts = [items[i : i + self.max_batch_size] for i in range(0, len(items), self.max_batch_size)]
        try:
            answers = await asyncio.gather(*(self.handle.classify.remote(torch.stack(p).numpy()) for p in parts))
        finally:
            self.in_flight -= len(items)
        rows = []
        for (logits, replica), part in zip(answers, parts, strict=True):
            self.metrics.replica_images.labels(replica).inc(len(part))
            rows += list(logits)
        return rows


@serve.ingress()
class EndpointIngress:
    """The endpoint deployment: the FastAPI app of one process, with the replicas as its model runner."""

    def __init__(self, model: DeploymentHandle, model_dir: str, options: dict[str, Any]) -> None:
        self.model = model
        self.model_dir = Path(model_dir)
        self.options = ServeOptions(**options)

    def __serve_build_asgi_app__(self) -> Any:
        def runner(predictor: Predictor, options: ServeOptions, metrics: EndpointMetrics) -> ReplicaPool:
            return ReplicaPool(self.model, options, metrics)

        return create_app(self.front_predictor, self.options, runner)

    def front_predictor(self) -> Predictor:
        """The bundle's preprocessing and labels here, its model on the replicas (waits for the first one)."""
        described = self.model.describe.remote().result()
        backend = ReplicaBackend(self.model, described["backend"])
        return Predictor(load_bundle(self.model_dir), backend, described["choice"], self.model_dir)


def serve_replicas(
    model_dir: Path,
    options: ServeOptions,
    *,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8080,
    ray_address: str | None = None,
) -> None:
    """Serve `model_dir` on `replicas` model replicas until interrupted (Ctrl-C or SIGTERM), then remove the
    application (and stop the in-process Ray). Ray is started, or the cluster at `ray_address` joined, before
    (imgtune.deploy does it, as for tuning jobs)."""
    if not ray.is_initialized():
        raise JobError("Ray is not started", "call imgtune.deploy(..., replicas=N), which starts or joins it")
    if options.device not in ("auto", "cpu"):
        raise ConfigError(
            f"replicas compute on CPUs, not on {options.device}", "leave out --device, or serve one process"
        )
    threads, reserved = replica_cpus(options.threads, replicas)
    # the backend is chosen once, here (auto measures on the job's photos and remembers): every replica then
    # serves on the same one, instead of each measuring on its own at once on contended cores
    backend = Predictor.load(model_dir, options.backend, threads).backend.name
    try:
        serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
        model = serve.deployment(
            ModelReplica,
            name="model",
            num_replicas=replicas,
            ray_actor_options={"num_cpus": reserved},
            max_ongoing_requests=2 * options.max_batch_size,  # room for a full batch while one computes
        ).bind(str(model_dir), backend, threads, options.max_batch_size, options.max_batch_delay_ms)
        ingress = serve.deployment(
            EndpointIngress,
            name="endpoint",
            ray_actor_options={"num_cpus": 0},  # the replicas' CPUs are the ones that count
            max_ongoing_requests=max(64, options.max_queue),  # the endpoint's own queue bound refuses beyond it
            max_queued_requests=options.max_queue,  # beyond it Serve's proxy answers 503 at once
        ).bind(model, str(model_dir), options.model_dump())
        serve.run(ingress, name=APP_NAME, route_prefix="/")
        log.warning("serving on http://%s:%s with %d model replicas (%s)", host, port, replicas, backend)
        _wait_for_a_signal()
    except RuntimeError as exc:  # Serve's own failures (a replica that cannot start, a port in use)
        raise JobError(
            f"Ray Serve could not serve the model: {str(exc).splitlines()[0]}",
            "the replicas' own logs say why: /tmp/ray/session_latest/logs/serve/",
        ) from exc
    finally:
        if ray_address:  # the cluster stays up; its controller removes the application in the background
            with contextlib.suppress(Exception):
                serve.delete(APP_NAME, _blocking=False)
        else:  # the in-process Ray goes, Serve and its replicas with it
            ray.shutdown()


def replica_cpus(threads: int | None, replicas: int) -> tuple[int, float]:
    """Threads each replica computes on (`threads`, or the cluster's CPUs shared among the replicas, at least
    one), and the CPUs it reserves: as many, or a fair share when there are more replicas than CPUs, so that
    every replica can be placed (Ray would otherwise wait for ever for CPUs that do not exist)."""
    cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    threads = threads or max(1, int(cpus // replicas))
    return threads, min(float(threads), cpus / replicas)


def _wait_for_a_signal() -> None:
    """Until Ctrl-C or SIGTERM (a service manager's stop)."""

    def stop(*_: object) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)
