"""The profiler's rules, with SageMaker Debugger's names, parameters and defaults, over a job's ProfileData.

A profiler rule is an `imgtune.rules.Rule` of kind "profiler": `evaluate(data)` returns a RuleResult,
``IssuesFound`` (with how many datapoints triggered it, and the rule's `advice` as its recommendation),
``NoIssuesFound``, ``InsufficientData`` (too few datapoints yet), or ``NotApplicable`` where the run cannot
tell (e.g. a GPU rule on a machine without a GPU, which says so instead of firing falsely). Where a CPU-only
reading is meaningful (data loading dominating the step, one core saturated, memory growing), the rule reads
that.

`patience` is, as in SageMaker, the number of first datapoints skipped (initialisation); `window` the
number of datapoints over which percentiles are taken.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Any, ClassVar

import numpy as np

import imgtune.rules as contract
from imgtune.profiler.data import ProfileData, percentiles
from imgtune.profiler.timeline import SEGMENTS
from imgtune.rules import RuleResult, Status

KIND = "profiler"
ISSUES, NO_ISSUES, NOT_APPLICABLE = Status.ISSUES, Status.NO_ISSUES, Status.NOT_APPLICABLE
INSUFFICIENT = Status.INSUFFICIENT

__all__ = [
    "INSUFFICIENT",
    "ISSUES",
    "NOT_APPLICABLE",
    "NO_ISSUES",
    "RULES",
    "ProfilerRule",
    "RuleResult",
    "evaluate_rules",
    "jensen_shannon",
    "make_profiler_rules",
    "rank_step_table",
    "rank_step_times",
    "system_usage_table",
]


class ProfilerRule(contract.Rule, register=False):
    """Base class of profiler rules: subclasses set `parameters`, `description`, `advice` and implement
    `evaluate(data)`, which returns a RuleResult (made with `self.result`)."""

    kind: ClassVar[str] = KIND

    def result(self, status: Status, message: str, **kwargs: Any) -> RuleResult:
        """A result of this rule; one with issues recommends the rule's advice unless given a recommendation."""
        defaults = {
            "datapoints": 0,
            "triggers": 0,
            "recommendation": self.advice if status == ISSUES else "",
            "details": {},
            "parameters": self.params,
        }
        return RuleResult(self.name, status, message, **{**defaults, **kwargs})

    def evaluate(self, data: ProfileData) -> RuleResult:
        raise NotImplementedError


def _after_patience(values: np.ndarray, patience: int) -> np.ndarray:
    """The datapoints after the first `patience` (SageMaker's rules wait for more than `patience` of them)."""
    return values[int(patience) :]


def _too_few(rule: ProfilerRule, count: int, what: str = "samples") -> RuleResult:
    return rule.result(
        INSUFFICIENT,
        f"not evaluated: {count} {what}, and the rule waits for more than patience={rule.patience} "
        f"(lower it with rule_parameters for short jobs)",
        datapoints=count,
    )


def _windows(values: np.ndarray, window: int) -> list[np.ndarray]:
    window = max(int(window), 1)
    return [values[i : i + window] for i in range(0, len(values), window)] or [values]


def _no_gpu(rule: ProfilerRule) -> RuleResult:
    return rule.result(NOT_APPLICABLE, "no NVIDIA GPU was seen during this job; the rule does not apply")


class LowGPUUtilization(ProfilerRule):
    """Per GPU and window: fires when p95 utilisation is below `threshold_p95` (under-used), or when p95 is
    above it but p5 is below `threshold_p5` (fluctuating: often waiting for data or synchronisation)."""

    parameters = {"threshold_p95": 70, "threshold_p5": 10, "window": 500, "patience": 1000}
    description = "GPU under-utilised or fluctuating"
    advice = (
        "Use a larger batch size, more data loader workers, or a smaller (cheaper) instance; if "
        "utilisation fluctuates, look for data loading or synchronisation stalls in the step timeline."
    )

    def evaluate(self, data: ProfileData) -> RuleResult:
        if not data.gpu_count:
            return _no_gpu(self)
        if len(data.samples) <= self.patience:
            return _too_few(self, len(data.samples))
        triggers = datapoints = 0
        evidence = []
        for gpu in range(data.gpu_count):
            util = _after_patience(data.gpu_series(gpu, "util"), self.patience)
            datapoints += util.size
            for chunk in _windows(util[np.isfinite(util)], self.window):
                if chunk.size == 0:
                    continue
                p5, p95 = np.percentile(chunk, [5, 95])
                if p95 < self.threshold_p95 or p5 < self.threshold_p5:
                    triggers += 1
                    kind = "under-used" if p95 < self.threshold_p95 else "fluctuating"
                    evidence.append({"gpu": gpu, "p5": float(p5), "p95": float(p95), "kind": kind})
        if not triggers:
            return self.result(NO_ISSUES, "GPU utilisation stayed high", datapoints=datapoints)
        worst = min(evidence, key=lambda e: e["p95"])
        return self.result(
            ISSUES,
            f"GPU {worst['gpu']} {worst['kind']}: p95 {worst['p95']:.0f}%, p5 {worst['p5']:.0f}%",
            datapoints=datapoints,
            triggers=triggers,
            details={"windows": evidence[:20]},
        )


MIN_CPU_READING_STEPS = 10


class CPUBottleneck(ProfilerRule):
    """With a GPU: fires when more than `threshold` % of datapoints have a core above `cpu_threshold` % while a
    GPU is below `gpu_threshold` %. Without one: fires when training steps spend more than `threshold` % of
    their time waiting for data while the CPU is above `cpu_threshold` % (data preparation starves the model);
    this reading uses the step records, so it needs 10 training steps rather than `patience` samples."""

    parameters = {"threshold": 50, "gpu_threshold": 10, "cpu_threshold": 90, "patience": 1000}
    description = "the CPU holds the training back"
    advice = (
        "Move data preparation off the critical path: more data loader workers, cached features "
        "(freeze the backbone; train.feature_cache), smaller images (data.image_size), or a machine with more "
        "cores (per GPU)."
    )

    def evaluate(self, data: ProfileData) -> RuleResult:
        if data.gpu_count and len(data.samples) <= self.patience:
            return _too_few(self, len(data.samples))
        cores = data.core_matrix()
        cpu = _after_patience(np.nanmax(cores, axis=1) if cores.size else data.series("cpu_total"), self.patience)
        if data.gpu_count:
            gpu = _after_patience(data.least_busy_gpu(), self.patience)
            n = min(cpu.size, gpu.size)
            bottleneck = int(np.sum((cpu[:n] > self.cpu_threshold) & (gpu[:n] < self.gpu_threshold)))
            share = 100 * bottleneck / n if n else 0.0
            if share > self.threshold:
                return self.result(
                    ISSUES,
                    f"{share:.0f}% of samples had a core above {self.cpu_threshold}% while a GPU was below "
                    f"{self.gpu_threshold}%",
                    datapoints=n,
                    triggers=bottleneck,
                    details={"share_percent": share},
                )
            return self.result(
                NO_ISSUES, f"CPU-bound samples: {share:.0f}% (threshold {self.threshold}%)", datapoints=n
            )
        # No GPU: the reading is the training steps' own (no system-sample patience): how much of their time
        # went to waiting for data, and how busy the cores were meanwhile.
        waits, totals = data.step_array("data"), data.step_array("total")
        if totals.size < MIN_CPU_READING_STEPS or not data.samples:
            return self.result(INSUFFICIENT, f"no GPU, and fewer than {MIN_CPU_READING_STEPS} training steps to judge")
        wait_share = 100 * float(waits.sum()) / max(float(totals.sum()), 1e-9)
        busy = float(np.nanmedian(data.series("cpu_total")))
        details = {"data_wait_percent": wait_share, "cpu_median_percent": busy}
        if wait_share > self.threshold and busy > self.cpu_threshold:
            return self.result(
                ISSUES,
                f"no GPU: training steps wait for data {wait_share:.0f}% of their time while the CPU is "
                f"{busy:.0f}% busy (median)",
                datapoints=int(totals.size),
                triggers=1,
                details=details,
            )
        return self.result(
            NO_ISSUES,
            f"no GPU: data wait is {wait_share:.0f}% of step time, CPU {busy:.0f}% busy (median)",
            datapoints=int(totals.size),
            details=details,
        )


class IOBottleneck(ProfilerRule):
    """Fires when more than `threshold` % of datapoints have I/O wait above `io_threshold` % (and, with a GPU,
    GPU utilisation below `gpu_threshold` %). I/O wait is a CPU reading, so it is meaningful without a GPU."""

    parameters = {"threshold": 50, "io_threshold": 50, "gpu_threshold": 10, "patience": 1000}
    description = "storage holds the training back"
    advice = (
        "Read from faster storage: copy the dataset to a local disk (s3:// sources are cached once), "
        "use more loader workers to overlap reads, or cache features."
    )

    def evaluate(self, data: ProfileData) -> RuleResult:
        if len(data.samples) <= self.patience:
            return _too_few(self, len(data.samples))
        iowait = _after_patience(data.series("iowait"), self.patience)
        waiting = iowait > self.io_threshold
        if data.gpu_count:
            gpu = _after_patience(data.least_busy_gpu(), self.patience)
            n = min(len(waiting), gpu.size)
            waiting = waiting[:n] & (gpu[:n] < self.gpu_threshold)
        share = 100 * float(waiting.mean()) if waiting.size else 0.0
        details = {"share_percent": share, "iowait_p95": percentiles(iowait)["p95"]}
        if share > self.threshold:
            return self.result(
                ISSUES,
                f"{share:.0f}% of samples waited on I/O above {self.io_threshold}%",
                datapoints=int(waiting.size),
                triggers=int(waiting.sum()),
                details=details,
            )
        return self.result(NO_ISSUES, f"I/O-bound samples: {share:.0f}%", datapoints=int(waiting.size), details=details)


class BatchSize(ProfilerRule):
    """Fires when, in a window, p95 CPU is below `cpu_threshold_p95` %, and (with a GPU) p95 GPU utilisation
    and p95 GPU memory are below theirs: the hardware is idle and a larger batch would use it. Without a GPU,
    idle cores alone say so."""

    parameters = {
        "cpu_threshold_p95": 70,
        "gpu_threshold_p95": 70,
        "gpu_memory_threshold_p95": 70,
        "patience": 1000,
        "window": 500,
    }
    description = "the batch is too small for the hardware"
    advice = (
        "Try a larger batch size (train.batch_size), scaling the learning rate with it, or a smaller "
        "machine. On a CPU, also check that torch uses all cores (torch.set_num_threads)."
    )

    def evaluate(self, data: ProfileData) -> RuleResult:
        if len(data.samples) <= max(self.patience, self.window):
            return _too_few(self, len(data.samples))
        cpu = _after_patience(data.series("cpu_total"), self.patience)
        triggers, evidence = 0, []
        gpus = range(data.gpu_count)
        util = [_after_patience(data.gpu_series(i, "util"), self.patience) for i in gpus]
        memory = [_after_patience(data.gpu_memory_percent(i), self.patience) for i in gpus]
        for start in range(0, cpu.size, max(int(self.window), 1)):
            stop = start + int(self.window)
            cpu_p95 = float(np.nanpercentile(cpu[start:stop], 95))
            low = cpu_p95 < self.cpu_threshold_p95
            entry = {"start": start, "cpu_p95": cpu_p95}
            for i in gpus:
                gpu_p95 = float(np.nanpercentile(util[i][start:stop], 95))
                mem_p95 = float(np.nanpercentile(memory[i][start:stop], 95))
                low = low and gpu_p95 < self.gpu_threshold_p95 and mem_p95 < self.gpu_memory_threshold_p95
                entry.update({f"gpu{i}_p95": gpu_p95, f"gpu{i}_memory_p95": mem_p95})
            if low:
                triggers += 1
                evidence.append(entry)
        if not triggers:
            return self.result(NO_ISSUES, "the hardware was busy enough for this batch size", datapoints=int(cpu.size))
        what = "CPU, GPU and GPU memory were" if data.gpu_count else "no GPU; the cores were"
        return self.result(
            ISSUES,
            f"{what} under-used (p95 CPU {evidence[0]['cpu_p95']:.0f}%) in {triggers} window(s)",
            datapoints=int(cpu.size),
            triggers=triggers,
            details={"windows": evidence[:20]},
        )


MIN_OUTLIER_STEPS = 100


class StepOutlier(ProfilerRule):
    """Fires when more than `n_outliers` steps of a phase (or only of `mode`: train, valid or test) take longer
    than mean + `stddev` standard deviations of that phase's step durations; a phase is judged once it has
    more than 100 steps (first steps are slow, which `n_outliers` forgives)."""

    parameters = {"stddev": 3, "mode": None, "n_outliers": 10}
    description = "some steps take far longer than the rest"
    advice = (
        "Look at the step timeline around the outliers: periodic ones are usually checkpoints, evaluation "
        "or garbage collection; data-wait spikes point at slow files or too few loader workers."
    )

    def evaluate(self, data: ProfileData) -> RuleResult:
        phases = [self.mode] if self.mode else data.phases()
        total_steps = triggers = 0
        evidence: dict[str, Any] = {}
        for phase in phases:
            durations = data.step_array("total", phase)
            if durations.size <= MIN_OUTLIER_STEPS:  # as SageMaker: judged only past 100 steps of a phase
                continue
            total_steps += durations.size
            mean, std = float(durations.mean()), float(durations.std())
            limit = mean + self.stddev * std
            outliers = np.flatnonzero(durations > limit) if std > 0 else np.array([], dtype=int)
            evidence[phase] = {
                "mean_s": mean,
                "std_s": std,
                "limit_s": limit,
                "outliers": int(outliers.size),
                "max_s": float(durations.max()),
                "first_outlier_batches": outliers[:10].tolist(),
            }
            if outliers.size > self.n_outliers:
                triggers += int(outliers.size)
        if not total_steps:
            return self.result(
                INSUFFICIENT,
                f"not evaluated: no phase had more than {MIN_OUTLIER_STEPS} steps",
                datapoints=len(data.steps),
            )
        if not triggers:
            return self.result(NO_ISSUES, "step durations were steady", datapoints=total_steps, details=evidence)
        worst = max(evidence, key=lambda p: evidence[p]["outliers"])
        return self.result(
            ISSUES,
            f"{evidence[worst]['outliers']} {worst} steps took longer than {evidence[worst]['limit_s'] * 1000:.1f} ms "
            f"(mean {evidence[worst]['mean_s'] * 1000:.1f} ms)",
            datapoints=total_steps,
            triggers=triggers,
            details=evidence,
        )


class Dataloader(ProfilerRule):
    """Fires when the data loader's worker processes are fewer than `min_threshold` % or more than
    `max_threshold` % of the available cores, or when a GPU job does not pin host memory."""

    parameters = {"min_threshold": 70, "max_threshold": 200}
    description = "the data loader's worker count does not fit the machine"
    advice = "Set data.num_workers near the number of cores the job may use; keep pin_memory on for GPUs."

    def evaluate(self, data: ProfileData) -> RuleResult:
        meta = data.meta
        if meta.get("training_mode") == "features":
            return self.result(
                NOT_APPLICABLE, "the training loop read cached features; images were only loaded once, for the cache"
            )
        workers, cores = meta.get("num_workers"), meta.get("cpus_available") or meta.get("cpu_count")
        if workers is None or not cores:
            return self.result(NOT_APPLICABLE, "the job did not record its loader settings")
        share = 100 * workers / cores
        problems = []
        if share < self.min_threshold:
            problems.append(f"{workers} loader worker(s) for {cores} cores ({share:.0f}% < {self.min_threshold}%)")
        if share > self.max_threshold:
            problems.append(f"{workers} loader workers for {cores} cores ({share:.0f}% > {self.max_threshold}%)")
        if meta.get("gpu_count") and str(meta.get("device", "")).startswith("cuda") and not meta.get("pin_memory"):
            problems.append("host memory is not pinned for copies to the GPU")
        details = {"workers": workers, "cores": cores, "percent_of_cores": share}
        if problems:
            return self.result(
                ISSUES,
                "; ".join(problems),
                datapoints=1,
                triggers=len(problems),
                details=details,
            )
        return self.result(NO_ISSUES, f"{workers} loader workers for {cores} cores", datapoints=1, details=details)


class GPUMemoryIncrease(ProfilerRule):
    """Fires when the moving average (over `window` datapoints) of GPU memory use, in % of the GPU's memory,
    rises by more than `increase` points from one datapoint to the next, after `patience` datapoints. Without
    a GPU it watches the job's resident memory as a share of the machine's instead (a leak shows there)."""

    parameters = {"increase": 5, "patience": 1000, "window": 10}
    description = "memory use jumps"
    advice = (
        "If the footprint nears the device's memory, use a smaller batch or a larger device; if it keeps "
        "rising, something holds tensors across steps (e.g. summing losses without .item())."
    )

    def evaluate(self, data: ProfileData) -> RuleResult:
        if len(data.samples) <= self.patience:
            return _too_few(self, len(data.samples))
        if data.gpu_count:
            curves = {f"gpu{i}": data.gpu_memory_percent(i) for i in range(data.gpu_count)}
            what = "GPU memory"
        else:
            machine = data.series("mem_available") + data.series("proc_rss")
            curves = {"process": 100 * data.series("proc_rss") / machine}
            what = "no GPU; the job's resident memory"
        window = int(self.window)
        jumps: dict[str, list[float]] = {}
        for name, curve in curves.items():
            curve = curve[np.isfinite(curve)]
            if curve.size <= window:
                continue
            averages = np.convolve(curve, np.ones(window) / window, mode="valid")
            rises = np.diff(averages)[max(int(self.patience) - window, 0) :]
            jumps[name] = rises[rises > self.increase].round(2).tolist()
        triggers = sum(len(j) for j in jumps.values())
        if triggers:
            worst = max(jumps, key=lambda n: max(jumps[n], default=0))
            return self.result(
                ISSUES,
                f"{what} rose by up to {max(jumps[worst]):.1f} points of the total between samples ({worst})",
                datapoints=len(data.samples),
                triggers=triggers,
                details={"jumps_percent_points": {k: v[:20] for k, v in jumps.items()}},
            )
        return self.result(NO_ISSUES, f"{what} had no jumps above {self.increase} points", datapoints=len(data.samples))


class MaxInitializationTime(ProfilerRule):
    """Fires when initialisation (job start to the first training step) took longer than `threshold` minutes."""

    parameters = {"threshold": 20}
    description = "initialisation takes too long"
    advice = (
        "Most of it is usually data: copy s3:// data once (it is cached), keep the feature cache "
        "between jobs, and check `imgtune data check` for very large images."
    )

    def evaluate(self, data: ProfileData) -> RuleResult:
        seconds = data.timings.get("initialization")
        if seconds is None:
            return self.result(NOT_APPLICABLE, "the job did not record its initialisation time")
        details = {"initialization_s": seconds, "feature_cache_s": data.timings.get("feature_cache", 0.0)}
        if seconds > 60 * self.threshold:
            return self.result(
                ISSUES,
                f"initialisation took {seconds / 60:.1f} min (> {self.threshold} min)",
                datapoints=1,
                triggers=1,
                details=details,
            )
        return self.result(NO_ISSUES, f"initialisation took {seconds:.1f} s", datapoints=1, details=details)


class LoadBalancing(ProfilerRule):
    """With two or more GPUs: fires when the utilisation histograms (2 % bins) of two GPUs are further apart
    than `threshold` (Jensen-Shannon distance, natural log: 0 to 0.83). On a CPU it reads the cores: one core
    saturated while the others idle is a single-threaded stage."""

    parameters = {"threshold": 0.5, "patience": 1000}
    description = "work is unevenly spread"
    advice = (
        "Balance the work: across GPUs, equal per-device batches and no rank doing extra work (evaluation, "
        "logging) alone; on a CPU, one saturated core is a single-threaded stage: use data loader workers "
        "(data.num_workers) and check that torch.get_num_threads() matches the cores."
    )

    def evaluate(self, data: ProfileData) -> RuleResult:
        if data.gpu_count >= 2:
            if len(data.samples) <= self.patience:
                return _too_few(self, len(data.samples))
            hists = []
            for i in range(data.gpu_count):
                util = data.gpu_series(i, "util")
                hists.append(np.histogram(util[np.isfinite(util)], bins=np.arange(0, 100, 2))[0])
            worst = max(
                (jensen_shannon(hists[a], hists[b]), a, b) for a in range(len(hists)) for b in range(a + 1, len(hists))
            )
            if worst[0] > self.threshold:
                return self.result(
                    ISSUES,
                    f"GPUs {worst[1]} and {worst[2]} were used unevenly (distance {worst[0]:.2f})",
                    datapoints=len(data.samples),
                    triggers=1,
                )
            return self.result(NO_ISSUES, "GPU load was even", datapoints=len(data.samples))
        if len(data.samples) <= self.patience:
            return _too_few(self, len(data.samples))
        cores = data.core_matrix()[int(self.patience) :]
        if cores.shape[1] < 2:
            return self.result(NOT_APPLICABLE, "fewer than two GPUs and one core: nothing to balance")
        p95 = np.nanpercentile(cores, 95, axis=0)
        median = np.nanmedian(cores, axis=0)
        hot = int(np.argmax(median))
        others = np.delete(median, hot)
        details = {"core_median_percent": median.round(1).tolist(), "core_p95_percent": p95.round(1).tolist()}
        if median[hot] > 90 and float(np.max(others)) < 50:
            return self.result(
                ISSUES,
                f"no GPU; core {hot} was saturated (median {median[hot]:.0f}%) while the others idled "
                f"(at most {float(np.max(others)):.0f}%)",
                datapoints=int(cores.shape[0]),
                triggers=1,
                details=details,
            )
        return self.result(
            NO_ISSUES, "no GPU; the cores were evenly used", datapoints=int(cores.shape[0]), details=details
        )


def jensen_shannon(counts_a: np.ndarray, counts_b: np.ndarray) -> float:
    """Jensen-Shannon distance of two histograms (normalised; natural log, as scipy.stats.entropy)."""
    p = counts_a / max(counts_a.sum(), 1)
    q = counts_b / max(counts_b.sum(), 1)
    m = (p + q) / 2

    def kl(x: np.ndarray) -> float:
        mask = x > 0
        return float(np.sum(x[mask] * np.log(x[mask] / m[mask])))

    return math.sqrt(max((kl(p) + kl(q)) / 2, 0.0))


def rank_step_times(data: ProfileData, patience: int = 0) -> dict[int, dict[str, np.ndarray]]:
    """Per rank of a data-parallel job: seconds per training step, of the steps every rank recorded (matched by
    epoch and batch, in order, the first `patience` left out): the step's `total`, each segment, and `own`.

    `own` is what the rank did alone: the step's total less backward (where gradients are averaged over the
    ranks, so each waits there for the slowest) and less what it waited at the forward's start for the rank
    whose batch arrived last (DDP broadcasts buffers there; every rank starts each step together, after the
    ranks agree on stopping): its data wait, copy to the device, forward computation, optimizer step and
    callbacks. A step recorded twice (a restarted worker repeats it) counts as last recorded."""
    tables: dict[int, dict[tuple[int, int], dict[str, Any]]] = {}
    for rank, records in sorted(data.rank_steps.items()):
        tables[rank] = {
            (int(s.get("epoch", 0)), int(s.get("batch", 0))): s for s in records if s.get("phase") == "train"
        }
    if not tables:
        return {}
    keys = sorted(set.intersection(*(set(table) for table in tables.values())))[max(int(patience), 0) :]
    columns = {
        rank: {k: np.array([float(table[key].get(k, 0.0)) for key in keys]) for k in (*SEGMENTS, "total")}
        for rank, table in tables.items()
    }
    arrival = {rank: c["data"] + c["h2d"] for rank, c in columns.items()}
    latest = np.max(np.stack(list(arrival.values())), axis=0)
    for rank, c in columns.items():
        c["own"] = c["total"] - c["backward"] - np.minimum(c["forward"], latest - arrival[rank])
    return columns


def rank_step_table(data: ProfileData, patience: int = 0) -> list[dict[str, Any]]:
    """One row per rank of a data-parallel job (none for a single process): its host, the training steps
    compared, medians in ms of its step, own time (see `rank_step_times`) and segments, and `slowdown`, its own
    time over the fastest rank's."""
    times = rank_step_times(data, patience)
    if len(times) < 2 or not next(iter(times.values()))["total"].size:
        return []
    rows = []
    for rank, c in times.items():
        row: dict[str, Any] = {"rank": rank, "host": data.rank_meta.get(rank, {}).get("host"), "steps": c["total"].size}
        row["step_ms"] = 1000 * float(np.median(c["total"]))
        row["own_ms"] = 1000 * float(np.median(c["own"]))
        for key in SEGMENTS:
            row[f"{key}_ms"] = 1000 * float(np.median(c[key]))
        row["other_ms"] = 1000 * float(np.median(c["total"] - sum(c[key] for key in SEGMENTS)))
        rows.append(row)
    fastest = max(min(row["own_ms"] for row in rows), 1e-6)
    for row in rows:
        row["slowdown"] = row["own_ms"] / fastest
    return rows


MIN_STRAGGLER_STEPS = 5


class StragglerRank(ProfilerRule):
    """Data-parallel jobs: fires when a rank's median own time per training step (what it did alone: its data
    wait, copy to the device, forward computation, optimizer step and callbacks) is more than `threshold`
    times the fastest rank's, over the training steps every rank recorded after the first `patience`. The whole
    step cannot tell: synchronous ranks wait for each other, so every rank's step lasts as long as the
    slowest's (see `rank_step_times`). NotApplicable to a single-process job."""

    parameters = {"threshold": 1.2, "patience": 5}
    description = "one rank of a data-parallel job holds the others back"
    advice = (
        "Every rank waits for the slowest at each step: look at what the straggler does alone. A longer data "
        "wait points at its node's storage or loader (data.num_workers; a local copy of the data); a longer "
        "forward at a slower or busier device or node (other work on it, fewer cores: train.cpus_per_worker); "
        "more callback time at work only that rank does (rank 0 writes metrics, debugger tensors and "
        "checkpoints: save less often). Give the ranks equal machines and equal shares."
    )

    def evaluate(self, data: ProfileData) -> RuleResult:
        if len(data.rank_steps) < 2:
            if data.world_size > 1:
                return self.result(
                    INSUFFICIENT,
                    f"the job trained on {data.world_size} ranks but {len(data.rank_steps)} recorded its steps",
                )
            return self.result(NOT_APPLICABLE, "a single-process job: there is no other rank to compare with")
        rows = rank_step_table(data, self.patience)
        count = rows[0]["steps"] if rows else 0
        if count < MIN_STRAGGLER_STEPS:
            return self.result(
                INSUFFICIENT,
                f"not evaluated: {count} training steps recorded by every rank after patience={self.patience}; "
                f"the rule needs {MIN_STRAGGLER_STEPS}",
                datapoints=count,
            )
        fastest = min(rows, key=lambda row: row["own_ms"])
        slowest = max(rows, key=lambda row: row["own_ms"])
        stragglers = [row["rank"] for row in rows if row["slowdown"] > self.threshold]
        details = {
            "ranks": rows,
            "fastest_rank": fastest["rank"],
            "slowest_rank": slowest["rank"],
            "slowdown": slowest["slowdown"],
            "stragglers": stragglers,
        }
        where = f" (on {slowest['host']})" if slowest.get("host") else ""
        if stragglers:
            return self.result(
                ISSUES,
                f"rank {slowest['rank']}{where} took {slowest['slowdown']:.2f}x the fastest rank's (rank "
                f"{fastest['rank']}) own time per training step: median {slowest['own_ms']:.1f} ms vs "
                f"{fastest['own_ms']:.1f} ms; the other ranks wait for it",
                datapoints=count,
                triggers=len(stragglers),
                details=details,
            )
        return self.result(
            NO_ISSUES,
            f"the ranks kept pace: the slowest, rank {slowest['rank']}, took {slowest['slowdown']:.2f}x the "
            f"fastest's own time per training step (threshold {self.threshold}x)",
            datapoints=count,
            details=details,
        )


SYSTEM_METRICS = {
    "cpu_total": ("CPU utilisation (all cores)", "%"),
    "proc_cpu": ("job CPU (one core = 100)", "%"),
    "iowait": ("I/O wait", "%"),
    "mem_used": ("system memory used", "%"),
    "proc_rss": ("job resident memory", "MB"),
    "disk_read": ("disk read", "MB/s"),
    "disk_write": ("disk write", "MB/s"),
    "net_recv": ("network received", "MB/s"),
    "net_sent": ("network sent", "MB/s"),
}


def system_usage_table(data: ProfileData) -> list[dict[str, Any]]:
    """min, p50, p95, p99, max per system metric (and per GPU), for reports."""
    rows = []
    for key, (label, unit) in SYSTEM_METRICS.items():
        values = data.series(key)
        if unit.startswith("MB"):
            values = values / 1e6
        rows.append({"metric": label, "unit": unit, **percentiles(values)})
    for i in range(data.gpu_count):
        rows.append({"metric": f"GPU {i} utilisation", "unit": "%", **percentiles(data.gpu_series(i, "util"))})
        memory = data.gpu_memory_percent(i)
        rows.append({"metric": f"GPU {i} memory", "unit": "%", **percentiles(memory)})
    return rows


class OverallSystemUsage(ProfilerRule):
    """A summary, never an issue: min, p50, p95, p99 and max of each system metric over the job."""

    parameters = {}
    description = "system usage summary"
    advice = (
        "A summary, not a check: compare each resource's p95 with what the machine has; resources "
        "that stay idle point at a larger batch or a smaller machine."
    )

    def evaluate(self, data: ProfileData) -> RuleResult:
        if not data.samples:
            return self.result(NOT_APPLICABLE, "no system samples")
        rows = system_usage_table(data)
        cpu = next(r for r in rows if r["metric"].startswith("CPU"))
        return self.result(
            NO_ISSUES,
            f"{len(data.samples)} samples; CPU p50 {cpu['p50']:.0f}%, p95 {cpu['p95']:.0f}%",
            datapoints=len(data.samples),
            details={"table": rows},
        )


class OverallFrameworkMetrics(ProfilerRule):
    """A summary, never an issue: time per phase, per step segment, and the trace's top operators."""

    parameters = {}
    description = "framework metrics summary"
    advice = (
        "A summary, not a check: speed up first the step segment that takes the most time (data, "
        "forward, backward, optimizer); the top operators say where inside it."
    )

    def evaluate(self, data: ProfileData) -> RuleResult:
        if not data.steps:
            return self.result(NOT_APPLICABLE, "no step records")
        phases = {p: float(data.step_array("total", p).sum()) for p in data.phases()}
        segments = data.segment_totals("train")
        busiest = max(segments, key=segments.get)
        train_total = sum(segments.values()) or 1.0
        return self.result(
            NO_ISSUES,
            f"{len(data.steps)} steps; training steps spent most time in {busiest} "
            f"({100 * segments[busiest] / train_total:.0f}%)",
            datapoints=len(data.steps),
            details={
                "phase_seconds": phases,
                "train_segments_s": segments,
                "operators": data.operators.get("operators", [])[:10],
            },
        )


RULES: Mapping[str, type[ProfilerRule]] = contract.rules_of(KIND)  # the profiler rules by name (a live view)


def make_profiler_rules(names: list[str], parameters: dict[str, dict[str, Any]] | None = None) -> list[ProfilerRule]:
    """Instantiate profiler rules by name with their parameter overrides (name -> {key: value})."""
    return contract.make_rules(KIND, names, parameters)


def evaluate_rules(rules: list[ProfilerRule], data: ProfileData) -> dict[str, dict[str, Any]]:
    """Every rule's result; a rule that raises is reported as an Error, not lost."""
    results = {}
    for rule in rules:
        try:
            with warnings.catch_warnings():  # all-NaN slices (a metric a machine lacks) are handled, not news
                warnings.simplefilter("ignore", RuntimeWarning)
                results[rule.name] = rule.evaluate(data).to_dict()
        except Exception as exc:
            error = f"{type(exc).__name__}: {exc}"
            results[rule.name] = rule.result(Status.ERROR, error, error=error).to_dict()
    return results
