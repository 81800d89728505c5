"""Turning any usable image file into a normalised RGB tensor, for training and for evaluation."""

from __future__ import annotations

import io
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torchvision import tv_tensors
from torchvision.transforms import v2

# torchvision 0.29+ says its decoders will move to TorchCodec (at import and at each call); they still work
warnings.filterwarnings("ignore", "The image decoding and encoding capabilities of TorchVision", DeprecationWarning)
try:
    from torchvision.io import ImageReadMode, decode_jpeg
except ImportError:  # a torchvision without them: every image is decoded by PIL
    decode_jpeg = None

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_INTERPOLATIONS = {
    "bilinear": v2.InterpolationMode.BILINEAR,
    "bicubic": v2.InterpolationMode.BICUBIC,
    "nearest": v2.InterpolationMode.NEAREST,
}


def to_rgb(img: Image.Image) -> Image.Image:
    """Convert greyscale, 16-bit, CMYK, palette and transparent images to 8-bit RGB.

    Transparent pixels are composited on white; 16-bit values are scaled down, not clipped.
    """
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
        arr = np.clip(arr / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(arr, mode="L").convert("RGB")
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        span = float(arr.max() - arr.min()) or 1.0
        return Image.fromarray(((arr - arr.min()) / span * 255).astype(np.uint8), mode="L").convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as 8-bit RGB (the file has passed `check` beforehand)."""
    with Image.open(path) as img:
        img.load()
        return to_rgb(img)


def read_image(path: str | Path) -> tv_tensors.Image | Image.Image:
    """`load_image` for training and evaluation, faster: an RGB or greyscale JPEG (most photos) is decoded by
    libjpeg-turbo into a uint8 tensor (torchvision.io, about twice as fast as PIL and its conversion), everything
    else by PIL as `load_image` does. PIL reads the header first either way, so its pixel limit
    (`Image.MAX_IMAGE_PIXELS`) refuses an oversized image before any decoding; a JPEG that libjpeg refuses is
    given to PIL, which decides. The v2 transforms take either."""
    data = Path(path).read_bytes()
    with Image.open(io.BytesIO(data)) as img:
        if decode_jpeg is not None and img.format == "JPEG" and img.mode in ("RGB", "L"):
            try:
                pixels = decode_jpeg(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=ImageReadMode.RGB)
                return tv_tensors.Image(pixels)
            except RuntimeError:
                pass
        img.load()
        return to_rgb(img)


@dataclass(frozen=True)
class Preprocessing:
    """How the model wants its input: the crop, the resize before it, and the normalisation."""

    image_size: int = 224
    resize_size: int = 256
    mean: tuple[float, float, float] = IMAGENET_MEAN
    std: tuple[float, float, float] = IMAGENET_STD
    interpolation: str = "bilinear"
    train_scale: tuple[float, float] = (0.35, 1.0)

    @classmethod
    def for_size(cls, image_size: int, **kwargs: Any) -> Preprocessing:
        """The usual 0.875 crop ratio: resize to size/0.875, centre-crop to size."""
        return cls(image_size=image_size, resize_size=round(image_size / 0.875), **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Preprocessing:
        fields = {k: tuple(v) if isinstance(v, list) else v for k, v in data.items()}
        return cls(**fields)

    def _finish(self) -> list[v2.Transform]:
        return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(self.mean, self.std)]

    def eval_transform(self) -> v2.Compose:
        interp = _INTERPOLATIONS[self.interpolation]
        return v2.Compose(
            [
                v2.Resize(self.resize_size, interpolation=interp, antialias=True),
                v2.CenterCrop(self.image_size),
            ]
            + self._finish()
        )

    def train_transform(self, augment: str = "basic", random_erasing: float = 0.0) -> v2.Compose:
        """Random crop and flip; `augment` adds a policy ('trivialaugment': TrivialAugmentWide, 'randaugment':
        RandAugment), `random_erasing` erases a random box with that probability (after normalisation)."""
        interp = _INTERPOLATIONS[self.interpolation]
        policies = {"basic": [], "trivialaugment": [v2.TrivialAugmentWide(interpolation=interp)],
                    "randaugment": [v2.RandAugment(interpolation=interp)]}  # fmt: skip
        if augment not in policies:
            raise ValueError(f"unknown augmentation {augment!r}: {', '.join(policies)}")
        return v2.Compose(
            [
                v2.RandomResizedCrop(self.image_size, scale=self.train_scale, interpolation=interp, antialias=True),
                v2.RandomHorizontalFlip(),
                *policies[augment],
            ]
            + self._finish()
            + ([v2.RandomErasing(p=random_erasing, value=0)] if random_erasing > 0 else [])
        )
