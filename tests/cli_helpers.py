"""Building `imgtune` command lines for tests that run it as a separate process."""

from __future__ import annotations

import sys
from pathlib import Path


def train_command(data: Path, weights: Path, name: str, *options: str) -> list[str]:
    """`python -m imgtune train` on `data` with a MobileNetV2 backbone from `weights`, plus `options`."""
    return [
        sys.executable, "-m", "imgtune", "train", "--data", str(data), "--backbone", "mobilenet_v2",
        "--weights", str(weights), "--name", name, *options,
    ]  # fmt: skip
