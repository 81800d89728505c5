"""Backbone feature extraction, images/s end to end from JPEG files, in one run: the naive baseline (what the
original scripts did: torchvision ImageFolder, PIL, fp32 NCHW eager, batch 32) vs imgtune's path (its loader,
and the inference backend `auto` chooses on this device: the fastest whose outputs agree with fp32 eager), for
resnet50 and mobilenet_v2 at 224 px. Both use the same DataLoader worker count and batch size.

Also the model step alone (a preloaded batch) on every inference backend, against the measured GEMM bound as the
issue defines it: this machine's fp32 matrix multiply GFLOP/s (2n^3 per n x n product) divided by the model's
usual GFLOP figure per image (ResNet-50 4.1, MobileNetV2 0.3; these count multiply-adds). ResNet-50 uses a
fixed seed's weights (no ImageNet ResNet-50 weights are reachable here; speed does not depend on the values);
MobileNetV2 the shared ImageNet weights.

    python benchmarks/backbone.py | tee benchmarks/results/backbone.txt
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torchvision
from overhead import MOBILENET_WEIGHTS, SHARED, machine
from torch.utils.data import DataLoader
from torchvision import transforms as v1

from imgtune.core.resources import default_workers
from imgtune.data.dataset import Sample
from imgtune.data.transforms import load_image
from imgtune.models.backends import agreement, backend_names, choose_backend, make_backend
from imgtune.models.factory import create_model
from imgtune.training.feature_cache import example_images, extract_features

GFLOP_PER_IMAGE = {"resnet50": 4.1, "mobilenet_v2": 0.3}
BATCH = 32


def gemm_gflops(size: int = 2048, repeats: int = 10, rounds: int = 5) -> float:
    """The best of a few rounds: the bound is what the machine can do, and these machines are noisy."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(rounds):
        started = time.perf_counter()
        for _ in range(repeats):
            a @ b
        best = max(best, 2 * size**3 * repeats / (time.perf_counter() - started) / 1e9)
    return best


def photo_folder(source: Path, target: Path, count: int) -> list[Path]:
    """An ImageFolder-shaped folder of `count` photos (symlinks), spread over the source's classes."""
    classes = sorted(p for p in source.iterdir() if p.is_dir())
    per_class = -(-count // len(classes))
    photos = []
    for class_dir in classes:
        (target / class_dir.name).mkdir(parents=True)
        for photo in sorted(class_dir.iterdir())[:per_class]:
            (target / class_dir.name / photo.name).symlink_to(photo)
            photos.append(target / class_dir.name / photo.name)
    return photos[:count]


def naive(backbone: torch.nn.Module, folder: Path, workers: int) -> float:
    transform = v1.Compose(
        [v1.Resize(256), v1.CenterCrop(224), v1.ToTensor(), v1.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])]
    )
    loader = DataLoader(torchvision.datasets.ImageFolder(folder, transform), batch_size=BATCH, num_workers=workers)
    backbone = backbone.eval()
    started, seen = time.perf_counter(), 0
    with torch.no_grad():
        for images, _ in loader:
            backbone(images)
            seen += images.shape[0]
    return seen / (time.perf_counter() - started)


def imgtune_backend(backbone: torch.nn.Module, photos: list[Path], preprocessing, workers: int):
    samples = [Sample(str(p), 0, "") for p in photos]
    transform = preprocessing.eval_transform()
    started = time.perf_counter()
    backend, choice = choose_backend(backbone, example_images(samples, transform), torch.device("cpu"), "auto")
    choosing = time.perf_counter() - started
    stats: dict[str, float] = {}
    started = time.perf_counter()
    extract_features(
        backend, samples, transform, device=torch.device("cpu"), batch_size=BATCH, num_workers=workers,
        progress=False, stats=stats,
    )  # fmt: skip
    rate = len(samples) / (time.perf_counter() - started)
    wait = stats["data_wait_seconds"] / (stats["data_wait_seconds"] + stats["backbone_seconds"])
    return rate, backend.name, choosing, choice, wait


def decode_rates(photos: list[Path], preprocessing) -> dict[str, float]:
    """images/s of one process turning JPEG files into normalised 224 px tensors, two ways."""
    from torchvision.io import ImageReadMode, decode_jpeg, read_file
    from torchvision.transforms import v2

    pil = preprocessing.eval_transform()
    on_tensors = v2.Compose(
        [v2.Resize(preprocessing.resize_size, antialias=True), v2.CenterCrop(preprocessing.image_size),
         v2.ToDtype(torch.float32, scale=True), v2.Normalize(preprocessing.mean, preprocessing.std)]
    )  # fmt: skip
    ways = {
        "PIL decode + resize (imgtune's loader)": lambda p: pil(load_image(p)),
        "torchvision.io.decode_jpeg + resize on uint8 tensors": lambda p: on_tensors(
            decode_jpeg(read_file(str(p)), mode=ImageReadMode.RGB)
        ),
    }
    rates = {}
    for name, convert in ways.items():
        started = time.perf_counter()
        for photo in photos:
            convert(photo)
        rates[name] = len(photos) / (time.perf_counter() - started)
    return rates


def model_step(backbone: torch.nn.Module, example: torch.Tensor) -> dict[str, tuple[float, float]]:
    """images/s of each backend on a preloaded batch, and its mean cosine agreement with fp32 eager."""
    reference = make_backend("eager", backbone, torch.device("cpu"))(example)
    results = {}
    for name in backend_names():
        try:
            started = time.perf_counter()
            backend = make_backend(name, backbone, torch.device("cpu"))
            outputs = backend(example)  # warm-up (and, for compile, the compilation)
            setup = time.perf_counter() - started
            started = time.perf_counter()
            for _ in range(3):
                backend(example)
            rate = 3 * example.shape[0] / (time.perf_counter() - started)
            results[name] = (rate, agreement(outputs, reference)["mean_cosine"], setup)
        except Exception as exc:
            print(f"    {name}: cannot run here ({type(exc).__name__}: {exc})")
    return results


def loader_sweep(backbone, photos: list[Path], preprocessing, backend_name: str) -> None:
    """imgtune's extraction at other worker counts and batch sizes (does the backbone wait for data?)."""
    samples = [Sample(str(p), 0, "") for p in photos]
    backend = make_backend(backend_name, backbone, torch.device("cpu"))
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 3 workers on 2 cores: on purpose
    for workers in (0, 1, 2, 3):
        for batch in (32, 64):
            stats: dict[str, float] = {}
            started = time.perf_counter()
            extract_features(
                backend, samples, preprocessing.eval_transform(), device=torch.device("cpu"), batch_size=batch,
                num_workers=workers, progress=False, stats=stats,
            )  # fmt: skip
            rate = len(samples) / (time.perf_counter() - started)
            wait = stats["data_wait_seconds"] / (stats["data_wait_seconds"] + stats["backbone_seconds"])
            print(f"    {workers} workers, batch {batch}: {rate:6.1f} images/s, waiting for data {100 * wait:3.0f}%")


def depthwise_share(backbone: torch.nn.Module, example: torch.Tensor) -> tuple[float, float]:
    """Share of multiply-adds and of eager fp32 time in depthwise convolutions (groups == channels)."""
    spent = {True: 0.0, False: 0.0}
    macs = {True: 0.0, False: 0.0}
    started: dict[int, float] = {}

    def before(module, inputs):
        started[id(module)] = time.perf_counter()

    def after(module, inputs, output):
        depthwise = module.groups > 1 and module.groups == module.in_channels
        spent[depthwise] += time.perf_counter() - started[id(module)]
        kernel = module.kernel_size[0] * module.kernel_size[1] * module.in_channels // module.groups
        macs[depthwise] += output.numel() * kernel

    handles = []
    for module in backbone.modules():
        if isinstance(module, torch.nn.Conv2d):
            handles += [module.register_forward_pre_hook(before), module.register_forward_hook(after)]
    with torch.inference_mode():
        backbone.eval()(example)
        for key in spent:
            spent[key], macs[key] = 0.0, 0.0
        backbone(example)
    for handle in handles:
        handle.remove()
    return macs[True] / sum(macs.values()), spent[True] / sum(spent.values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--photos", type=int, default=512, help="imagewoof train photos per model")
    args = parser.parse_args()
    workers = default_workers()
    print(machine())
    gflops = gemm_gflops()
    print(f"fp32 GEMM (2048x2048, best of 5 rounds): {gflops:.0f} GFLOP/s")
    print(f"{args.photos} imagewoof train photos, batch {BATCH}, {workers} DataLoader workers on both sides\n")
    with tempfile.TemporaryDirectory(prefix="imgtune-backbone-") as tmp:
        os.environ["IMGTUNE_CACHE"] = str(Path(tmp) / "cache")  # measure the choice of backend, do not recall it
        folder = Path(tmp) / "photos"
        photos = photo_folder(SHARED / "data/imagewoof/train", folder, args.photos)
        print("data path, one process, JPEG file to normalised 224 px tensor:")
        for way, rate in decode_rates(
            photos[:128], create_model("mobilenet_v2", 2, pretrained="none").preprocessing(224)
        ).items():
            print(f"  {way}: {rate:.0f} images/s")
        print()
        for name in ("resnet50", "mobilenet_v2"):
            torch.manual_seed(0)
            weights = str(MOBILENET_WEIGHTS) if name == "mobilenet_v2" else None
            model = create_model(name, 10, pretrained="none", weights=weights)
            backbone, preprocessing = model.backbone, model.preprocessing(224)
            print(f"{name}:")
            baseline = naive(backbone, folder, workers)
            fast, chosen, choosing, choice, wait = imgtune_backend(backbone, photos, preprocessing, workers)
            print(f"  end to end: naive {baseline:.1f} images/s, imgtune ({chosen}) {fast:.1f} images/s: "
                  f"{fast / baseline:.2f}x (choosing the backend took {choosing:.1f} s, once per device); the backbone "
                  f"waited for data {100 * wait:.0f}% of the time")  # fmt: skip
            for trial in choice.get("trials", []):
                status = "ok" if trial["accepted"] else f"rejected: {trial['reason']}"
                print(f"    auto measured {trial['name']}: {trial['ms_per_image'] or 0:.1f} ms/image, {status}")
            bound = gflops / GFLOP_PER_IMAGE[name]
            example = torch.stack([preprocessing.eval_transform()(load_image(p)) for p in photos[:BATCH]])
            print(f"  model step on a preloaded batch of {BATCH} (GEMM bound {bound:.1f} images/s):")
            for backend_name, (rate, cosine, setup) in model_step(backbone, example).items():
                print(f"    {backend_name:>13}: {rate:6.1f} images/s = {100 * rate / bound:5.1f}% of the bound, "
                      f"mean cosine vs fp32 eager {cosine:.5f}, setup {setup:.1f} s")  # fmt: skip
            macs, seconds = depthwise_share(backbone, example)
            print(f"  depthwise convolutions: {100 * macs:.0f}% of the multiply-adds, {100 * seconds:.0f}% of the "
                  "eager fp32 convolution time")  # fmt: skip
            if name == "mobilenet_v2":
                print(f"  imgtune's extraction ({chosen}) at other loader settings:")
                loader_sweep(backbone, photos, preprocessing, chosen)
            print()


if __name__ == "__main__":
    main()
