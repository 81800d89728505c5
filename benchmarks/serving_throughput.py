"""Endpoint throughput and latency, in one run: imgtune's endpoint (dynamic batching; the torch, onnx and bf16
backends, and auto, which picks the fastest that agrees with fp32 eager) vs a naive endpoint doing what the
original inference script did (benchmarks/naive_endpoint.py: one PyTorch forward per request, no batching),
serving the same ResNet-50 bundle (133 classes, the dog-breed task's size; weights from a fixed seed, since no
ImageNet ResNet-50 weights are reachable here: speed does not depend on the values).

Each server runs alone as a subprocess on 127.0.0.1; a bounded number of requests, real dogs-mini photos (JPEG
bodies), is sent at concurrency 1, 8 and 32 after a warm-up. Prints requests/s and p50/p99 latency per server
and level, and the ratios at concurrency 8 (target: at least 3x the throughput, a lower p99).

    python benchmarks/serving_throughput.py | tee benchmarks/results/serving_throughput.txt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import torch
from overhead import SHARED, machine

from imgtune.data.folders import ClassInfo
from imgtune.models.bundle import save_bundle
from imgtune.models.factory import create_model

HERE = Path(__file__).resolve().parent
LEVELS = {1: 40, 8: 160, 32: 256}  # concurrency -> requests sent (bounded)


def make_bundle(directory: Path, classes: int = 133) -> Path:
    torch.manual_seed(0)
    model = create_model("resnet50", classes, "mlp", pretrained="none")
    labels = [ClassInfo(f"{i:03d}.breed_{i}", f"breed {i}") for i in range(1, classes + 1)]
    return save_bundle(model.eval(), labels, model.preprocessing(224), directory)


def free_port() -> int:
    import socket

    for port in range(28100, 29000):  # outside Ray's worker range, on loopback only
        with socket.socket() as sock, contextlib.suppress(OSError):
            sock.bind(("127.0.0.1", port))
            return port
    raise RuntimeError("no free port")


@contextlib.contextmanager
def server(command: list[str], port: int, log: Path) -> Iterator[str]:
    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"{command[:4]} exited; see {log}"
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ping", timeout=2).status_code == 200:
                    break
            time.sleep(0.2)
        else:
            raise RuntimeError(f"{command[:4]} did not come up; see {log}")
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def load(url: str, photos: list[bytes], concurrency: int, requests: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    issued = 0

    async with httpx.AsyncClient(timeout=300, limits=httpx.Limits(max_connections=concurrency)) as client:

        async def worker() -> None:
            nonlocal issued, errors
            while issued < requests:
                body = photos[issued % len(photos)]
                issued += 1
                started = time.perf_counter()
                response = await client.post(url + "/invocations", content=body, headers={"Content-Type": "image/jpeg"})
                latencies.append(time.perf_counter() - started)
                errors += response.status_code != 200

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    ordered = sorted(latencies)
    return {
        "rps": len(latencies) / wall,
        "p50_ms": 1000 * statistics.median(ordered),
        "p99_ms": 1000 * ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))],
        "errors": errors,
    }


def measure(url: str, photos: list[bytes], levels: dict[int, int]) -> dict[int, dict[str, float]]:
    asyncio.run(load(url, photos, 4, 16))  # warm-up: first forwards, thread pools, allocator
    return {c: asyncio.run(load(url, photos, c, n)) for c, n in levels.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the requests sent per level")
    args = parser.parse_args()
    levels = {c: max(c, round(n * args.scale)) for c, n in LEVELS.items()}
    photos = [p.read_bytes() for p in sorted((SHARED / "data/dogs-mini/test").rglob("*.jpg"))[:50]]
    print(machine())
    print(f"ResNet-50 bundle, 133 classes, 224 px; {len(photos)} dogs-mini JPEGs; requests per level {levels}")
    with tempfile.TemporaryDirectory(prefix="imgtune-serving-") as tmp:
        bundle = make_bundle(Path(tmp) / "bundle")
        log = Path(tmp) / "servers.log"
        servers = {
            "naive (one forward per request)": [sys.executable, str(HERE / "naive_endpoint.py"), str(bundle)],
            "imgtune, torch backend": [sys.executable, "-m", "imgtune", "deploy", str(bundle), "--backend", "torch"],
            "imgtune, onnx backend": [sys.executable, "-m", "imgtune", "deploy", str(bundle), "--backend", "onnx"],
            "imgtune, bf16 backend": [sys.executable, "-m", "imgtune", "deploy", str(bundle), "--backend", "bf16"],
            "imgtune, auto backend": [sys.executable, "-m", "imgtune", "deploy", str(bundle)],
        }
        results = {}
        for name, command in servers.items():
            port = free_port()
            started = time.perf_counter()
            with server([*command, "--port", str(port)], port, log) as url:
                ready = time.perf_counter() - started
                results[name] = measure(url, photos, levels)
            print(f"\n{name} (ready in {ready:.1f} s)")
            print(f"  {'concurrency':>11} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
            for c, r in results[name].items():
                print(f"  {c:>11} {r['rps']:>8.2f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['errors']:>6}")
    naive = results["naive (one forward per request)"]
    best = max((n for n in results if n.startswith("imgtune")), key=lambda n: results[n][8]["rps"])
    print(f"\nbest imgtune backend at concurrency 8: {best}")
    for c in levels:
        ratio = results[best][c]["rps"] / naive[c]["rps"]
        p99 = results[best][c]["p99_ms"] / naive[c]["p99_ms"]
        print(f"  concurrency {c:>2}: throughput {ratio:.2f}x the naive endpoint's, p99 {p99:.2f}x")
    ratio8 = results[best][8]["rps"] / naive[8]["rps"]
    lower = results[best][8]["p99_ms"] < naive[8]["p99_ms"]
    print(f"target at concurrency 8: >= 3x throughput and a lower p99: {ratio8:.2f}x, p99 lower: {lower}")


if __name__ == "__main__":
    main()
