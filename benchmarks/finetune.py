"""Fine-tuning against the frozen backbone and the plain torchvision loop, in one run (issue 20).

Parts (`--part`, default all):

- accuracy: for each dataset (dogs-mini; an imagewoof subset: the first 60 training photos per breed for train,
  then 20 and 20 of its val photos per breed for valid and test, linked into a temporary folder), with the
  shared MobileNetV2 weights at 224 px, batch 32, the same epochs for all: the plain loop (torchvision
  ImageFolder, PIL, fp32, Adam 1e-3 on every layer, the usual crop/flip augmentation, no callbacks: what a user
  writes by hand), `imgtune train --recipe frozen` (a head on cached features) and `--recipe finetune` (the
  whole network: backbone at a tenth of the rate, warmup, cosine, label smoothing, frozen batch-norm statistics),
  each in a fresh process, with epochs, wall time, training images/s (over the training batches, data waits
  included, for both), valid accuracy per epoch and test accuracy; imgtune's recipes on dogs-mini over `--seeds`
  seeds;
- overhead: the debugger and profiler at their defaults on the unfrozen path (`--recipe finetune`, dogs-mini)
  against the same job without them, each job a fresh process (`python -m imgtune train`), `--pairs`
  alternating pairs (the order flips each pair), for a 1-epoch job (10 steps) and a 3-epoch job; the ratio of
  median training-loop times, and the share of the loop the callbacks took (the step timeline's batch totals
  minus their segments);
- compile: the same 3-epoch unfrozen job with `train.compile=off` and `=on` (fresh processes; the compiled one
  first with an empty inductor cache, then warm): the median training step (forward, backward, optimizer; full
  batches after the first epoch) and the training loop, compiling included;
- decode: the training transform's input, images/s over imagewoof JPEGs, PIL (`load_image`) against
  torchvision.io (`read_image`, the data path), in this process.

    python benchmarks/finetune.py | tee benchmarks/results/finetune.txt
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from overhead import DOGS_MINI, MOBILENET_WEIGHTS, SHARED, machine
from torch import nn
from torchvision import datasets, models
from torchvision.transforms import v2

from imgtune.config import build_config
from imgtune.core.io import read_jsonl
from imgtune.data.transforms import Preprocessing, load_image, read_image
from imgtune.runs.train import run_training_job

IMAGEWOOF = SHARED / "data/imagewoof"
SIZE, BATCH = 224, 32
SEGMENTS = ("data", "h2d", "forward", "backward", "optimizer")


def imagewoof_subset(root: Path, per_class: tuple[int, int, int] = (60, 20, 20)) -> Path:
    """train/valid/test folders of symlinks to imagewoof photos: the first N of each breed (sorted names)."""
    train_n, valid_n, test_n = per_class
    for breed in sorted(p.name for p in (IMAGEWOOF / "train").iterdir() if p.is_dir()):
        train = sorted((IMAGEWOOF / "train" / breed).glob("*"))[:train_n]
        held = sorted((IMAGEWOOF / "val" / breed).glob("*"))[: valid_n + test_n]
        for split, files in (("train", train), ("valid", held[:valid_n]), ("test", held[valid_n:])):
            folder = root / split / breed
            folder.mkdir(parents=True, exist_ok=True)
            for f in files:
                (folder / f.name).symlink_to(f)
    return root


def plain_loop(data: Path, epochs: int) -> dict[str, Any]:
    """The hand-written torchvision baseline: ImageFolder + PIL, fp32, Adam 1e-3 on every layer."""
    torch.manual_seed(0)
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    normalize = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    train_tf = v2.Compose([v2.RandomResizedCrop(SIZE, antialias=True), v2.RandomHorizontalFlip(), *normalize])
    eval_tf = v2.Compose([v2.Resize(256, antialias=True), v2.CenterCrop(SIZE), *normalize])
    sets = {s: datasets.ImageFolder(str(data / s), train_tf if s == "train" else eval_tf)
            for s in ("train", "valid", "test")}  # fmt: skip
    loaders = {s: torch.utils.data.DataLoader(d, batch_size=BATCH, shuffle=s == "train", num_workers=2)
               for s, d in sets.items()}  # fmt: skip
    model = models.mobilenet_v2(num_classes=1000)
    model.load_state_dict(torch.load(MOBILENET_WEIGHTS, map_location="cpu", weights_only=True), strict=False)
    model.classifier[1] = nn.Linear(model.last_channel, len(sets["train"].classes))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = nn.CrossEntropyLoss()

    def accuracy(split: str) -> float:
        model.eval()
        right = seen = 0
        with torch.inference_mode():
            for x, y in loaders[split]:
                right += (model(x).argmax(1) == y).sum().item()
                seen += len(y)
        return right / seen

    started, train_seconds, valid = time.perf_counter(), 0.0, []
    for _ in range(epochs):
        model.train()
        tick = time.perf_counter()
        for x, y in loaders["train"]:
            optimizer.zero_grad()
            loss_fn(model(x), y).backward()
            optimizer.step()
        train_seconds += time.perf_counter() - tick
        valid.append(accuracy("valid"))
    return {
        "wall": time.perf_counter() - started, "images_per_s": len(sets["train"]) * epochs / train_seconds,
        "valid": valid, "test": accuracy("test"),
    }  # fmt: skip


def train_batches(job_path: Path) -> list[dict[str, Any]]:
    return [s for s in read_jsonl(job_path / "profiler/steps.jsonl") if s["phase"] == "train"]


def imgtune_job(data: Path, recipe: str, epochs: int, workspace: Path, seed: int = 0) -> dict[str, Any]:
    """A job in this process (profiler on, for its step timeline: training images/s over the training batches)."""
    train = {"epochs": epochs, "batch_size": BATCH, "seed": seed, "early_stopping": {"enabled": False}}
    raw = {"data": {"path": str(data), "image_size": SIZE}, "recipe": recipe, "train": train,
           "model": {"backbone": "mobilenet_v2", "weights": str(MOBILENET_WEIGHTS)}}  # fmt: skip
    started = time.perf_counter()
    job = run_training_job(build_config(raw), workspace=workspace, progress=False)
    record = job.record()
    train_images = record.dataset["images"]["train"]
    train_seconds = sum(s["total"] for s in train_batches(job.path))
    return {
        "wall": time.perf_counter() - started, "images_per_s": train_images * epochs / train_seconds,
        "valid": [m.get("valid_accuracy") for m in job.read_metrics()], "test": record.test["accuracy"],
    }  # fmt: skip


def show(name: str, result: dict[str, Any], baseline: dict[str, Any]) -> None:
    valid = " ".join(f"{v:.3f}" for v in result["valid"])
    rate = result["images_per_s"]
    print(
        f"  {name:26s} wall {result['wall']:7.1f} s  train {rate:7.1f} img/s "
        f"({rate / baseline['images_per_s']:.2f}x the plain loop)  valid {valid}  test {result['test']:.3f}",
        flush=True,
    )


def in_a_fresh_process(function: Any, *args: Any) -> Any:
    """`function(*args)` in a new interpreter: no job pays for the memory and threads an earlier one left."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(function, args)


def accuracy_part(epochs: int, seeds: int, tmp: Path) -> None:
    woof = imagewoof_subset(tmp / "imagewoof-subset")
    for label, data, runs in (("dogs-mini (300 train, 100 valid, 100 test)", DOGS_MINI, seeds),
                              ("imagewoof subset (600 train, 200 valid, 200 test)", woof, 1)):  # fmt: skip
        print(label, flush=True)
        baseline = in_a_fresh_process(plain_loop, data, epochs)
        show("plain torchvision loop", baseline, baseline)
        for recipe in ("frozen", "finetune"):
            results = []
            for seed in range(runs):
                results.append(in_a_fresh_process(imgtune_job, data, recipe, epochs, tmp / "ws", seed))
                show(f"imgtune {recipe} (seed {seed})", results[-1], baseline)
            if runs > 1:
                tests = [r["test"] for r in results]
                rates = [r["images_per_s"] / baseline["images_per_s"] for r in results]
                each = " ".join(f"{t:.3f}" for t in tests)
                print(f"  imgtune {recipe}: mean test {statistics.mean(tests):.3f} over {runs} seeds ({each}), "
                      f"images/s {min(rates):.2f}-{max(rates):.2f}x the plain loop")  # fmt: skip


def job_in_a_process(workspace: Path, name: str, epochs: int, *settings: str, env: dict[str, str] | None = None):
    """`python -m imgtune train --recipe finetune` on dogs-mini in a fresh process; returns its job directory."""
    command = [sys.executable, "-m", "imgtune", "train", "--data", str(DOGS_MINI), "--backbone", "mobilenet_v2",
               "--weights", str(MOBILENET_WEIGHTS), "--recipe", "finetune", "--epochs", str(epochs),
               "--batch-size", str(BATCH), "--image-size", str(SIZE), "--workspace", str(workspace), "--name", name,
               "--set", "train.early_stopping.enabled=false", "--json"]  # fmt: skip
    for setting in settings:
        command += ["--set", setting]
    subprocess.run(command, check=True, capture_output=True, env={**os.environ, **(env or {})})
    return workspace / name


def overhead_part(pairs: int, tmp: Path) -> None:
    print("debugger and profiler on the unfrozen path (recipe finetune, dogs-mini, each job a fresh process, "
          "alternating pairs; training-loop seconds)", flush=True)  # fmt: skip
    for epochs, count in ((1, pairs), (3, max(2, pairs // 2))):
        loops: dict[bool, list[float]] = {False: [], True: []}
        callback_shares = []
        for pair in range(count):
            for on in (False, True) if pair % 2 == 0 else (True, False):
                observers = [f"debugger.enabled={str(on).lower()}", f"profiler.enabled={str(on).lower()}"]
                job = job_in_a_process(tmp / "ws-overhead", f"e{epochs}-p{pair}-{on}", epochs, *observers)
                loops[on].append(json.loads((job / "job.json").read_text())["timings"]["training_loop"])
                if on:
                    steps = train_batches(job)
                    total = sum(s["total"] for s in steps)
                    callback_shares.append(sum(s["total"] - sum(s[k] for k in SEGMENTS) for s in steps) / total)
        off, on = statistics.median(loops[False]), statistics.median(loops[True])
        per_pair = [w / wo for w, wo in zip(loops[True], loops[False], strict=True)]
        shares = f"{100 * min(callback_shares):.1f}-{100 * max(callback_shares):.1f}%"
        print(f"  {epochs} epoch(s), {10 * epochs} steps, {count} pairs: without {off:.2f} s  with {on:.2f} s  "
              f"ratio {on / off:.3f} (target 1.05)  per pair {min(per_pair):.3f}-{max(per_pair):.3f}  "
              f"callbacks {shares} of the loop", flush=True)  # fmt: skip


def median_step(job: Path) -> float:
    """The median training step (forward, backward, optimizer) over full batches after the first epoch."""
    steps = [s for s in train_batches(job) if s["epoch"] > 1 and s["batch"] < 9]
    return statistics.median(s["forward"] + s["backward"] + s["optimizer"] for s in steps)


def compile_part(tmp: Path) -> None:
    print("torch.compile on the unfrozen path (recipe finetune, dogs-mini, 3 epochs, fresh processes)", flush=True)
    cold = {"TORCHINDUCTOR_CACHE_DIR": str(tmp / "inductor")}
    rows = [("eager (compile off)", ["train.compile=off"], {}),
            ("compiled, empty inductor cache", ["train.compile=on"], cold),
            ("compiled, warm inductor cache", ["train.compile=on"], cold)]  # fmt: skip
    eager_step = None
    for i, (label, settings, env) in enumerate(rows):
        job = job_in_a_process(tmp / "ws-compile", f"compile-{i}", 3, *settings, env=env)
        record = json.loads((job / "job.json").read_text())
        step = median_step(job)
        eager_step = eager_step or step
        loop, test = record["timings"]["training_loop"], record["test"]["accuracy"]
        print(f"  {label:32s} median step {step:.3f} s ({step / eager_step:.2f}x eager)  training loop {loop:.1f} s  "
              f"test {test:.3f}  compile {record.get('compile')}", flush=True)  # fmt: skip


def decode_part(count: int = 400) -> None:
    files = sorted((IMAGEWOOF / "train").glob("*/*"))[:count]
    transform = Preprocessing.for_size(SIZE).train_transform()
    rates = {}
    for name, reader in (("PIL (load_image)", load_image), ("torchvision.io (read_image)", read_image)):
        for f in files[:20]:  # warm the page cache and the libraries
            transform(reader(f))
        started = time.perf_counter()
        for f in files:
            transform(reader(f))
        rates[name] = len(files) / (time.perf_counter() - started)
    pil, tv = rates.values()
    print(f"decode + training transform, {count} imagewoof JPEGs, one process: PIL {pil:.1f} images/s, "
          f"torchvision.io {tv:.1f} images/s: {tv / pil:.2f}x", flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=3, help="seeds of imgtune's recipes on dogs-mini")
    parser.add_argument("--pairs", type=int, default=8, help="alternating pairs of 1-epoch jobs (3-epoch: half)")
    parser.add_argument("--part", choices=("all", "accuracy", "overhead", "compile", "decode"), default="all")
    args = parser.parse_args()
    print(f"fine-tuning benchmark: mobilenet_v2 (shared weights), {SIZE} px, batch {BATCH}")
    print(machine(), flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IMGTUNE_CACHE"] = str(Path(tmp) / "cache")
        if args.part in ("all", "decode"):
            decode_part()
        if args.part in ("all", "accuracy"):
            print(f"accuracy, {args.epochs} epochs", flush=True)
            accuracy_part(args.epochs, args.seeds, Path(tmp))
        if args.part in ("all", "overhead"):
            overhead_part(args.pairs, Path(tmp))
        if args.part in ("all", "compile"):
            compile_part(Path(tmp))


if __name__ == "__main__":
    main()
