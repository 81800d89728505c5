"""Fine-tuning against the frozen backbone and the plain torchvision loop, in one run (issue 20).

For each dataset (dogs-mini; an imagewoof subset: the first 60 training photos per breed for train, then 20 and
20 of its val photos per breed for valid and test, linked into a temporary folder), with the shared MobileNetV2
weights at 224 px, batch 32, the same number of epochs for all:

- the plain loop: torchvision ImageFolder, PIL, fp32, Adam 1e-3 on every layer, the usual crop/flip
  augmentation, no callbacks (what a user writes by hand);
- `imgtune train --recipe frozen` (a head on cached features);
- `imgtune train --recipe finetune` (the whole network: backbone at a tenth of the rate, warmup, cosine, label
  smoothing, frozen batch-norm statistics);

each reporting epochs, wall time, training images/s (training-loop time), valid accuracy of the kept model and
test accuracy. Then the debugger and profiler's cost on the unfrozen path (`--recipe finetune`, both at their
defaults) against the same job without them, alternating `--repeats` runs each, training-loop time.

    python benchmarks/finetune.py | tee benchmarks/results/finetune.txt
"""

from __future__ import annotations

import argparse
import os
import statistics
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
from imgtune.runs.train import run_training_job

IMAGEWOOF = SHARED / "data/imagewoof"
SIZE, BATCH = 224, 32


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


def imgtune_job(data: Path, recipe: str, epochs: int, workspace: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    raw = {"data": {"path": str(data), "image_size": SIZE}, "recipe": recipe,
           "model": {"backbone": "mobilenet_v2", "weights": str(MOBILENET_WEIGHTS)},
           "train": {"epochs": epochs, "batch_size": BATCH, "early_stopping": {"enabled": False}}}  # fmt: skip
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    started = time.perf_counter()
    job = run_training_job(build_config(raw), workspace=workspace, progress=False)
    record = job.record()
    loop = record.timings["training_loop"]
    train_images = record.dataset["images"]["train"]
    return {
        "wall": time.perf_counter() - started, "loop": loop, "images_per_s": train_images * epochs / loop,
        "valid": [m.get("valid_accuracy") for m in job.read_metrics()], "test": record.test["accuracy"],
    }  # fmt: skip


def show(name: str, result: dict[str, Any], baseline: dict[str, Any]) -> None:
    valid = " ".join(f"{v:.3f}" for v in result["valid"])
    rate = result["images_per_s"]
    print(
        f"  {name:22s} wall {result['wall']:7.1f} s  train {rate:7.1f} img/s "
        f"({rate / baseline['images_per_s']:.2f}x the plain loop)  valid {valid}  test {result['test']:.3f}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"fine-tuning benchmark: mobilenet_v2 (shared weights), {SIZE} px, batch {BATCH}, {args.epochs} epochs")
    print(machine())
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IMGTUNE_CACHE"] = str(Path(tmp) / "cache")
        woof = imagewoof_subset(Path(tmp) / "imagewoof-subset")
        for label, data in (("dogs-mini (300 train, 100 valid, 100 test)", DOGS_MINI),
                            ("imagewoof subset (600 train, 200 valid, 200 test)", woof)):  # fmt: skip
            print(label)
            baseline = plain_loop(data, args.epochs)
            show("plain torchvision loop", baseline, baseline)
            for recipe in ("frozen", "finetune"):
                show(f"imgtune {recipe}", imgtune_job(data, recipe, args.epochs, Path(tmp) / "ws"), baseline)
        print(f"debugger and profiler on the unfrozen path (recipe finetune, dogs-mini, 1 epoch, {args.repeats} "
              "alternating runs each; training-loop seconds)")  # fmt: skip
        loops: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for on in (False, True):
                observers = {"debugger": {"enabled": on}, "profiler": {"enabled": on}}
                loops[on].append(imgtune_job(DOGS_MINI, "finetune", 1, Path(tmp) / "ws", **observers)["loop"])
        off, on = statistics.median(loops[False]), statistics.median(loops[True])
        print(f"  without {off:.2f} s  with {on:.2f} s  ratio {on / off:.3f} (target 1.05)  runs {loops}")


if __name__ == "__main__":
    main()
