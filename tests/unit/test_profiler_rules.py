"""Each profiler rule on constructed sample streams: it fires on a bad one and stays silent on a healthy one."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from imgtune.core.errors import ConfigError
from imgtune.profiler.data import ProfileData
from imgtune.profiler.rules import (
    INSUFFICIENT,
    ISSUES,
    NO_ISSUES,
    NOT_APPLICABLE,
    RULES,
    evaluate_rules,
    jensen_shannon,
    make_profiler_rules,
)

RNG = np.random.default_rng(0)
N = 1600  # datapoints: past the default patience of 1000


def samples(
    n: int = N,
    cpu: float | np.ndarray = 50.0,
    cores: int = 4,
    gpu_util: list[np.ndarray] | None = None,
    gpu_mem: list[np.ndarray] | None = None,
    iowait: float | np.ndarray = 1.0,
    rss: np.ndarray | None = None,
) -> list[dict]:
    cpu = np.broadcast_to(cpu, (n,)) if np.ndim(cpu) == 0 else cpu
    iowait = np.broadcast_to(iowait, (n,)) if np.ndim(iowait) == 0 else iowait
    rss = np.full(n, 1e9) if rss is None else rss
    out = []
    for i in range(n):
        per_core = [float(cpu[i])] * cores if np.ndim(cpu[i]) == 0 else list(map(float, cpu[i]))
        sample = {
            "t": 1000.0 + 0.5 * i,
            "cpu": per_core,
            "cpu_total": float(np.mean(per_core)),
            "iowait": float(iowait[i]),
            "proc_rss": float(rss[i]),
            "proc_cpu": 100.0,
            "mem_used": 40.0,
            "mem_available": 16e9,
            "disk_read": 0.0,
            "disk_write": 0.0,
            "net_recv": 0.0,
            "net_sent": 0.0,
        }
        if gpu_util is not None:
            mem = gpu_mem or [np.full(n, 30.0)] * len(gpu_util)
            sample["gpus"] = [
                {"util": float(u[i]), "mem_used": float(m[i]) * 1e8, "mem_total": 100e8}
                for u, m in zip(gpu_util, mem, strict=True)
            ]
        out.append(sample)
    return out


def steps(n: int = 300, total: float | np.ndarray = 0.1, data: float = 0.01, phase: str = "train") -> list[dict]:
    total = np.broadcast_to(total, (n,)) if np.ndim(total) == 0 else total
    return [
        {"phase": phase, "epoch": 1, "batch": i, "step": i, "t": 0.0, "data": data, "h2d": 0.001,
         "forward": 0.03, "backward": 0.04, "optimizer": 0.01, "total": float(total[i])}
        for i in range(n)
    ]  # fmt: skip


def run(rule: str, data: ProfileData, **params) -> dict:
    return evaluate_rules(make_profiler_rules([rule], {rule: params} if params else None), data)[rule]


def busy_gpu(n: int = N) -> np.ndarray:
    return np.clip(RNG.normal(92, 3, n), 0, 100)


def test_every_rule_has_sagemakers_defaults() -> None:
    assert RULES["LowGPUUtilization"].parameters == {
        "threshold_p95": 70, "threshold_p5": 10, "window": 500, "patience": 1000,
    }  # fmt: skip
    assert RULES["CPUBottleneck"].parameters == {
        "threshold": 50,
        "gpu_threshold": 10,
        "cpu_threshold": 90,
        "patience": 1000,
    }
    assert RULES["StepOutlier"].parameters == {"stddev": 3, "mode": None, "n_outliers": 10}
    assert RULES["MaxInitializationTime"].parameters == {"threshold": 20}
    assert RULES["LoadBalancing"].parameters == {"threshold": 0.5, "patience": 1000}
    assert RULES["StragglerRank"].parameters == {"threshold": 1.2, "patience": 5}  # ours: SageMaker has none
    with pytest.raises(ConfigError, match="no parameter"):
        make_profiler_rules(["BatchSize"], {"BatchSize": {"bogus": 1}})
    with pytest.raises(ConfigError, match="unknown profiler rule"):
        make_profiler_rules(["NoSuchRule"])


def test_low_gpu_utilization() -> None:
    healthy = ProfileData(samples=samples(gpu_util=[busy_gpu()]))
    assert run("LowGPUUtilization", healthy)["status"] == NO_ISSUES
    idle = ProfileData(samples=samples(gpu_util=[np.clip(RNG.normal(30, 5, N), 0, 100)]))
    result = run("LowGPUUtilization", idle)
    assert result["status"] == ISSUES and "under-used" in result["message"]
    fluctuating = np.where(np.arange(N) % 4 == 0, 0.0, 95.0)  # p95 high, p5 at zero
    result = run("LowGPUUtilization", ProfileData(samples=samples(gpu_util=[fluctuating])))
    assert result["status"] == ISSUES and "fluctuating" in result["message"]
    assert run("LowGPUUtilization", ProfileData(samples=samples()))["status"] == NOT_APPLICABLE  # no GPU
    short = ProfileData(samples=samples(n=50, gpu_util=[np.zeros(50)]))
    assert run("LowGPUUtilization", short)["status"] == INSUFFICIENT


def test_cpu_bottleneck_with_a_gpu() -> None:
    starved = ProfileData(samples=samples(cpu=97.0, gpu_util=[np.full(N, 3.0)]))
    result = run("CPUBottleneck", starved)
    assert result["status"] == ISSUES and result["triggers"] > 0
    assert run("CPUBottleneck", ProfileData(samples=samples(cpu=97.0, gpu_util=[busy_gpu()])))["status"] == NO_ISSUES


def test_cpu_bottleneck_without_a_gpu_reads_data_wait() -> None:
    waiting = ProfileData(samples=samples(cpu=98.0), steps=steps(total=0.1, data=0.08))
    result = run("CPUBottleneck", waiting)
    assert result["status"] == ISSUES and "no GPU" in result["message"]
    assert result["details"]["data_wait_percent"] == pytest.approx(80, abs=1)
    computing = ProfileData(samples=samples(cpu=98.0), steps=steps(total=0.1, data=0.005))
    assert run("CPUBottleneck", computing)["status"] == NO_ISSUES
    short_job = ProfileData(samples=samples(n=20, cpu=98.0), steps=steps(40, total=0.1, data=0.08))
    assert run("CPUBottleneck", short_job)["status"] == ISSUES  # the step reading needs no sample patience
    assert run("CPUBottleneck", ProfileData(samples=samples(n=20), steps=steps(5)))["status"] == INSUFFICIENT


def test_io_bottleneck() -> None:
    stalled = ProfileData(samples=samples(iowait=70.0, gpu_util=[np.full(N, 2.0)]))
    assert run("IOBottleneck", stalled)["status"] == ISSUES
    assert (
        run("IOBottleneck", ProfileData(samples=samples(iowait=2.0, gpu_util=[np.full(N, 2.0)])))["status"] == NO_ISSUES
    )
    cpu_only = ProfileData(samples=samples(iowait=80.0))  # I/O wait is a CPU reading: meaningful without a GPU
    assert run("IOBottleneck", cpu_only)["status"] == ISSUES


def test_batch_size() -> None:
    idle = ProfileData(samples=samples(cpu=20.0, gpu_util=[np.full(N, 25.0)], gpu_mem=[np.full(N, 10.0)]))
    assert run("BatchSize", idle)["status"] == ISSUES
    full_memory = ProfileData(samples=samples(cpu=20.0, gpu_util=[np.full(N, 25.0)], gpu_mem=[np.full(N, 90.0)]))
    assert run("BatchSize", full_memory)["status"] == NO_ISSUES
    assert run("BatchSize", ProfileData(samples=samples(cpu=30.0)))["status"] == ISSUES  # idle cores, no GPU
    assert run("BatchSize", ProfileData(samples=samples(cpu=95.0)))["status"] == NO_ISSUES


def test_step_outlier() -> None:
    durations = np.clip(RNG.normal(0.1, 0.005, 400), 0.05, None)
    steady = ProfileData(steps=steps(400, total=durations))
    assert run("StepOutlier", steady)["status"] == NO_ISSUES
    spiky = durations.copy()
    spiky[::25] = 1.5  # 16 stalls of 1.5 s
    result = run("StepOutlier", ProfileData(steps=steps(400, total=spiky)))
    assert result["status"] == ISSUES and result["triggers"] == 16
    assert result["details"]["train"]["first_outlier_batches"][:2] == [0, 25]
    assert run("StepOutlier", ProfileData(steps=steps(50)))["status"] == INSUFFICIENT  # needs > 100 steps


def test_dataloader() -> None:
    meta = {"training_mode": "images", "cpus_available": 8, "gpu_count": 0, "device": "cpu", "pin_memory": False}
    assert run("Dataloader", ProfileData(meta={**meta, "num_workers": 1}))["status"] == ISSUES  # 12% of cores
    assert run("Dataloader", ProfileData(meta={**meta, "num_workers": 24}))["status"] == ISSUES  # 300%
    assert run("Dataloader", ProfileData(meta={**meta, "num_workers": 8}))["status"] == NO_ISSUES
    gpu = {**meta, "num_workers": 8, "gpu_count": 1, "device": "cuda"}
    result = run("Dataloader", ProfileData(meta=gpu))
    assert result["status"] == ISSUES and "pinned" in result["message"]
    features = ProfileData(meta={**meta, "training_mode": "features", "num_workers": 0})
    assert run("Dataloader", features)["status"] == NOT_APPLICABLE


def test_gpu_memory_increase() -> None:
    jump = np.concatenate([np.full(1200, 20.0), np.full(400, 90.0)])
    assert (
        run("GPUMemoryIncrease", ProfileData(samples=samples(gpu_util=[busy_gpu()], gpu_mem=[jump])))["status"]
        == ISSUES
    )
    flat = ProfileData(samples=samples(gpu_util=[busy_gpu()], gpu_mem=[np.full(N, 50.0)]))
    assert run("GPUMemoryIncrease", flat)["status"] == NO_ISSUES
    leak = np.concatenate([np.full(1200, 1e9), np.full(400, 14e9)])  # no GPU: the job's own memory
    cpu_only = samples(rss=leak)
    for sample in cpu_only:
        sample["mem_available"] = 17e9 - sample["proc_rss"]
    result = run("GPUMemoryIncrease", ProfileData(samples=cpu_only))
    assert result["status"] == ISSUES and "resident memory" in result["message"]


def test_max_initialization_time() -> None:
    assert run("MaxInitializationTime", ProfileData(timings={"initialization": 25 * 60}))["status"] == ISSUES
    assert run("MaxInitializationTime", ProfileData(timings={"initialization": 30.0}))["status"] == NO_ISSUES
    assert run("MaxInitializationTime", ProfileData(timings={"initialization": 90.0}), threshold=1)["status"] == ISSUES


def test_load_balancing() -> None:
    even = ProfileData(samples=samples(gpu_util=[busy_gpu(), busy_gpu()]))
    assert run("LoadBalancing", even)["status"] == NO_ISSUES
    uneven = ProfileData(samples=samples(gpu_util=[busy_gpu(), np.clip(RNG.normal(20, 3, N), 0, 100)]))
    assert run("LoadBalancing", uneven)["status"] == ISSUES
    one_hot_core = np.tile([99.0, 5.0, 4.0, 6.0], (N, 1))  # no GPU: one core saturated, the rest idle
    result = run("LoadBalancing", ProfileData(samples=samples(cpu=one_hot_core)))
    assert result["status"] == ISSUES and "core 0" in result["message"]
    assert run("LoadBalancing", ProfileData(samples=samples(cpu=60.0)))["status"] == NO_ISSUES
    short = ProfileData(samples=samples(n=50, cpu=np.tile([99.0, 5.0, 4.0, 6.0], (50, 1))))
    assert run("LoadBalancing", short)["status"] == INSUFFICIENT
    assert jensen_shannon(np.array([1, 0]), np.array([0, 1])) == pytest.approx(np.sqrt(np.log(2)))


def test_summaries_never_fire_and_hold_their_tables() -> None:
    data = ProfileData(samples=samples(gpu_util=[busy_gpu()]), steps=steps())
    usage = run("OverallSystemUsage", data)
    assert usage["status"] == NO_ISSUES
    table = {row["metric"]: row for row in usage["details"]["table"]}
    assert table["GPU 0 utilisation"]["p50"] == pytest.approx(92, abs=1)
    assert table["CPU utilisation (all cores)"]["max"] == 50.0
    framework = run("OverallFrameworkMetrics", data)
    assert framework["status"] == NO_ISSUES and "backward" in framework["message"]  # 0.04 s of 0.1 s per step
    assert framework["details"]["train_segments_s"]["other"] == pytest.approx(300 * 0.009, rel=1e-6)


def test_a_failing_rule_is_reported_not_lost() -> None:
    broken = ProfileData(samples=[{"t": 0.0}] * (N + 1))  # samples without the fields the rules read
    results = evaluate_rules(make_profiler_rules(list(RULES)), broken)
    assert set(results) == set(RULES)
    assert all(r["status"] in (ISSUES, NO_ISSUES, NOT_APPLICABLE, INSUFFICIENT, "Error") for r in results.values())


def lockstep(
    n: int = 40,
    data: dict[int, float] | None = None,
    forward: dict[int, float] | None = None,
    other: dict[int, float] | None = None,
    jitter: float = 0.0,
) -> dict[int, list[dict]]:
    """Training steps of synchronous data-parallel ranks, as their timelines record them: each rank's batch
    arrives after its own data wait; the forward starts with a buffer broadcast, so a rank whose batch came
    early waits there for the latest; backward averages gradients, so every rank leaves it together."""
    data, forward, other = data or {0: 0.01, 1: 0.01}, forward or {}, other or {}
    ranks = sorted(data)
    out: dict[int, list[dict]] = {r: [] for r in ranks}
    for i in range(n):
        wait = {r: data[r] + jitter * RNG.random() for r in ranks}
        arrival = {r: wait[r] + 0.001 for r in ranks}
        latest = max(arrival.values())
        compute = {r: forward.get(r, 0.03) + jitter * RNG.random() for r in ranks}
        synced = max(latest + compute[r] + 0.04 for r in ranks)  # everyone leaves backward together
        for r in ranks:
            segments = {
                "data": wait[r],
                "h2d": 0.001,
                "forward": latest - arrival[r] + compute[r],
                "backward": synced - latest - compute[r],
                "optimizer": 0.01,
            }
            total = synced + 0.01 + other.get(r, 0.002)
            out[r].append(
                {
                    "rank": r,
                    "phase": "train",
                    "epoch": 1 + i // 20,
                    "batch": i % 20,
                    "step": i + 1,
                    "t": 0.0,
                    **segments,
                    "total": total,
                }
            )
    return out


def test_straggler_rank_names_the_rank_the_others_wait_for() -> None:
    slow_data = lockstep(data={0: 0.01, 1: 0.01, 2: 0.08})
    totals = {r: np.median([s["total"] for s in records]) for r, records in slow_data.items()}
    assert max(totals.values()) - min(totals.values()) < 1e-9  # the whole step cannot tell: ranks wait for it
    result = run("StragglerRank", ProfileData(rank_steps=slow_data, rank_meta={2: {"host": "node-b"}}))
    assert result["status"] == ISSUES and result["triggers"] == 1
    assert result["message"].startswith("rank 2 (on node-b) took") and result["recommendation"]
    assert result["details"]["slowest_rank"] == 2 and result["details"]["stragglers"] == [2]
    assert result["details"]["ranks"][2]["slowdown"] == pytest.approx((0.08 + 0.001 + 0.03 + 0.012) / 0.053)
    assert result["datapoints"] == 40 - 5  # patience: the first 5 steps are warm-up

    slow_forward = run("StragglerRank", ProfileData(rank_steps=lockstep(forward={0: 0.03, 1: 0.07})))
    assert slow_forward["status"] == ISSUES and slow_forward["details"]["stragglers"] == [1]
    busy_rank0 = run("StragglerRank", ProfileData(rank_steps=lockstep(other={0: 0.05})))  # rank 0 alone writes
    assert busy_rank0["status"] == ISSUES and busy_rank0["details"]["stragglers"] == [0]


def test_straggler_rank_is_quiet_when_the_ranks_keep_pace() -> None:
    even = run("StragglerRank", ProfileData(rank_steps=lockstep(data={0: 0.01, 1: 0.01, 2: 0.01}, jitter=0.002)))
    assert even["status"] == NO_ISSUES and even["details"]["slowdown"] < 1.2 and not even["details"]["stragglers"]
    mild = ProfileData(rank_steps=lockstep(data={0: 0.01, 1: 0.03}))  # 1.38x
    assert run("StragglerRank", mild)["status"] == ISSUES
    assert run("StragglerRank", mild, threshold=1.5)["status"] == NO_ISSUES


def test_straggler_rank_needs_ranks_and_steps() -> None:
    assert run("StragglerRank", ProfileData(steps=steps()))["status"] == NOT_APPLICABLE  # a single process
    assert run("StragglerRank", ProfileData(rank_steps={0: lockstep()[0]}))["status"] == NOT_APPLICABLE
    lost = ProfileData(rank_steps={0: lockstep()[0]}, meta={"world_size": 2})  # a rank recorded nothing
    assert run("StragglerRank", lost)["status"] == INSUFFICIENT
    assert run("StragglerRank", ProfileData(rank_steps=lockstep(n=8)))["status"] == INSUFFICIENT  # 3 after patience
    assert run("StragglerRank", ProfileData(rank_steps=lockstep(n=8)), patience=0)["status"] == NO_ISSUES


def test_a_data_parallel_profile_loads_every_rank_and_node(tmp_path: Path) -> None:
    directory = tmp_path / "profiler"
    directory.mkdir()
    ranks = lockstep(n=10)
    for rank, records in ranks.items():
        (directory / f"steps.rank{rank}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
        (directory / f"meta.rank{rank}.json").write_text(json.dumps({"rank": rank, "world_size": 2, "host": "h"}))
    node = [{**sample, "rank": 0, "host": "h"} for sample in samples(n=3)]
    (directory / "system.rank0.jsonl").write_text("".join(json.dumps(s) + "\n" for s in node))
    (directory / "system.jsonl").write_text(json.dumps(samples(n=1)[0]) + "\n")  # the job's own process
    data = ProfileData.load(tmp_path)
    assert sorted(data.rank_steps) == [0, 1] and data.steps == ranks[0] and data.meta["rank"] == 0
    assert data.world_size == 2 and list(data.node_samples) == [0] and data.samples == node  # rank 0's node
    single = ProfileData.load(tmp_path / "nothing")
    assert single.world_size == 1 and not single.rank_steps and not single.steps


@pytest.mark.parametrize(
    ("planned", "start", "steps", "share", "expected"),
    [
        (None, 5, 5, 0.04, (5, 5)),  # not known: the configured window
        (1000, 5, 5, 0.04, (5, 5)),  # a long job: the configured window
        (100, 5, 5, 0.04, (5, 4)),  # 4 % of 100 steps
        (30, 5, 5, 0.04, (5, 1)),
        (24, 5, 5, 0.04, (None, 0)),  # under 25 steps: no trace at all
        (10, 5, 5, 1.0, (5, 5)),  # share 1: the whole job may be traced
        (6, 5, 5, 1.0, (1, 5)),  # too short for the warm-up: the window starts early enough to fit
    ],
)
def test_the_trace_window_fits_a_share_of_the_planned_steps(planned, start, steps, share, expected):
    from imgtune.profiler.timeline import fit_trace_window

    window = fit_trace_window(planned, start, steps, share)
    assert (window["start"], window["steps"]) == expected
    assert (window["reason"] is None) == (expected == (start, steps))  # a changed window says why


def test_a_resumed_job_fits_its_trace_window_to_the_epochs_left(tmp_path):
    """A job resumed after 8 of its 10 epochs (the checkpoint set the Trainer's epoch) runs 2 epochs of 50 steps:
    its window is 4 % of 100 steps, not of 500."""
    from torch import nn

    from imgtune.profiler.timeline import StepTimeline
    from imgtune.training.trainer import Trainer

    module = nn.Linear(2, 2)
    trainer = Trainer(module, torch.optim.SGD(module.parameters(), lr=0.1), {"train": []}, epochs=10, num_classes=2)
    timeline = StepTimeline(tmp_path, trace_start_step=5, trace_steps=5, trace_max_share=0.04, steps_per_epoch=50)
    trainer.epoch = 8
    timeline.on_fit_start(trainer)
    window = json.loads((tmp_path / "meta.json").read_text())["trace"]
    assert (window["planned_steps"], window["start"], window["steps"]) == (100, 5, 4)
    timeline.close()
