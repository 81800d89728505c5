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


# Training on images (no feature cache) in one process, small batches, fp32 in the default memory format (no
# bf16 autocast, no channels_last, which make it several times faster where the CPU has bf16): slow enough to
# kill mid-epoch.
SLOW_IMAGE_TRAINING = (
    "--image-size", "64", "--set", "train.feature_cache=false", "--set", "data.num_workers=0",
    "--set", "train.batch_size=16", "--set", "train.mixed_precision=off", "--set", "train.channels_last=false",
)  # fmt: skip


def resume_command(name: str, *options: str) -> list[str]:
    """`python -m imgtune train --resume NAME`."""
    return [sys.executable, "-m", "imgtune", "train", "--resume", name, *options]
