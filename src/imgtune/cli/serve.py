"""`imgtune deploy`, `imgtune predict`, `imgtune batch-transform`, `imgtune export`: a job's model answering for
images, here or elsewhere."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import typer

import imgtune
from imgtune.cli import render
from imgtune.cli.common import (
    JsonOption,
    WorkspaceOption,
    api_default,
    command_help,
    err,
    field_option,
    friendly_errors,
    print_json,
)
from imgtune.config import ServeOptions

ModelArgument = Annotated[
    str,
    typer.Argument(help="Job name or path, a model bundle directory, or an MLflow model URI (models:/NAME@ALIAS)."),
]
_MB = 1024 * 1024


def _backend_option(default: str) -> Any:
    return field_option(ServeOptions, "backend", default=default)


@friendly_errors
def deploy(
    job: ModelArgument,
    host: str = typer.Option(
        api_default(imgtune.deploy, "host"), help="Address to listen on; 0.0.0.0 exposes it to the network."
    ),
    port: int = typer.Option(api_default(imgtune.deploy, "port"), help="Port to listen on."),
    backend: str = _backend_option(ServeOptions.model_fields["backend"].default),
    max_batch_size: int = field_option(ServeOptions, "max_batch_size"),
    max_batch_delay_ms: float = field_option(ServeOptions, "max_batch_delay_ms"),
    max_queue: int = field_option(ServeOptions, "max_queue"),
    max_payload_mb: float = field_option(
        ServeOptions,
        "max_payload_bytes",
        "--max-payload-mb",
        default=ServeOptions.model_fields["max_payload_bytes"].default / _MB,
    ),  # fmt: skip
    api_key: str | None = field_option(ServeOptions, "api_key", envvar="IMGTUNE_API_KEY"),
    allow_url_scheme: Annotated[
        list[str] | None,
        typer.Option(
            "--allow-url-scheme",
            help='Fetch {"url": ...} images with this scheme (repeatable; e.g. s3), with the server\'s own '
            "credentials \\[default: no URL is fetched].",
        ),
    ] = None,
    allow_bucket: Annotated[
        list[str] | None,
        typer.Option("--allow-bucket", help="Fetch s3:// URLs from this bucket only (repeatable; allows s3)."),
    ] = None,
    fetch_timeout: float = field_option(ServeOptions, "fetch_timeout_s", "--fetch-timeout"),
    request_timeout: float = field_option(ServeOptions, "request_timeout_s", "--request-timeout"),
    body_timeout: float = field_option(ServeOptions, "body_timeout_s", "--body-timeout"),
    max_image_pixels: int = field_option(ServeOptions, "max_image_pixels"),
    max_request_pixels: int = field_option(ServeOptions, "max_request_pixels"),
    endpoint_name: str | None = field_option(ServeOptions, "endpoint_name"),
    threads: int | None = field_option(ServeOptions, "threads"),
    device: str = field_option(ServeOptions, "device"),
    replicas: Annotated[
        int,
        typer.Option(
            min=1,
            max=256,
            help="Model replicas on Ray Serve, each batching its own requests, behind the same routes; 1 serves "
            "in this process on uvicorn. Each replica reserves --threads CPUs \\[default: the cores shared].",
        ),
    ] = 1,
    ray_address: Annotated[
        str | None,
        typer.Option(help="Serve the replicas on this Ray cluster (host:port) \\[default: an in-process Ray]."),
    ] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Serve a job's model over HTTP (FastAPI on uvicorn, or on Ray Serve with --replicas), speaking the managed
    endpoint's protocol and the Open Inference Protocol v2 (KServe, Triton).

    POST /invocations (images, multipart, JSON with base64 or s3:// URLs; boto3's sagemaker-runtime client works),
    POST /v2/models/NAME/infer (tritonclient works), GET /ping, /health/live, /health/ready, /v2/health/ready,
    /metrics (Prometheus) and a page at / to try a photo.
    """
    schemes = tuple(dict.fromkeys(s.lower().removesuffix("://") for s in allow_url_scheme or []))
    options = ServeOptions(  # checked before the "serving" line: a bad option is the only line printed
        backend=backend,
        max_batch_size=max_batch_size,
        max_batch_delay_ms=max_batch_delay_ms,
        max_queue=max_queue,
        max_payload_bytes=int(max_payload_mb * _MB),
        api_key=api_key,
        allowed_url_schemes=schemes,
        allowed_buckets=tuple(allow_bucket or ()),
        fetch_timeout_s=fetch_timeout,
        request_timeout_s=request_timeout,
        body_timeout_s=body_timeout,
        max_image_pixels=max_image_pixels,
        max_request_pixels=max_request_pixels,
        endpoint_name=endpoint_name,
        threads=threads,
        device=device,
    )
    on = f"{replicas} replicas on Ray Serve, " if replicas > 1 or ray_address else ""
    err.print(f"serving {job} on http://{host}:{port} ({on}{backend}); Ctrl-C stops it", highlight=False)
    imgtune.deploy(
        job, host=host, port=port, replicas=replicas, ray_address=ray_address, workspace=workspace,
        **options.model_dump(),
    )  # fmt: skip


@friendly_errors
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    job: Annotated[str | None, typer.Option(help="Predict in-process with this job's model.")] = None,
    endpoint: Annotated[str | None, typer.Option(help="Or ask a running endpoint (http://127.0.0.1:8080).")] = None,
    top_k: int = typer.Option(api_default(imgtune.predict, "top_k"), "--top-k", help="Classes to show per image."),
    api_key: Annotated[str | None, typer.Option(envvar="IMGTUNE_API_KEY", help="The endpoint's API key.")] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """The top-k classes of each image, from a job's model (--job) or a running endpoint (--endpoint).

    A file that is not a usable image is reported, and the others are still classified (exit code 1).
    """
    results = imgtune.predict(images, job=job, endpoint=endpoint, top_k=top_k, api_key=api_key, workspace=workspace)
    print_json(results) if as_json else render.predictions(results)
    if any("error" in result for result in results):
        raise typer.Exit(1)


@friendly_errors
def batch_transform(
    job: ModelArgument,
    source: Annotated[str, typer.Argument(help="Folder of images or s3:// prefix.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="FILE.csv or FILE.jsonl (appended to, resumable).")],
    top_k: int = typer.Option(api_default(imgtune.batch_transform, "top_k"), "--top-k", help="Classes per image."),
    batch_size: int = typer.Option(api_default(imgtune.batch_transform, "batch_size"), help="Images per forward pass."),
    backend: str = _backend_option(api_default(imgtune.batch_transform, "backend")),
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Classify every file under a folder or s3:// prefix into a CSV or JSON Lines file (resumable).

    Bad files become rows with the reason; a killed run, started again, skips what is already in the output.
    """
    summary = imgtune.batch_transform(
        job, source, output, top_k=top_k, batch_size=batch_size, backend=backend, workspace=workspace,
        progress=not as_json,
    ).to_dict()  # fmt: skip
    print_json(summary) if as_json else render.batch_transform(summary)


ExportFormat = Literal["onnx", "onnx-int8", "openvino", "torchscript"]  # imgtune.models.export.FORMATS


@friendly_errors
def export(
    job: ModelArgument,
    format: Annotated[  # noqa: A002 (the option's name)
        ExportFormat,
        typer.Option(
            "--format",
            "-f",
            help="onnx (ONNX Runtime, fp32), onnx-int8 (static QDQ int8, calibrated on the job's training photos), "
            "openvino (OpenVINO IR, fp32) or torchscript (model.pt, traced on the CPU).",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Folder to write (new or empty, unless --force).")],
    triton: Annotated[
        bool,
        typer.Option("--triton", help="Lay it out as a Triton model repository: OUT/NAME/config.pbtxt, OUT/NAME/1/."),
    ] = False,
    name: Annotated[
        str | None, typer.Option("--name", help="The model's name (Triton's) \\[default: the job's name].")
    ] = None,
    calibration_data: Annotated[
        Path | None,
        typer.Option(
            "--calibration-data",
            help="onnx-int8: a folder of training photos (one folder per class) to calibrate on "
            "\\[default: the job's own training data, when it is on this machine].",
        ),
    ] = None,
    force: Annotated[bool, typer.Option("--force", help="Replace an earlier export in --out.")] = False,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a job's model as a self-contained model that serves without imgtune, with its labels and preprocessing.

    OUT gets the model (model.onnx, model.pt, or model.xml and model.bin), labels.txt, classes.json,
    preprocessing.json and a README. The model takes float32 NCHW RGB in [0, 1] (resized and centre-cropped as
    preprocessing.json says) and normalises it itself; it returns logits, one per line of labels.txt.
    """
    result = imgtune.export(
        job, out, format=format, triton=triton, force=force, name=name, calibration_data=calibration_data,
        workspace=workspace,
    ).to_dict()  # fmt: skip
    print_json(result) if as_json else render.export_summary(result)


def register(app: typer.Typer) -> None:
    app.command(help=command_help(deploy))(deploy)
    app.command(help=command_help(predict))(predict)
    app.command("batch-transform", help=command_help(batch_transform))(batch_transform)
    app.command(help=command_help(export))(export)
