"""Shared test fixtures, and markers from what a test uses.

Tests are laid out by kind: `unit/` (one module or contract, no jobs, servers or Ray), `integration/` (real jobs,
servers, Ray, S3 or a browser, one feature at a time), `e2e/` (whole workflows: the pipeline, the README tour,
jobs in a bucket, Ray clusters), `gpu/` (CUDA paths on a real GPU). Markers: `slow` (left out of the fast subset
`pytest -m "not slow"`), `ray`, `s3` (given here to every test that uses the moto fixtures), `browser`, `gpu`
(deselected here unless `-m` names it: `pytest -m gpu` runs them, and fails loudly without a CUDA GPU).

Every test runs with `IMGTUNE_CACHE` pointing into a session temp folder and `IMGTUNE_WORKSPACE` into a
per-test temp folder, so no test reads or writes `~/.cache/imgtune` or `./imgtune-runs`.

The shared read-only material (`shared/`, see `tests/bad_data.py::shared_dir`) is required: a test that
asks for it FAILS when it is missing, it never skips, so CI cannot pass silently without the real data.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from bad_data import shared_dir


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """`IMGTUNE_CACHE` -> a temp folder for the whole session (never ~/.cache/imgtune)."""
    cache = tmp_path_factory.mktemp("imgtune-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGTUNE_CACHE", str(cache))
        yield cache


@pytest.fixture(autouse=True)
def _isolated_workspace(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """`IMGTUNE_WORKSPACE` -> a fresh temp folder per test (never ./imgtune-runs)."""
    workspace = tmp_path_factory.mktemp("imgtune-runs")
    monkeypatch.setenv("IMGTUNE_WORKSPACE", str(workspace))
    return workspace


@pytest.fixture
def imgtune_cache() -> Path:
    """The session's `IMGTUNE_CACHE` folder."""
    return Path(os.environ["IMGTUNE_CACHE"])


@pytest.fixture
def imgtune_workspace(_isolated_workspace: Path) -> Path:
    """This test's `IMGTUNE_WORKSPACE` folder."""
    return _isolated_workspace


@pytest.fixture(scope="session")
def shared() -> Path:
    """The shared folder (`$IMGTUNE_SHARED` or `<repo>/../shared`); fails, never skips, when it is missing."""
    root = shared_dir()
    if not root.is_dir():
        pytest.fail(
            f"shared folder not found at {root}: set IMGTUNE_SHARED to the folder holding "
            "data/dogs-mini and weights/ (tests never skip for missing data)",
            pytrace=False,
        )
    dogs = root / "data" / "dogs-mini"
    if not (dogs / "train").is_dir():
        pytest.fail(
            f"dogs-mini dataset not found at {dogs} (expected train/valid/test class folders); "
            "the shared folder is incomplete",
            pytrace=False,
        )
    return root


@pytest.fixture(scope="session")
def dogs_mini(shared: Path) -> Path:
    """The dogs-mini dataset: train/valid/test, 10 classes of 224x224 JPEGs."""
    return shared / "data" / "dogs-mini"


@pytest.fixture(scope="session")
def mobilenet_weights(shared: Path) -> Path:
    """Real ImageNet MobileNetV2 feature weights (a torchvision state dict without the classifier)."""
    path = shared / "weights" / "mobilenet_v2_imagenet_features.pth"
    if not path.is_file():
        pytest.fail(f"MobileNetV2 weights not found at {path}; the shared folder is incomplete", pytrace=False)
    return path


DOGS_JOB = "dogs"


@pytest.fixture(scope="session")
def dogs_workspace(tmp_path_factory: pytest.TempPathFactory, dogs_mini: Path, mobilenet_weights: Path) -> Path:
    """A workspace holding one trained job, `dogs` (frozen MobileNetV2, 3 epochs on dogs-mini), trained once per
    session and shared by the serving, export and inference tests; they read it and write elsewhere."""
    from imgtune.config import build_config
    from imgtune.runs.train import run_training_job

    root = tmp_path_factory.mktemp("dogs-workspace")
    config = {
        "name": DOGS_JOB,
        "data": {"path": str(dogs_mini), "num_workers": 0},
        "model": {"backbone": "mobilenet_v2", "weights": str(mobilenet_weights)},
        "train": {"epochs": 3},
        "debugger": {"enabled": False},
        "profiler": {"enabled": False, "report": False},
    }
    run_training_job(build_config(config), workspace=root, progress=False)
    return root


# -- S3: moto's server mode on 127.0.0.1 -----------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """moto's S3 server in a subprocess on 127.0.0.1; yields its endpoint URL."""
    import sys

    from servers import running_server, without_proxies

    log = tmp_path_factory.mktemp("moto") / "server.log"
    command = lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)]  # noqa: E731
    with running_server(command, "/", log, env=without_proxies()) as url:
        yield url


@pytest.fixture(scope="module")
def s3_env(s3_server: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """AWS settings for this module: the moto endpoint, fake credentials, no proxies, no user AWS files.

    Nothing of imgtune, fsspec, s3fs or botocore is mocked: the endpoint comes from AWS_ENDPOINT_URL, as it
    would for a user's MinIO or S3, and every request goes over HTTP to 127.0.0.1 only.
    """
    import s3fs

    from servers import PROXY_VARS

    aws_home = tmp_path_factory.mktemp("aws-home")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("AWS_ENDPOINT_URL", s3_server)
        mp.setenv("AWS_ACCESS_KEY_ID", "testing")
        mp.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        mp.setenv("AWS_DEFAULT_REGION", "us-east-1")
        mp.setenv("AWS_CONFIG_FILE", str(aws_home / "config"))
        mp.setenv("AWS_SHARED_CREDENTIALS_FILE", str(aws_home / "credentials"))
        for name in ("AWS_ENDPOINT_URL_S3", "AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", *PROXY_VARS):
            mp.delenv(name, raising=False)
        # fsspec keeps S3FileSystem instances (and their endpoint) across calls: start and end clean.
        s3fs.S3FileSystem.clear_instance_cache()
        try:
            yield s3_server
        finally:
            s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def s3_client(s3_env: str):
    """A boto3 S3 client for the moto server."""
    import boto3

    return boto3.client("s3")  # endpoint and credentials from the environment, as s3fs gets them


S3_FIXTURES = {"s3_server", "s3_env", "s3_client"}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """`s3` for every test that starts the moto server (through any of its fixtures); `gpu` tests deselected
    unless the `-m` expression names them (`pytest -m gpu`), so that plain `pytest` on a machine without CUDA
    (CI) reports them as deselected, not as failures or skips."""
    for item in items:
        if S3_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.s3)
    if "gpu" in (config.getoption("markexpr", "") or ""):
        return
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [item for item in items if not item.get_closest_marker("gpu")]
        config.stash[_ONLY_GPU_DESELECTED] = not items


_ONLY_GPU_DESELECTED = pytest.StashKey[bool]()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """`pytest tests/gpu` without `-m gpu` deselects every test it collected: that is the expected outcome on a
    machine without a GPU, not pytest's "no tests collected" (exit code 5)."""
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and session.config.stash.get(_ONLY_GPU_DESELECTED, False):
        session.exitstatus = pytest.ExitCode.OK
