"""Which GPUs the profiler's monitor samples: those CUDA_VISIBLE_DEVICES leaves the process, read as CUDA reads
it (imgtune.profiler.monitor.visible_gpus, select_gpus). NVML itself needs a driver; these are the rules."""

from __future__ import annotations

import pytest

from imgtune.profiler.monitor import select_gpus, visible_gpus

UUIDS = [
    "GPU-8932f937-d72c-4106-c12f-20bd9faed9f6",
    "GPU-11111111-2222-3333-4444-555555555555",
    "GPU-8932aaaa-0000-0000-0000-000000000000",
    "GPU-feedbeef-0000-0000-0000-000000000000",
]


@pytest.mark.parametrize(
    ("value", "entries"),
    [
        (None, None),  # unset: every GPU
        ("", []),  # Ray's CPU-only workers: no GPU
        ("1", ["1"]),
        ("2, 0", ["2", "0"]),
        ("0,-1,1", ["0"]),  # CUDA stops at the first invalid entry
        ("0,,1", ["0"]),
        ("GPU-1111,3", ["GPU-1111", "3"]),
        ("NoDevFiles", []),
    ],
)
def test_cuda_visible_devices_is_read_as_cuda_reads_it(value, entries):
    assert visible_gpus(value) == entries


@pytest.mark.parametrize(
    ("value", "chosen"),
    [
        (None, [0, 1, 2, 3]),
        ("", []),
        ("2", [2]),
        ("3,1", [3, 1]),  # CUDA's order is the variable's
        ("1,7,2", [1]),  # no GPU 7: it and what follows name nothing
        ("GPU-1111", [1]),  # a UUID prefix
        ("GPU-feedbeef-0000-0000-0000-000000000000,0", [3, 0]),
        ("GPU-8932", [0]),  # an ambiguous prefix: the first (CUDA refuses it; NVML's first is as good a reading)
        ("GPU-0000", []),
        ("1,1", [1]),
    ],
)
def test_the_monitor_samples_only_the_gpus_the_process_may_use(value, chosen):
    assert select_gpus(visible_gpus(value), UUIDS) == chosen
