"""`imgtune deploy`: a job's model behind the HTTP endpoint, on uvicorn (in the foreground, or in a thread for
the pipeline)."""

from __future__ import annotations

import socket
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from imgtune.config import ServeOptions
from imgtune.serving.app import create_app
from imgtune.serving.predictor import Predictor, resolve_model_dir, serving_device


def named_model_dir(source: str | Path, options: ServeOptions, workspace: str | Path | None = None) -> Path:
    """The bundle directory to serve; the endpoint is named after its job unless the options name it. A missing
    job or model fails here, before any server starts."""
    model_dir = resolve_model_dir(source, workspace)
    if options.endpoint_name is None:
        options.endpoint_name = model_dir.parent.name if model_dir.name == "model" else model_dir.name
    return model_dir


def build_app(source: str | Path, options: ServeOptions, workspace: str | Path | None = None):
    """The endpoint's app for a job (or bundle directory), its model in this process."""
    model_dir = named_model_dir(source, options, workspace)
    serving_device(options.device)  # a device that cannot serve fails here, before any server starts
    return create_app(
        lambda: Predictor.load(model_dir, options.backend, options.threads, device=options.device), options
    )


def serve(
    source: str | Path,
    options: ServeOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workspace: str | Path | None = None,
    log_level: str = "info",
    replicas: int = 1,
    ray_address: str | None = None,
) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM stop it gracefully): in this process on uvicorn, or with
    `replicas` above 1 (or a `ray_address`) on Ray Serve, the model on that many replicas."""
    if replicas > 1 or ray_address:
        from imgtune.serving.replicas import serve_replicas

        model_dir = named_model_dir(source, options, workspace)
        serve_replicas(model_dir, options, replicas=replicas, host=host, port=port, ray_address=ray_address)
        return
    import uvicorn

    app = build_app(source, options, workspace)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5
    )
    uvicorn.Server(config).run()


class BackgroundEndpoint:
    """An endpoint served from a thread of this process (the pipeline's); `url` once it answers /ping.

    Use as a context manager (or `start()` and `stop()`); leaving it stops the server gracefully.
    """

    def __init__(
        self,
        source: str | Path,
        options: ServeOptions,
        *,
        host: str = "127.0.0.1",
        port: int = 0,
        workspace: str | Path | None = None,
    ):
        import uvicorn

        self.host = host
        self.port = port or _free_port(host)
        app = build_app(source, options, workspace)
        config = uvicorn.Config(app, host=host, port=self.port, log_level="warning", access_log=False)
        self.server = uvicorn.Server(config)
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start(self, timeout: float = 300.0) -> BackgroundEndpoint:
        from imgtune.core.errors import JobError

        if self.thread is not None and self.thread.is_alive():
            return self
        self.thread = threading.Thread(target=self.server.run, name="imgtune-endpoint", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self.thread.is_alive():
                raise JobError(f"the endpoint on {self.url} stopped while starting", "is the port in use?")
            if _status(self.url + "/ping") == 200:
                return self
            time.sleep(0.1)
        raise JobError(f"the endpoint on {self.url} did not become ready in {timeout:.0f} s")

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=30)

    def __enter__(self) -> BackgroundEndpoint:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _free_port(host: str) -> int:
    """A free port at or above 20000 (Ray's workers use 10002-19999)."""
    for _ in range(100):
        with socket.socket() as sock:
            sock.bind((host, 0))
            port = sock.getsockname()[1]
        if port >= 20000:
            return port
    raise OSError("no free port at or above 20000")


def _status(url: str) -> int | None:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback, never through a proxy
    try:
        with opener.open(url, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code
    except OSError:
        return None
