"""Fixtures of the GPU tests (`pytest -m gpu`; tests/conftest.py deselects them otherwise).

A GPU test asks for `cuda`, which FAILS (never skips) when torch sees no CUDA GPU: `pytest -m gpu` on a machine
without one is a mistake to report, not a pass.
"""

from __future__ import annotations

import os
import shutil
import subprocess

import pytest
import torch


def _why_no_cuda() -> str:
    smi = shutil.which("nvidia-smi")
    seen = "nvidia-smi not found"
    if smi:
        done = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
        seen = (done.stdout or done.stderr).strip() or f"nvidia-smi exited {done.returncode}"
    return (
        f"`pytest -m gpu` needs a CUDA GPU, and torch {torch.__version__} (CUDA build {torch.version.cuda}) sees "
        f"none; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')}; nvidia-smi -L: {seen}"
    )


@pytest.fixture(scope="session")
def cuda() -> torch.device:
    """The first CUDA GPU; fails the test when there is none."""
    if not torch.cuda.is_available():
        pytest.fail(_why_no_cuda(), pytrace=False)
    return torch.device("cuda", 0)


@pytest.fixture(scope="session")
def two_gpus(cuda: torch.device) -> int:
    """The GPU count, for tests that need two (NCCL refuses two ranks on one GPU): skips with the reason on a
    machine with one GPU, which is a fact of the machine, not a failure of the code."""
    count = torch.cuda.device_count()
    if count < 2:
        pytest.skip(f"needs 2 CUDA GPUs for 2 NCCL ranks; this machine has {count}")
    return count
