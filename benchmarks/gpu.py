"""A short GPU benchmark (a few minutes on one H100/H200): ResNet-50 feature extraction per CUDA inference backend
against the GPU's bound, unfrozen fine-tuning with autocast against fp32, and the endpoint at concurrency 32.

1. Bound: this GPU's measured dense matrix-multiply rate (8192^3 products, best of a few rounds), in fp32 (TF32
   off, as torch's matmul default), TF32 and bf16, divided by ResNet-50's work per image at 224 px (4.1 G
   multiply-adds = 8.2 GFLOP forward; a training step is about 3x that). The vendor's peak is printed beside it
   where the GPU is known; the measured rate is the bound used.
2. Feature extraction: the ResNet-50 backbone (fixed-seed weights: speed does not depend on the values) on each
   inference backend on CUDA (eager, channels_last, bf16, onnx where ONNX Runtime has its CUDA provider,
   compile), as the backend contract runs it (a CPU batch of 128 in, CPU features out: the copies included),
   each checked against fp32 eager (mean cosine), as images/s and as a share of the bound of its precision; then
   imgtune's whole path (loader, decode, `auto` backend) over real imagewoof JPEGs.
3. Fine-tuning: the whole ResNet-50 (nothing frozen) in imgtune's Trainer on synthetic 224 px batches of 128
   from pinned host memory, fp32 (TF32 convolutions, torch's default) against bf16 and fp16 autocast (with the
   gradient scaler): images/s and the ratio to fp32.
4. The endpoint: `imgtune deploy --device cuda` on a ResNet-50 bundle (133 classes, laid out as a dogs-mini job,
   as benchmarks/serving_throughput.py does) with `--backend torch` and `--backend bf16`, against the same on
   `--device cpu`, at concurrency 32 (dogs-mini JPEG bodies).

Refuses (exit code 2) without a CUDA GPU. `--budget-s` bounds the whole run: a step that would not fit is
skipped, saying so; `compile` (compiling ResNet-50 takes a minute or more) runs last, only if time is left.

    python benchmarks/gpu.py --out gpu-out/gpu-benchmark.txt --json gpu-out/gpu-benchmark.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
RESNET50_GFLOP = 8.2  # forward, per 224 px image (4.1 G multiply-adds)
TRAIN_FACTOR = 3  # forward + backward (about twice the forward)
BATCH = 128
EXTRACTORS = ("eager", "channels_last", "bf16", "onnx")  # then `compile`, last: only if time is left
PEAK_TFLOPS = {  # dense, per the vendors' data sheets (SXM parts): (tf32, bf16)
    "H200": (494.0, 989.0),
    "H100": (494.0, 989.0),
    "A100": (156.0, 312.0),
    "L40S": (183.0, 362.0),
}


class Output:
    """Prints, and keeps the lines for `--out`, and the figures for `--json`."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.figures: dict[str, Any] = {}

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        self.lines.append(line)


def refuse_without_cuda() -> None:
    if not torch.cuda.is_available():
        print(
            f"benchmarks/gpu.py needs a CUDA GPU, and torch {torch.__version__} (CUDA build {torch.version.cuda}) "
            f"sees none (CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES', '(unset)')})",
            file=sys.stderr,
        )
        sys.exit(2)


def synchronized(fn: Callable[[], Any]) -> float:
    torch.cuda.synchronize()
    started = time.perf_counter()
    fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started


def matmul_tflops(dtype: torch.dtype, tf32: bool, size: int = 8192, repeats: int = 10, rounds: int = 3) -> float:
    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = tf32
    try:
        a = torch.randn(size, size, device="cuda", dtype=dtype)
        b = torch.randn(size, size, device="cuda", dtype=dtype)
        a @ b
        best = 0.0
        for _ in range(rounds):
            seconds = synchronized(lambda: [a @ b for _ in range(repeats)])
            best = max(best, 2 * size**3 * repeats / seconds / 1e12)
        return best
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


def bounds(out: Output) -> dict[str, float]:
    name = torch.cuda.get_device_name(0)
    rates = {
        "fp32": matmul_tflops(torch.float32, tf32=False),
        "tf32": matmul_tflops(torch.float32, tf32=True),
        "bf16": matmul_tflops(torch.bfloat16, tf32=False),
    }
    peak = next((v for k, v in PEAK_TFLOPS.items() if k in name), None)
    out("== bound: measured dense matmul rate, and ResNet-50 images/s it allows ==")
    for precision, tflops in rates.items():
        infer = tflops * 1e12 / (RESNET50_GFLOP * 1e9)
        out(
            f"  {precision:>5}: {tflops:7.1f} TFLOP/s -> {infer:8.0f} images/s forward, "
            f"{infer / TRAIN_FACTOR:7.0f} images/s training step"
        )
    if peak:
        out(f"  data sheet ({name}): TF32 {peak[0]:.0f}, bf16 {peak[1]:.0f} TFLOP/s dense")
    out.figures["matmul_tflops"] = rates
    return rates


def backend_precision(name: str) -> str:
    # torch runs fp32 convolutions in TF32 (cudnn.allow_tf32 is on by default); bf16 autocast in bf16
    return "bf16" if name == "bf16" else "tf32"


# seconds a backend's build may take at most (exporting or compiling ResNet-50): skipped when fewer are left
BUILD_SECONDS = {"onnx": 90, "compile": 120}


def feature_extraction(out: Output, rates: dict[str, float], deadline: float, names: tuple[str, ...]) -> None:
    from imgtune.models.backends import BackendUnavailable, agreement, make_backend
    from imgtune.models.factory import create_model

    torch.manual_seed(0)
    backbone = create_model("resnet50", 10, "mlp", pretrained="none").backbone.eval()
    batch = torch.randn(BATCH, 3, 224, 224).pin_memory()
    reference = make_backend("eager", copy.deepcopy(backbone), torch.device("cpu"))(batch[:16])
    if "feature_extraction" not in out.figures:
        out(f"\n== ResNet-50 feature extraction per backend on CUDA (batch {BATCH}, 224 px, CPU batch in, CPU out) ==")
        out(f"  {'backend':>14} {'images/s':>9} {'of bound':>9} {'cosine':>8} {'build s':>8}")
    cuda = torch.device("cuda")
    results = out.figures.setdefault("feature_extraction", {})
    for name in names:
        if time.monotonic() > deadline - BUILD_SECONDS.get(name, 20):
            out(f"  {name:>14} skipped: building it would not fit in --budget-s")
            continue
        try:
            started = time.perf_counter()
            backend = make_backend(name, copy.deepcopy(backbone), cuda, image_size=224)
            backend(batch)  # warm-up: cuDNN's algorithm search, compilation
            built = time.perf_counter() - started
        except BackendUnavailable as exc:
            out(f"  {name:>14} unavailable here: {exc}")
            continue
        seconds = min(synchronized(lambda b=backend: b(batch)) for _ in range(5))
        rate = BATCH / seconds
        bound = rates[backend_precision(name)] * 1e12 / (RESNET50_GFLOP * 1e9)
        cosine = agreement(backend(batch[:16]), reference)["mean_cosine"]
        results[name] = {"images_per_s": rate, "share_of_bound": rate / bound, "mean_cosine": cosine}
        out(f"  {name:>14} {rate:9.0f} {100 * rate / bound:8.1f}% {cosine:8.5f} {built:8.1f}")


def feature_path(out: Output, shared: Path, images: int) -> None:
    """imgtune's whole path over real JPEGs: its loader (decode, resize) and the backend auto chooses on CUDA."""
    from imgtune.core.resources import default_workers
    from imgtune.data.dataset import Sample
    from imgtune.data.transforms import Preprocessing
    from imgtune.models.backends import choose_backend
    from imgtune.models.factory import create_model
    from imgtune.training.feature_cache import example_images, extract_features

    files = sorted((shared / "data/imagewoof/train").rglob("*.JPEG"))
    files = files or sorted((shared / "data/imagewoof/train").rglob("*.*"))
    step = max(1, len(files) // images)
    samples = [Sample(str(p), 0, "") for p in files[::step][:images]]
    transform = Preprocessing.for_size(224).eval_transform()
    torch.manual_seed(0)
    backbone = create_model("resnet50", 10, "mlp", pretrained="none").backbone.eval()
    backend, _ = choose_backend(backbone, example_images(samples, transform), torch.device("cuda"), "auto")
    workers = default_workers()
    stats: dict[str, float] = {}
    started = time.perf_counter()
    extract_features(
        backend, samples, transform, device=torch.device("cuda"), batch_size=BATCH, num_workers=workers,
        progress=False, stats=stats,
    )  # fmt: skip
    rate = len(samples) / (time.perf_counter() - started)
    wait = stats["data_wait_seconds"] / max(stats["data_wait_seconds"] + stats["backbone_seconds"], 1e-9)
    out(
        f"  imgtune's path over {len(samples)} imagewoof JPEGs ({workers} loader workers, auto chose "
        f"{backend.name}): {rate:.0f} images/s, waiting for data {100 * wait:.0f}% of the time"
    )
    out.figures["feature_path"] = {"images_per_s": rate, "backend": backend.name, "data_wait": wait}


class RepeatedBatch:
    """`steps` batches of the same pinned host tensors: the Trainer's loader without decoding."""

    def __init__(self, steps: int, classes: int = 10):
        self.steps = steps
        self.images = torch.randn(BATCH, 3, 224, 224).pin_memory()
        self.labels = torch.randint(classes, (BATCH,)).pin_memory()
        self.pin_memory = True

    def __len__(self) -> int:
        return self.steps

    def __iter__(self):
        for _ in range(self.steps):
            yield self.images, self.labels


def fine_tuning(out: Output, rates: dict[str, float]) -> None:
    from imgtune.models.factory import create_model
    from imgtune.training.trainer import Trainer

    cuda = torch.device("cuda")
    out(f"\n== unfrozen ResNet-50 fine-tuning in imgtune's Trainer (batch {BATCH}, 224 px, Adam) ==")
    results = {}
    precisions = {"fp32 (TF32 convs)": None, "bf16 autocast": torch.bfloat16, "fp16 + scaler": torch.float16}
    for label, dtype in precisions.items():
        torch.manual_seed(0)
        model = create_model("resnet50", 10, "mlp", "none", pretrained="none").to(cuda)
        optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
        warm = Trainer(model, optimizer, {"train": RepeatedBatch(3)}, epochs=1, num_classes=10, device=cuda,
                       amp_dtype=dtype)  # fmt: skip
        warm.run_phase("train", train=True)
        trainer = Trainer(model, optimizer, {"train": RepeatedBatch(15)}, epochs=1, num_classes=10, device=cuda,
                          amp_dtype=dtype)  # fmt: skip
        seconds = synchronized(lambda t=trainer: t.run_phase("train", train=True))
        rate = 15 * BATCH / seconds
        bound = rates["bf16" if dtype else "tf32"] * 1e12 / (TRAIN_FACTOR * RESNET50_GFLOP * 1e9)
        results[label] = {"images_per_s": rate, "share_of_bound": rate / bound}
        if dtype == torch.float16:
            results[label]["final_scale"] = trainer.scaler.get_scale()
        del model, optimizer, warm, trainer
        torch.cuda.empty_cache()
    base = results["fp32 (TF32 convs)"]["images_per_s"]
    for label, r in results.items():
        out(
            f"  {label:>18}: {r['images_per_s']:7.0f} images/s ({100 * r['share_of_bound']:.0f}% of its bound), "
            f"{r['images_per_s'] / base:.2f}x fp32"
        )
    out.figures["fine_tuning"] = results


@contextlib.contextmanager
def endpoint_server(command: list[str], port: int, log: Path, timeout: float) -> Iterator[str]:
    """`imgtune deploy` as a subprocess until /ping answers 200 (the model loaded), at most `timeout` seconds."""
    import httpx

    url = f"http://127.0.0.1:{port}"
    with log.open("ab") as handle:
        proc = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the endpoint exited with {proc.returncode}; its log: {log}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + "/ping", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise RuntimeError(f"the endpoint's model did not load in {timeout:.0f} s; its log: {log}")
            time.sleep(0.2)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def endpoint(out: Output, shared: Path, deadline: float, requests: int) -> None:
    sys.path.insert(0, str(HERE))
    from serving_throughput import free_port, load, make_job

    photos = [p.read_bytes() for p in sorted((shared / "data/dogs-mini/test").rglob("*.jpg"))[:50]]
    out(f"\n== the endpoint at concurrency 32 ({requests} requests, dogs-mini JPEGs, ResNet-50 bundle) ==")
    results = {}
    with tempfile.TemporaryDirectory(prefix="imgtune-gpu-endpoint-") as tmp:
        bundle = make_job(Path(tmp) / "workspace")
        servers = {
            "cuda, torch (fp32)": ["--device", "cuda", "--backend", "torch"],
            "cuda, bf16": ["--device", "cuda", "--backend", "bf16"],
            "cpu, auto": ["--device", "cpu"],
        }
        log = Path(tmp) / "servers.log"
        for label, options in servers.items():
            left = deadline - time.monotonic()
            if left < 45:
                out(f"  {label:>20}: skipped, it would not fit in --budget-s")
                continue
            port = free_port()
            command = [sys.executable, "-m", "imgtune", "deploy", str(bundle), "--port", str(port), *options]
            try:
                with endpoint_server(command, port, log, timeout=min(120.0, left - 15)) as url:
                    asyncio.run(load(url, photos, 32, 64))  # warm-up
                    count = requests if label.startswith("cuda") else max(64, requests // 8)
                    r = asyncio.run(load(url, photos, 32, count))
            except RuntimeError as exc:
                out(f"  {label:>20}: failed: {exc}")
                out("    " + "\n    ".join(log.read_text(errors="replace").splitlines()[-8:]))
                results[label] = {"error": str(exc)}
                continue
            results[label] = r
            out(
                f"  {label:>20}: {r['rps']:7.1f} req/s, p50 {r['p50_ms']:6.1f} ms, p99 {r['p99_ms']:6.1f} ms, "
                f"{r['errors']} errors"
            )
    if "rps" in results.get("cpu, auto", {}):
        cpu = results["cpu, auto"]["rps"]
        for label, r in results.items():
            if label.startswith("cuda") and "rps" in r:
                out(f"  {label} against the CPU endpoint on this machine: {r['rps'] / cpu:.1f}x")
    out.figures["endpoint"] = results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="also write the printed results to this file")
    parser.add_argument("--json", type=Path, help="write the figures to this JSON file")
    parser.add_argument("--budget-s", type=float, default=180.0, help="skip steps that would not fit in this time")
    parser.add_argument("--images", type=int, default=2048, help="imagewoof JPEGs for the whole feature path")
    parser.add_argument("--requests", type=int, default=1024, help="requests per endpoint at concurrency 32")
    args = parser.parse_args()
    refuse_without_cuda()
    deadline = time.monotonic() + args.budget_s
    shared = Path(os.environ.get("IMGTUNE_SHARED", HERE.parent.parent / "shared"))
    out = Output()
    properties = torch.cuda.get_device_properties(0)
    out(
        f"GPU: {properties.name}, {properties.total_memory / 2**30:.0f} GiB, {properties.multi_processor_count} SMs; "
        f"torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}); "
        f"{os.cpu_count()} CPU cores"
    )
    out.figures["machine"] = {"gpu": properties.name, "torch": torch.__version__, "cuda": torch.version.cuda}
    started = time.perf_counter()
    steps = [
        ("bound", lambda: out.figures.__setitem__("_rates", bounds(out))),
        ("feature extraction", lambda: feature_extraction(out, out.figures["_rates"], deadline, EXTRACTORS)),
        ("feature path", lambda: feature_path(out, shared, args.images)),
        ("fine-tuning", lambda: fine_tuning(out, out.figures["_rates"])),
        ("endpoint", lambda: endpoint(out, shared, deadline, args.requests)),
        ("compile", lambda: feature_extraction(out, out.figures["_rates"], deadline, ("compile",))),
    ]
    failed = []
    with tempfile.TemporaryDirectory(prefix="imgtune-gpu-cache-") as cache:
        os.environ["IMGTUNE_CACHE"] = cache  # every backend measured and built afresh
        for name, step in steps:
            if name != "bound" and "_rates" not in out.figures:
                break
            try:
                step()
            except Exception as exc:  # one step failing must not hide the others' figures
                failed.append(name)
                out(f"  {name} failed: {type(exc).__name__}: {exc}")
    out.figures.pop("_rates", None)
    out(f"\ntotal {time.perf_counter() - started:.0f} s; failed steps: {', '.join(failed) or 'none'}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(out.lines) + "\n")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({**out.figures, "failed": failed}, indent=2, default=str))
    with contextlib.suppress(Exception):
        sys.stdout.flush()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
