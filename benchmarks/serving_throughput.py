"""Endpoint throughput, latency and accuracy per backend, in one run.

Throughput: imgtune's endpoint (dynamic batching) with each backend, `auto` (the fastest backend that agrees
with fp32 eager; the served one is printed), `onnx` and `openvino` (fp32), `bf16` (where the CPU has it),
`int8` (ONNX Runtime static QDQ) and `openvino-int8`, and with 2 replicas on Ray Serve (`--replicas 2`, int8),
against a naive endpoint doing what the original inference script did (benchmarks/naive_endpoint.py: one
PyTorch forward per request, no batching). All serve the same ResNet-50 bundle (133 classes, the dog-breed
task's size; weights from a fixed seed, since no ImageNet ResNet-50 weights are reachable here: speed does not
depend on the values), laid out as a job whose dataset is dogs-mini, so the int8 backends calibrate on its
training photos as they would on a user's job. (With random weights nearly every photo gets the same top
class, so a quantized backend passes auto's answer check on the validation photos trivially here; the accuracy
section below is where quantized backends are judged.) Each server runs alone as a subprocess on 127.0.0.1; a
bounded number of requests, real dogs-mini photos (JPEG bodies), is sent at concurrency 1, 8 and 32 after a
warm-up.

Accuracy: the speed figures above say nothing of answers, and random weights have none worth keeping; so each
backend's accuracy is measured on MobileNetV2 models with the real shared ImageNet weights (frozen backbone,
trained here for 3 epochs) on dogs-mini test and on a stated imagewoof subset's val photos, against fp32 eager.
An int8 figure counts toward the targets only if int8 is within 0.5 point of fp32 on both (the issue's rule).

Targets on a 2-core CPU: at least 2.5x the naive endpoint's throughput at concurrency 8, p99 under 1.5 s at
concurrency 32. The CPU's features (bf16, VNNI) are printed beside the figures.

    python benchmarks/serving_throughput.py | tee benchmarks/results/serving_throughput.txt
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import torch
from overhead import MOBILENET_WEIGHTS, SHARED, machine
from PIL import Image
from tuning_shared_cache import subset

from imgtune.config import build_config
from imgtune.data.folders import ClassInfo
from imgtune.models.bundle import save_bundle
from imgtune.models.factory import create_model
from imgtune.runs.train import run_training_job
from imgtune.serving.predictor import Predictor

HERE = Path(__file__).resolve().parent
DOGS_MINI = SHARED / "data/dogs-mini"
LEVELS = {1: 40, 8: 160, 32: 256}  # concurrency -> requests sent (bounded)
NAIVE = "naive (one forward per request)"
SERVERS = {  # name -> `imgtune deploy` options (the bundle and port are added)
    "imgtune, auto": [],
    "imgtune, onnx (fp32)": ["--backend", "onnx"],
    "imgtune, bf16": ["--backend", "bf16"],
    "imgtune, int8": ["--backend", "int8"],
    "imgtune, openvino (fp32)": ["--backend", "openvino"],
    "imgtune, openvino-int8": ["--backend", "openvino-int8"],
    "imgtune, int8, 2 replicas (Ray Serve)": ["--backend", "int8", "--replicas", "2"],
}
ACCURACY_BACKENDS = ["eager", "onnx", "openvino", "int8", "openvino-int8"]
INT8 = ("int8", "openvino-int8")


def cpu_features() -> str:
    """What the CPU offers for low-precision inference (Linux's /proc/cpuinfo flags)."""
    flags: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), "unknown CPU",
    )  # fmt: skip
    has = lambda *names: ", ".join(n for n in names if n in flags) or "none"  # noqa: E731
    return (
        f"CPU: {model}; bf16: {has('avx512_bf16', 'amx_bf16')}; VNNI (int8 dot products): "
        f"{has('avx512_vnni', 'avx_vnni', 'amx_int8')}; widest SIMD: {'avx512f' if 'avx512f' in flags else 'avx2'}"
    )


def make_job(workspace: Path, classes: int = 133) -> Path:
    """A ResNet-50 job directory: the bundle in JOB/model, and a job.json whose dataset is dogs-mini (its
    classes are the bundle's first ten), as a job trained on a user's photos would have."""
    torch.manual_seed(0)
    model = create_model("resnet50", classes, "mlp", pretrained="none")
    dogs = sorted(p.name for p in (DOGS_MINI / "train").iterdir() if p.is_dir())
    ids = dogs + [f"{i:03d}.breed_{i}" for i in range(len(dogs) + 1, classes + 1)]
    labels = [ClassInfo(i, i.split(".", 1)[1].replace("_", " ")) for i in ids]
    job = workspace / "resnet50-dogs"
    save_bundle(model.eval(), labels, model.preprocessing(224), job / "model")
    (job / "job.json").write_text(json.dumps({"name": job.name, "config": {"data": {"path": str(DOGS_MINI)}}}))
    return job / "model"


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
        deadline = time.monotonic() + 900  # auto measures every backend on ResNet-50 once (int8: quantizing)
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
        proc.wait(timeout=60)


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
    asyncio.run(load(url, photos, 8, 32))  # warm-up: first forwards, thread pools, allocator, every replica
    return {c: asyncio.run(load(url, photos, c, n)) for c, n in levels.items()}


def served_backend(url: str) -> str:
    with contextlib.suppress(Exception):
        return httpx.get(url + "/health/ready", timeout=10).json()["model"]["backend"]
    return "?"


def throughput(levels: dict[int, int], photos: list[bytes], tmp: Path) -> tuple[dict[str, Any], dict[str, str]]:
    """Each server's figures per concurrency level, and the backend each imgtune server served on."""
    bundle = make_job(tmp / "workspace")
    log = tmp / "servers.log"
    commands = {NAIVE: [sys.executable, str(HERE / "naive_endpoint.py"), str(bundle)]}
    for name, options in SERVERS.items():
        commands[name] = [sys.executable, "-m", "imgtune", "deploy", str(bundle), *options]
    results, served = {}, {}
    for name, command in commands.items():
        port = free_port()
        started = time.perf_counter()
        with server([*command, "--port", str(port)], port, log) as url:
            ready = time.perf_counter() - started
            served[name] = "eager (naive)" if name == NAIVE else served_backend(url)
            results[name] = measure(url, photos, levels)
        print(f"\n{name} (ready in {ready:.1f} s, serving on {served[name]})")
        print(f"  {'concurrency':>11} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
        for c, r in results[name].items():
            print(f"  {c:>11} {r['rps']:>8.2f} {r['p50_ms']:>8.0f} {r['p99_ms']:>8.0f} {r['errors']:>6}")
        sys.stdout.flush()
    return results, served


def train_job(name: str, data: Path, workspace: Path) -> Path:
    config = build_config(
        {
            "name": name,
            "data": {"path": str(data), "num_workers": 0},
            "model": {"backbone": "mobilenet_v2", "weights": str(MOBILENET_WEIGHTS)},
            "train": {"epochs": 3},
            "debugger": {"enabled": False},
            "profiler": {"enabled": False, "report": False},
        }
    )
    return run_training_job(config, workspace=workspace, progress=False).model_dir


def accuracy(job: Path, photos: list[tuple[Path, str]]) -> dict[str, dict[str, float]]:
    """Each backend's accuracy on `photos` (path, class id), and its top-1 agreement with fp32 eager."""
    answers: dict[str, list[str]] = {}
    for backend in ACCURACY_BACKENDS:
        predictor = Predictor.load(job, backend)
        got = []
        for start in range(0, len(photos), 32):
            images = [Image.open(path).convert("RGB") for path, _ in photos[start : start + 32]]
            got += [scores[0]["id"] for scores in predictor.predict(images, 1)]
        answers[backend] = got
    truth = [label for _, label in photos]
    return {
        backend: {
            "accuracy": sum(a == t for a, t in zip(got, truth, strict=True)) / len(truth),
            "agreement": sum(a == e for a, e in zip(got, answers["eager"], strict=True)) / len(truth),
        }
        for backend, got in answers.items()
    }


def accuracies(tmp: Path, per_class: dict[str, int]) -> dict[str, dict[str, dict[str, float]]]:
    woof = tmp / "imagewoof-subset"
    subset(SHARED / "data/imagewoof", woof, per_class)
    workspace = tmp / "accuracy-workspace"
    os.environ.setdefault("IMGTUNE_WORKSPACE", str(workspace))
    sets = {
        "dogs-mini test": (train_job("dogs-mini", DOGS_MINI, workspace), DOGS_MINI / "test"),
        f"imagewoof val ({per_class['val']} per class)": (train_job("imagewoof", woof, workspace), woof / "val"),
    }
    results = {}
    for name, (job, folder) in sets.items():
        photos = [(p, p.parent.name) for p in sorted(folder.rglob("*.*")) if p.is_file()]
        results[name] = accuracy(job, photos)
        print(f"\n{name}: {len(photos)} photos, MobileNetV2 (shared ImageNet weights), frozen backbone, 3 epochs")
        print(f"  {'backend':>14} {'accuracy':>9} {'vs fp32':>8} {'top-1 agreement':>16}")
        reference = results[name]["eager"]["accuracy"]
        for backend, r in results[name].items():
            delta = 100 * (r["accuracy"] - reference)
            print(f"  {backend:>14} {100 * r['accuracy']:>8.1f}% {delta:>+7.1f}pt {100 * r['agreement']:>15.1f}%")
        sys.stdout.flush()
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", type=float, default=1.0, help="multiply the requests sent per level")
    parser.add_argument("--woof-train", type=int, default=100, help="imagewoof train photos per class")
    parser.add_argument("--woof-val", type=int, default=50, help="imagewoof val photos per class")
    args = parser.parse_args()
    levels = {c: max(c, round(n * args.scale)) for c, n in LEVELS.items()}
    photos = [p.read_bytes() for p in sorted((DOGS_MINI / "test").rglob("*.jpg"))[:50]]
    print(machine())
    print(cpu_features())
    print(f"ResNet-50 bundle, 133 classes, 224 px; {len(photos)} dogs-mini JPEGs; requests per level {levels}")
    with tempfile.TemporaryDirectory(prefix="imgtune-serving-") as tmp:
        os.environ["IMGTUNE_CACHE"] = str(Path(tmp) / "cache")  # every backend measured and built afresh
        results, served = throughput(levels, photos, Path(tmp))
        print("\n== accuracy per backend (real weights) ==")
        scores = accuracies(Path(tmp), {"train": args.woof_train, "val": args.woof_val})

    naive = results[NAIVE]
    print("\n== against the naive endpoint ==")
    print(f"  {'server':<40} {'c=1':>6} {'c=8':>6} {'c=32':>6}   p99 at c=32")
    for name in SERVERS:
        ratios = [results[name][c]["rps"] / naive[c]["rps"] for c in levels]
        print(f"  {name:<40} " + " ".join(f"{r:>5.2f}x" for r in ratios) + f"   {results[name][32]['p99_ms']:.0f} ms")
    counts = {  # a quantized backend's figures count only within 0.5 point of fp32 on both datasets
        backend: all(abs(s[backend]["accuracy"] - s["eager"]["accuracy"]) <= 0.005 for s in scores.values())
        for backend in ACCURACY_BACKENDS
    }
    for label, names in (
        ("backends checked by their outputs (fp32, bf16)", [n for n in SERVERS if served[n] not in INT8]),
        ("every server whose accuracy counts", [n for n in SERVERS if served[n] not in INT8 or counts[served[n]]]),
    ):
        if not names:
            continue
        best = max(names, key=lambda n: results[n][8]["rps"])
        ratio8 = results[best][8]["rps"] / naive[8]["rps"]
        p99 = results[best][32]["p99_ms"] / 1000
        print(
            f"{label}: best at concurrency 8 is {best} ({served[best]}): {ratio8:.2f}x the naive endpoint "
            f"(target >= 2.5x), p99 at concurrency 32 {p99:.2f} s (target < 1.5 s)"
        )
    for backend in INT8:
        print(f"{backend} within 0.5 point of fp32 accuracy on both datasets (its figures count): {counts[backend]}")


if __name__ == "__main__":
    main()
