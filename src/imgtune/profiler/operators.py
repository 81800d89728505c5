"""The top operators of a torch.profiler trace, read from its Chrome trace file.

torch.profiler's own `key_averages()` takes about half a second of Python work even for a few steps, inside
the training process; reading the exported trace afterwards gives the same table (self time is an
operator's duration minus that of the operators it called, per thread) without slowing training down.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

HOST_CATEGORIES = {"cpu_op", "user_annotation"}
DEVICE_CATEGORIES = {"kernel", "gpu_memcpy", "gpu_memset"}


def top_operators(trace_path: Path, limit: int = 25) -> dict[str, Any]:
    """Operators by self CPU time, and GPU kernels by device time (where the trace has them)."""
    events = json.loads(trace_path.read_text()).get("traceEvents", [])
    host: dict[tuple[Any, Any], list[dict[str, Any]]] = defaultdict(list)
    device: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "device_us": 0.0})
    for event in events:
        if event.get("ph") != "X":
            continue
        if event.get("cat") in HOST_CATEGORIES:
            host[(event.get("pid"), event.get("tid"))].append(event)
        elif event.get("cat") in DEVICE_CATEGORIES:
            row = device[event.get("name", "?")]
            row["calls"] += 1
            row["device_us"] += float(event.get("dur", 0.0))
    table: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0, "self_cpu_us": 0.0, "cpu_total_us": 0.0})
    for thread_events in host.values():
        thread_events.sort(key=lambda e: (e["ts"], -e.get("dur", 0.0)))
        stack: list[tuple[float, str, dict[str, float]]] = []  # open operators: (end time, name, self time)
        for event in thread_events:
            start, duration, name = float(event["ts"]), float(event.get("dur", 0.0)), event.get("name", "?")
            while stack and stack[-1][0] <= start:
                stack.pop()
            current = {"self": duration}
            row = table[name]
            if stack:
                stack[-1][2]["self"] -= duration
            if not any(open_name == name for _, open_name, _ in stack):  # an op calling itself counts once
                row["calls"] += 1
                row["cpu_total_us"] += duration
            stack.append((start + duration, name, current))
            row.setdefault("_selves", []).append(current)  # resolved below, once children are subtracted
    rows = []
    for name, row in table.items():
        self_us = sum(max(s["self"], 0.0) for s in row.pop("_selves"))
        rows.append(
            {"name": name, "calls": int(row["calls"]), "self_cpu_us": self_us, "cpu_total_us": row["cpu_total_us"]}
        )
    rows.sort(key=lambda r: r["self_cpu_us"], reverse=True)
    kernels = sorted(
        ({"name": name, "calls": int(v["calls"]), "device_us": v["device_us"]} for name, v in device.items()),
        key=lambda r: r["device_us"],
        reverse=True,
    )
    return {"sorted_by": "self CPU time", "operators": rows[:limit], "kernels": kernels[:limit]}
