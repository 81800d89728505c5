"""The built-in sample dataset behind `imgtune demo`: synthetic shapes, generated locally.

No download and no torch: every image is drawn with PIL from a numpy Generator, so the same
parameters always give byte-identical files. Each class is one filled shape in its own band of
hues on a noisy, low-contrast background, so shape and colour both carry the label and even a
small network trained from scratch (or a linear head on frozen random features) learns it in a
few epochs.

Layout (like dogImages, so the "NNN.name" label-id convention is exercised)::

    dest/.imgtune-sample.json            marker: the parameters it was generated with
    dest/train/001.circle/circle_00001.jpg
    dest/valid/001.circle/circle_00041.jpg
    dest/test/001.circle/circle_00051.jpg
    ...
"""

from __future__ import annotations

import colorsys
import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from imgtune.core.errors import DataError

__all__ = [
    "MARKER_NAME",
    "SAMPLE_CLASSES",
    "SAMPLE_CLASS_NAMES",
    "SAMPLE_SPLITS",
    "generate_sample_dataset",
]

#: The shapes, in label order.
SAMPLE_CLASS_NAMES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
#: The class folder names, "NNN.name" like dogImages.
SAMPLE_CLASSES: tuple[str, ...] = tuple(f"{i:03d}.{n}" for i, n in enumerate(SAMPLE_CLASS_NAMES, 1))
#: The split folder names, in the order of `per_class`.
SAMPLE_SPLITS: tuple[str, ...] = ("train", "valid", "test")
#: The marker file written (last, inside the temp dir) into a complete dataset.
MARKER_NAME = ".imgtune-sample.json"

# Bump when the drawing changes, so an old dataset on disk is regenerated rather than reused.
_GENERATOR_VERSION = 1
_JPEG_QUALITY = 90
_SUPERSAMPLE = 2  # draw at 2x and downsample: anti-aliased edges
# Centre of each class's hue band (fraction of the colour wheel) and its half-width.
_HUE_CENTRES = (0.0, 0.25, 0.5, 0.75)  # red, yellow-green, cyan, violet
_HUE_JITTER = 0.05
# Circumradius over half the shape's size (diameter, side, tip-to-tip span), per class.
_CIRCUMRADIUS_PER_HALF_EXTENT = (1.0, math.sqrt(2), 2 / math.sqrt(3), math.sqrt(10) / 3)


def generate_sample_dataset(
    dest: Path,
    *,
    per_class: tuple[int, int, int] = (40, 10, 10),
    image_size: int = 96,
    seed: int = 0,
) -> Path:
    """Generate (or reuse) the synthetic shapes dataset at `dest` and return `dest`.

    Writes `dest/{train,valid,test}/NNN.shape/*.jpg` (JPEG quality 90, no metadata): one filled
    circle, square, triangle or plus-cross per image, 30-70% of the image across, at a random
    position and rotation, in a class-specific hue band on a noisy background. Generation is
    deterministic: image `i` of class `c` in split `s` is drawn from a numpy Generator seeded with
    `(seed, s, c, i)`, so equal parameters give byte-identical files.

    The dataset is built in a temporary folder next to `dest` and moved into place with one
    `os.replace`, so an interrupted run leaves nothing half-written at `dest`. If `dest` already
    holds a complete sample dataset made with the same parameters (its `.imgtune-sample.json`
    marker matches), it is returned at once without rewriting anything; a sample dataset made
    with other parameters is replaced.

    Args:
        dest: the dataset folder to create. Its parent is created if missing.
        per_class: images per class for train, valid and test.
        image_size: the side of the square images, in pixels (at least 16).
        seed: the base seed.

    Returns:
        `dest`.

    Raises:
        DataError: `dest` exists and is neither empty nor a sample dataset (nothing is overwritten),
            or the parameters are invalid.
    """
    dest = Path(dest)
    if len(per_class) != len(SAMPLE_SPLITS) or any(int(n) < 0 for n in per_class):
        raise DataError(f"per_class must be three counts >= 0 (train, valid, test), got {per_class!r}")
    if int(image_size) < 16:
        raise DataError(f"image_size must be at least 16 pixels, got {image_size}")
    params = _marker(tuple(int(n) for n in per_class), int(image_size), int(seed))

    if _is_complete(dest, params):
        return dest
    _check_replaceable(dest)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        _write_dataset(tmp, params)
        # Written last: a folder with a marker is a complete dataset.
        (tmp / MARKER_NAME).write_text(json.dumps(params, indent=2, sort_keys=True) + "\n")
        _move_into_place(tmp, dest, params)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dest


# --------------------------------------------------------------------------- placement


def _marker(per_class: tuple[int, int, int], image_size: int, seed: int) -> dict:
    return {
        "generator": "imgtune.sample",
        "version": _GENERATOR_VERSION,
        "classes": list(SAMPLE_CLASSES),
        "splits": list(SAMPLE_SPLITS),
        "per_class": list(per_class),
        "image_size": image_size,
        "seed": seed,
        "format": "jpeg",
        "quality": _JPEG_QUALITY,
    }


def _read_marker(dest: Path) -> dict | None:
    try:
        data = json.loads((dest / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _is_complete(dest: Path, params: dict) -> bool:
    """True when `dest` has a matching marker and every expected file is there."""
    if _read_marker(dest) != params:
        return False
    for split, n in zip(SAMPLE_SPLITS, params["per_class"], strict=True):
        for cls in SAMPLE_CLASSES:
            folder = dest / split / cls
            try:
                count = sum(1 for e in os.scandir(folder) if e.name.endswith(".jpg"))
            except OSError:
                return False
            if count != n:
                return False
    return True


def _check_replaceable(dest: Path) -> None:
    """Refuse to touch a `dest` that holds something other than a sample dataset."""
    if not dest.exists():
        return
    if not dest.is_dir():
        raise DataError(
            f"cannot write the sample dataset to {dest}: it exists and is not a folder",
            hint="pass another destination or remove it",
        )
    if any(dest.iterdir()) and _read_marker(dest) is None:
        raise DataError(
            f"cannot write the sample dataset to {dest}: the folder is not empty",
            hint="pass an empty or new folder",
        )


def _move_into_place(tmp: Path, dest: Path, params: dict) -> None:
    """Rename the finished `tmp` to `dest`, replacing an empty folder or an older sample dataset."""
    if dest.exists() and _read_marker(dest) is not None:
        # An older sample (other parameters): move it aside, swap, then delete it.
        trash = Path(tempfile.mkdtemp(prefix=f".{dest.name}.old-", dir=dest.parent))
        with contextlib.suppress(FileNotFoundError):  # another process may have moved it first
            os.replace(dest, trash / "old")
        try:
            os.replace(tmp, dest)
        finally:
            shutil.rmtree(trash, ignore_errors=True)
        return
    try:
        os.replace(tmp, dest)  # works onto a missing or empty folder
    except OSError:
        # Another process may have finished the same dataset first: fine if it matches.
        if _is_complete(dest, params):
            return
        raise


# --------------------------------------------------------------------------- drawing


def _write_dataset(root: Path, params: dict) -> None:
    size = params["image_size"]
    seed = params["seed"]
    for c, (cls, name) in enumerate(zip(SAMPLE_CLASSES, SAMPLE_CLASS_NAMES, strict=True)):
        number = 1  # numbered on across splits, like dogImages' Shih-Tzu_00031.jpg in valid
        for s, (split, n) in enumerate(zip(SAMPLE_SPLITS, params["per_class"], strict=True)):
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                rng = np.random.default_rng([seed, s, c, i])
                image = _draw_image(rng, c, size)
                image.save(folder / f"{name}_{number:05d}.jpg", format="JPEG", quality=_JPEG_QUALITY)
                number += 1


def _hsv_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    r, g, b = colorsys.hsv_to_rgb(h % 1.0, s, v)
    return round(r * 255), round(g * 255), round(b * 255)


def _draw_image(rng: np.random.Generator, class_index: int, size: int) -> Image.Image:
    """One image: a noisy muted background and the class's shape in the class's hue band."""
    big = size * _SUPERSAMPLE

    # Background: a muted, darkish random colour, a gentle gradient and low-contrast noise.
    bg = np.array(_hsv_rgb(rng.random(), rng.uniform(0.0, 0.3), rng.uniform(0.2, 0.45)), np.float32)
    ramp = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    angle = rng.uniform(0, 2 * math.pi)
    gradient = (math.cos(angle) * ramp[None, :] + math.sin(angle) * ramp[:, None]) * rng.uniform(0, 12)
    noise = rng.normal(0.0, 10.0, (size, size, 3)).astype(np.float32)
    background = np.clip(bg + gradient[..., None] + noise, 0, 255).astype(np.uint8)
    canvas = Image.fromarray(background, "RGB").resize((big, big), Image.Resampling.NEAREST)

    # Shape: 30-70% of the image across, fully inside it, random rotation.
    hue = _HUE_CENTRES[class_index] + rng.uniform(-_HUE_JITTER, _HUE_JITTER)
    colour = _hsv_rgb(hue, rng.uniform(0.65, 1.0), rng.uniform(0.75, 1.0))
    # Circle diameter, square/triangle side or cross span: 30-70% of the image side; `radius` is
    # the circumradius that follows from it (capped so a large rotated square still fits).
    extent = rng.uniform(0.3, 0.7) * big
    radius = min(extent / 2 * _CIRCUMRADIUS_PER_HALF_EXTENT[class_index], 0.49 * big)
    cx = rng.uniform(radius + 1, big - radius - 1)
    cy = rng.uniform(radius + 1, big - radius - 1)
    rotation = rng.uniform(0, 2 * math.pi)
    draw = ImageDraw.Draw(canvas)
    if class_index == 0:
        draw.ellipse((cx - radius, cy - radius, cx + radius, cy + radius), fill=colour)
    else:
        draw.polygon(_polygon(class_index, cx, cy, radius, rotation), fill=colour)

    image = canvas.resize((size, size), Image.Resampling.LANCZOS)
    # A little noise over the shape too, so it is not a flat patch.
    arr = np.asarray(image, np.float32) + rng.normal(0.0, 4.0, (size, size, 3)).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8), "RGB")


def _polygon(class_index: int, cx: float, cy: float, radius: float, rotation: float) -> list[tuple]:
    """Vertices of the square (1), triangle (2) or plus-cross (3), within `radius` of the centre."""
    if class_index == 1:  # square: corners on the circle
        points = [(math.cos(a), math.sin(a)) for a in (math.pi / 4 + k * math.pi / 2 for k in range(4))]
    elif class_index == 2:  # equilateral triangle
        points = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2 + k * 2 * math.pi / 3 for k in range(3))]
    else:  # plus-cross: arms a third of the width, tips on the circle
        a = 3 / math.sqrt(10)  # arm tip: the corner (a, a / 3) lies on the circle
        t = a / 3  # half the arm width
        points = [
            (a, t),
            (t, t),
            (t, a),
            (-t, a),
            (-t, t),
            (-a, t),
            (-a, -t),
            (-t, -t),
            (-t, -a),
            (t, -a),
            (t, -t),
            (a, -t),
        ]
    cos, sin = math.cos(rotation), math.sin(rotation)
    return [(cx + radius * (x * cos - y * sin), cy + radius * (x * sin + y * cos)) for x, y in points]
