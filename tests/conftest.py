"""Shared test fixtures.

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
