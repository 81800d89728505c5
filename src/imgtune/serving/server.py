"""`imgtune deploy`: a job's model behind the HTTP endpoint, on uvicorn."""

from __future__ import annotations

from pathlib import Path

from imgtune.serving.app import ServeOptions, create_app
from imgtune.serving.predictor import Predictor, resolve_model_dir


def build_app(source: str | Path, options: ServeOptions, workspace: str | Path | None = None):
    """The endpoint's app for a job (or bundle directory); a missing job or model fails here, not later."""
    options.validate()
    model_dir = resolve_model_dir(source, workspace)
    if options.endpoint_name is None:
        options.endpoint_name = model_dir.parent.name if model_dir.name == "model" else model_dir.name
    return create_app(lambda: Predictor.load(model_dir, options.backend, options.threads), options)


def serve(
    source: str | Path,
    options: ServeOptions,
    *,
    host: str = "127.0.0.1",
    port: int = 8080,
    workspace: str | Path | None = None,
    log_level: str = "info",
) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM stop it gracefully)."""
    import uvicorn

    app = build_app(source, options, workspace)
    config = uvicorn.Config(
        app, host=host, port=port, log_level=log_level, access_log=False, timeout_graceful_shutdown=5
    )
    uvicorn.Server(config).run()
