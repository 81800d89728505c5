"""The system monitor: a background thread sampling the machine while a job runs.

Every `interval` seconds it appends one JSON line to `JOB/profiler/system.jsonl`:

* ``t``: Unix time; ``cpu``: utilisation per core (%); ``cpu_total`` (%); ``iowait`` (% of CPU time, Linux);
* ``proc_rss``: the job's resident memory (bytes, its worker processes included), ``proc_cpu`` (% of one core,
  workers included); ``mem_used`` (% of system memory), ``mem_available`` (bytes);
* ``disk_read``, ``disk_write``, ``net_recv``, ``net_sent``: bytes per second since the previous sample;
* ``gpus``: per NVIDIA GPU this process may use, ``util`` (%), ``mem_used`` and ``mem_total`` (bytes), from NVML;
  absent without one. "May use" is what ``CUDA_VISIBLE_DEVICES`` leaves it (all GPUs when unset; none when empty,
  as Ray sets it for a worker that reserved no GPU), so a job on one GPU of eight is not judged by seven idle ones.

Lines are flushed as they are written, so a killed job keeps its samples and a running job can be read. When
the monitor stops, a last sample covers the time since the previous one (so a job shorter than one interval
still has a sample).

In a data-parallel job, the first rank on each node also samples its node, from its training's start to its
end, into ``system.rankR.jsonl`` (R: that rank), each sample with ``rank`` and ``host``; its ``proc_*`` are that
rank's process (and its loader workers). ``system.jsonl`` stays the job's own process's (there: the driver's).
"""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import psutil

SYSTEM_FILE = "system.jsonl"
FINAL_SAMPLE_MIN_SECONDS = 0.05


def visible_gpus(value: str | None) -> list[str] | None:
    """The entries of a `CUDA_VISIBLE_DEVICES` value (indices, or UUIDs and their prefixes: GPU-..., MIG-...), read
    as CUDA reads them: up to the first empty, negative or malformed one. None when unset (every GPU)."""
    if value is None:
        return None
    entries = []
    for part in value.split(","):
        part = part.strip()
        if not (part.isdigit() or part.startswith(("GPU-", "MIG-"))):
            break
        entries.append(part)
    return entries


def select_gpus(entries: list[str] | None, uuids: list[str]) -> list[int]:
    """NVML's indices of the GPUs `entries` (see visible_gpus) name, in their order, given every GPU's UUID in
    NVML's order; an entry naming no GPU, and any after it, select nothing (as CUDA ignores them). Indices are
    read as NVML's, which is CUDA's with CUDA_DEVICE_ORDER=PCI_BUS_ID (Ray's numbering)."""
    if entries is None:
        return list(range(len(uuids)))
    chosen: list[int] = []
    for entry in entries:
        if entry.isdigit():
            index = int(entry) if int(entry) < len(uuids) else None
        else:
            index = next((i for i, uuid in enumerate(uuids) if uuid.startswith(entry)), None)
        if index is None:
            break
        if index not in chosen:
            chosen.append(index)
    return chosen


class _Nvml:
    """The NVIDIA GPUs this process may use (CUDA_VISIBLE_DEVICES), through NVML, when the library and a driver
    are there; otherwise no GPUs."""

    def __init__(self) -> None:
        self.handles: list[Any] = []
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            every = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            entries = visible_gpus(os.environ.get("CUDA_VISIBLE_DEVICES"))
            uuids = [""] * len(every) if entries is None else [_text(pynvml.nvmlDeviceGetUUID(h)) for h in every]
            self.handles = [every[i] for i in select_gpus(entries, uuids)]
        except Exception:  # no library, no driver, no GPU: the monitor records CPUs only
            self.handles = []
        if not self.handles:
            self.close_library()

    def sample(self) -> list[dict[str, float]]:
        gpus = []
        for handle in self.handles:
            try:
                util = self._nvml.nvmlDeviceGetUtilizationRates(handle)
                memory = self._nvml.nvmlDeviceGetMemoryInfo(handle)
            except Exception:
                continue
            gpus.append({"util": float(util.gpu), "mem_used": float(memory.used), "mem_total": float(memory.total)})
        return gpus

    def close(self) -> None:
        if self.handles:
            self.close_library()

    def close_library(self) -> None:
        nvml = getattr(self, "_nvml", None)
        if nvml is not None:
            with contextlib.suppress(Exception):
                nvml.nvmlShutdown()
            self._nvml = None


def _text(value: str | bytes) -> str:
    """NVML's strings are bytes in older nvidia-ml-py releases."""
    return value.decode() if isinstance(value, bytes) else value


def gpu_count() -> int:
    """NVIDIA GPUs this process may use, as NVML sees them (0 without a driver or with CUDA_VISIBLE_DEVICES empty)."""
    nvml = _Nvml()
    count = len(nvml.handles)
    nvml.close()
    return count


class SystemMonitor:
    """Samples the machine every `interval` seconds into `directory/system.jsonl` (or `name`), in a daemon
    thread; `fields` are added to every sample (a rank's: its rank and host)."""

    def __init__(
        self, directory: Path, interval: float = 0.5, *, name: str = SYSTEM_FILE, fields: dict[str, Any] | None = None
    ):
        self.path = directory / name
        directory.mkdir(parents=True, exist_ok=True)
        self.interval = interval
        self.fields = dict(fields or {})
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._process = psutil.Process()
        self._children: dict[int, psutil.Process] = {}
        self.samples = 0

    def start(self) -> SystemMonitor:
        self._thread = threading.Thread(target=self._run, name="imgtune-system-monitor", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=max(2.0, 2 * self.interval))
            self._thread = None

    def __enter__(self) -> SystemMonitor:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _process_tree(self) -> list[psutil.Process]:
        """The job and its live children (DataLoader workers), each kept so its CPU % has a baseline."""
        try:
            live = {c.pid: c for c in self._process.children(recursive=True)}
        except psutil.Error:
            live = {}
        for pid in list(self._children):
            if pid not in live:
                del self._children[pid]
        for pid, child in live.items():
            if pid not in self._children:
                self._children[pid] = child
                with contextlib.suppress(psutil.Error):
                    child.cpu_percent(None)
        return [self._process, *self._children.values()]

    def _proc_usage(self) -> tuple[float, float]:
        rss = cpu = 0.0
        for proc in self._process_tree():
            try:
                with proc.oneshot():
                    rss += proc.memory_info().rss
                    cpu += proc.cpu_percent(None)
            except psutil.Error:
                continue
        return rss, cpu

    def _run(self) -> None:
        nvml = _Nvml()
        psutil.cpu_percent(percpu=True)
        psutil.cpu_times_percent()
        self._proc_usage()
        last_disk, last_net, last_t = psutil.disk_io_counters(), psutil.net_io_counters(), time.monotonic()
        with self.path.open("a", buffering=1) as out:
            while True:
                stopping = self._stop.wait(self.interval)
                now = time.monotonic()
                elapsed = max(now - last_t, 1e-6)
                if stopping and elapsed < FINAL_SAMPLE_MIN_SECONDS:
                    break  # a last sample over a few milliseconds would only be noise

                disk, net = psutil.disk_io_counters(), psutil.net_io_counters()
                rss, proc_cpu = self._proc_usage()
                memory = psutil.virtual_memory()
                cores = psutil.cpu_percent(percpu=True)
                sample: dict[str, Any] = {
                    **self.fields,
                    "t": round(time.time(), 3),
                    "cpu": cores,
                    "cpu_total": round(sum(cores) / max(len(cores), 1), 2),
                    "iowait": float(getattr(psutil.cpu_times_percent(), "iowait", 0.0)),
                    "proc_rss": rss,
                    "proc_cpu": round(proc_cpu, 2),
                    "mem_used": memory.percent,
                    "mem_available": float(memory.available),
                    "disk_read": _rate(disk, last_disk, "read_bytes", elapsed),
                    "disk_write": _rate(disk, last_disk, "write_bytes", elapsed),
                    "net_recv": _rate(net, last_net, "bytes_recv", elapsed),
                    "net_sent": _rate(net, last_net, "bytes_sent", elapsed),
                }
                gpus = nvml.sample()
                if gpus:
                    sample["gpus"] = gpus
                out.write(json.dumps(sample) + "\n")
                self.samples += 1
                last_disk, last_net, last_t = disk, net, now
                if stopping:  # the stretch since the last sample, so even a job shorter than one interval has one
                    break
        nvml.close()


def _rate(current: Any, previous: Any, field: str, seconds: float) -> float:
    if current is None or previous is None:
        return 0.0
    return round(max(getattr(current, field) - getattr(previous, field), 0) / seconds, 1)
