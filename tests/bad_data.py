"""Test helpers: build datasets holding every kind of bad file, and images that need converting.

Not a test module. Import it from tests (pytest puts `tests/` on sys.path)::

    from bad_data import dogs_mini_dir, make_bad_dataset, make_convertible_images

`make_bad_dataset` copies real photos from the shared dogs-mini set (`shared/data/dogs-mini`, next
to the repository; `IMGTUNE_SHARED` overrides the `shared` folder) and adds one file of each bad kind.
"""

from __future__ import annotations

import io
import os
import shutil
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

__all__ = [
    "BAD_KINDS",
    "CONVERTIBLE_KINDS",
    "EMPTY_CLASS",
    "dogs_mini_dir",
    "make_bad_dataset",
    "make_convertible_images",
    "shared_dir",
]

#: Every key `make_bad_dataset` returns, once each.
BAD_KINDS = (
    "truncated",
    "gif",
    "text_as_jpg",
    "zero_byte",
    "bomb",
    "corrupt",
    "duplicate_across_splits",
    "empty_class",
)
#: Every kind `make_convertible_images` writes, with its file name.
CONVERTIBLE_KINDS = {
    "cmyk.jpg": "cmyk",
    "rgba.png": "rgba",
    "gray16.png": "png16",
    "grey.jpg": "grey",
    "palette.png": "palette",
}
#: The class folder `make_bad_dataset` leaves empty in train.
EMPTY_CLASS = "011.empty_class"
#: The size the bomb PNG declares (not decoded: it is tiny on disk).
BOMB_SIZE = (30000, 30000)

SPLITS = ("train", "valid", "test")


def shared_dir() -> Path:
    """The shared folder: `$IMGTUNE_SHARED`, else `shared/` beside the repository."""
    env = os.environ.get("IMGTUNE_SHARED")
    return Path(env) if env else Path(__file__).resolve().parents[2] / "shared"


def dogs_mini_dir() -> Path:
    """The dogs-mini dataset (train/valid/test, 10 classes of 224x224 JPEGs) in the shared folder."""
    return shared_dir() / "data" / "dogs-mini"


def make_bad_dataset(root: Path, good_source: Path, per_class: int = 6) -> dict[str, str]:
    """Build a small dataset at `root` from `good_source` plus one file of each bad kind.

    `root/{train,valid,test}/` get the first three class folders of `good_source` with real JPEGs
    (`per_class` per class in train, `max(2, per_class // 2)` in valid and test). Added on top:
    in `train/<first class>/` a truncated JPEG, a GIF, a text file named .jpg, an empty .jpg, a
    PNG that declares 30000x30000 pixels and a JPEG with a garbled middle; in `valid/<first class>/`
    a byte-identical copy of a train image; an empty class folder `train/011.empty_class/`; and in
    `train/<second class>/` the images of `make_convertible_images` (good ones, not returned).

    Returns:
        bad path relative to `root` (posix) -> its kind, one of `BAD_KINDS`.
    """
    root, good_source = Path(root), Path(good_source)
    if per_class < 1:
        raise ValueError(f"per_class must be at least 1, got {per_class}")
    classes = sorted(p.name for p in (good_source / "train").iterdir() if p.is_dir())[:3]
    if len(classes) < 3:
        raise FileNotFoundError(f"{good_source}/train needs at least 3 class folders")
    first, second = classes[0], classes[1]

    copied: dict[str, list[Path]] = {}  # train photos copied into root, per class
    spare: dict[str, list[Path]] = {}  # train photos not copied, per class: sources for derived files
    for split in SPLITS:
        n = per_class if split == "train" else max(2, per_class // 2)
        for cls in classes:
            photos = sorted((good_source / split / cls).glob("*.jpg"))
            if len(photos) < n:
                raise FileNotFoundError(f"{good_source / split / cls} holds {len(photos)} JPEGs, need {n}")
            out = root / split / cls
            out.mkdir(parents=True, exist_ok=True)
            for photo in photos[:n]:
                shutil.copyfile(photo, out / photo.name)
            if split == "train":
                copied[cls] = [out / photo.name for photo in photos[:n]]
                spare[cls] = photos[n:] or photos  # fall back to copied ones if none are left

    bad: dict[str, str] = {}
    target = root / "train" / first
    sources = spare[first]

    def add(path: Path, kind: str) -> None:
        bad[path.relative_to(root).as_posix()] = kind

    # truncated: a real JPEG cut to 60% of its bytes.
    data = sources[0].read_bytes()
    (target / "truncated.jpg").write_bytes(data[: int(len(data) * 0.6)])
    add(target / "truncated.jpg", "truncated")

    # gif: a small, valid, two-frame GIF.
    add(_write_gif(target / "anim.gif"), "gif")

    # text_as_jpg: plain text behind an image extension.
    (target / "notes.jpg").write_text("These are my notes about the dogs, not a picture.\n" * 4)
    add(target / "notes.jpg", "text_as_jpg")

    # zero_byte: an empty file.
    (target / "empty.jpg").write_bytes(b"")
    add(target / "empty.jpg", "zero_byte")

    # bomb: a PNG declaring 30000x30000 pixels, a few hundred bytes on disk.
    add(_write_bomb_png(target / "bomb.png", BOMB_SIZE), "bomb")

    # corrupt: valid JPEG header, garbage over the middle of the scan data.
    add(_write_corrupt_jpeg(target / "corrupt.jpg", sources[min(1, len(sources) - 1)].read_bytes()), "corrupt")

    # duplicate_across_splits: a train image copied byte for byte into valid.
    dup = root / "valid" / first / "dup.jpg"
    shutil.copyfile(copied[first][0], dup)
    add(dup, "duplicate_across_splits")

    # empty_class: a class folder with no images.
    empty = root / "train" / EMPTY_CLASS
    empty.mkdir(parents=True, exist_ok=True)
    add(empty, "empty_class")

    # Good images that need converting, inside the training set.
    make_convertible_images(root / "train" / second, source=spare[second][0])
    return bad


def make_convertible_images(dir: Path, *, source: Path | None = None) -> dict[str, str]:
    """Write images that are fine but not 8-bit RGB into `dir` and return file name -> kind.

    Kinds (see `CONVERTIBLE_KINDS`): "cmyk" a CMYK JPEG, "rgba" an RGBA PNG with transparent parts,
    "png16" a 16-bit greyscale PNG, "grey" an 8-bit greyscale JPEG, "palette" a P-mode PNG. They are
    derived from the photo `source` (default: the first dogs-mini training photo; a synthetic
    picture if dogs-mini is not there). Each file's mode is checked after writing.
    """
    dir = Path(dir)
    dir.mkdir(parents=True, exist_ok=True)
    photo = _load_photo(source)

    photo.convert("CMYK").save(dir / "cmyk.jpg", format="JPEG", quality=90)

    rgba = photo.convert("RGBA")
    w, h = rgba.size
    alpha = Image.new("L", rgba.size, 0)  # transparent corners, opaque ellipse, soft ramp
    ImageDraw.Draw(alpha).ellipse((w * 0.1, h * 0.1, w * 0.9, h * 0.9), fill=255)
    ramp = np.tile(np.linspace(64, 255, w, dtype=np.float32), (h, 1))
    alpha = Image.fromarray((np.asarray(alpha, np.float32) * ramp / 255).astype(np.uint8), "L")
    rgba.putalpha(alpha)
    rgba.save(dir / "rgba.png", format="PNG")

    grey16 = np.asarray(photo.convert("L"), np.uint16) * 257  # full 16-bit range
    Image.fromarray(grey16).save(dir / "gray16.png", format="PNG")  # mode "I;16"

    photo.convert("L").save(dir / "grey.jpg", format="JPEG", quality=90)

    photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=256).save(dir / "palette.png", format="PNG")

    expected = {
        "cmyk.jpg": {"CMYK"},
        "rgba.png": {"RGBA"},
        "gray16.png": {"I;16", "I;16B", "I"},
        "grey.jpg": {"L"},
        "palette.png": {"P"},
    }
    for name, modes in expected.items():
        with Image.open(dir / name) as im:
            if im.mode not in modes:
                raise AssertionError(f"{dir / name} opened as mode {im.mode}, expected one of {modes}")
    return dict(CONVERTIBLE_KINDS)


# --------------------------------------------------------------------------- helpers


def _load_photo(source: Path | None) -> Image.Image:
    if source is None:
        candidates = sorted((dogs_mini_dir() / "train").glob("*/*.jpg"))
        source = candidates[0] if candidates else None
    if source is not None:
        with Image.open(source) as im:
            return im.convert("RGB")
    # No photo to hand: a smooth, photo-like picture.
    y, x = np.mgrid[0:224, 0:224].astype(np.float32) / 223
    rng = np.random.default_rng(0)
    rgb = np.stack([x, y, (x + y) / 2], axis=-1) * 200 + rng.normal(0, 12, (224, 224, 3))
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")


def _write_gif(path: Path) -> Path:
    frames = [Image.new("P", (32, 32), i) for i in (1, 2)]
    for i, frame in enumerate(frames):
        frame.putpalette([0, 0, 0, 255, 0, 0, 0, 0, 255] + [0] * (256 * 3 - 9))
        ImageDraw.Draw(frame).rectangle((4 + 8 * i, 4, 20 + 8 * i, 28), fill=0)
    frames[0].save(path, format="GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    return path


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _write_bomb_png(path: Path, size: tuple[int, int]) -> Path:
    """A greyscale PNG whose IHDR says `size`; the IDAT holds only a few (zero) rows."""
    width, height = size
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale, no interlace
    rows = b"".join(b"\x00" + bytes(width) for _ in range(4))  # filter byte + pixels, 4 rows
    png = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(rows, 9))
        + _png_chunk(b"IEND", b"")
    )
    path.write_bytes(png)
    return path


def _decodes(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception:
        return False
    return True


def _identifies_as_jpeg(data: bytes) -> bool:
    try:
        with Image.open(io.BytesIO(data)) as im:
            return im.format == "JPEG"
    except Exception:
        return False


def _write_corrupt_jpeg(path: Path, jpeg: bytes) -> Path:
    """Overwrite the middle of `jpeg`'s scan data with garbage until PIL fails to decode it."""
    start_of_scan = jpeg.find(b"\xff\xda")
    start_of_scan = start_of_scan + 2 if start_of_scan > 0 else len(jpeg) // 4
    for attempt, fraction in enumerate((0.2, 0.4, 0.6, 0.8)):
        data = bytearray(jpeg)
        middle = (start_of_scan + len(jpeg)) // 2
        half = int((len(jpeg) - start_of_scan) * fraction / 2)
        a, b = max(start_of_scan + 16, middle - half), min(len(jpeg) - 2, middle + half)
        data[a:b] = np.random.default_rng(attempt).integers(0, 256, b - a, dtype=np.uint8).tobytes()
        if attempt == 3:  # last resort: a bogus Huffman table mid-stream is a hard libjpeg error
            data[a : a + 6] = b"\xff\xc4\x00\x04\xff\xff"
        if _identifies_as_jpeg(bytes(data)) and not _decodes(bytes(data)):
            path.write_bytes(bytes(data))
            return path
    raise AssertionError(f"could not make a JPEG that PIL identifies but fails to decode for {path}")
