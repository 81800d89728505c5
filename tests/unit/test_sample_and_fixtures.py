"""The built-in sample dataset and the bad-data fixture factory."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
from PIL import Image, UnidentifiedImageError

from bad_data import (
    BAD_KINDS,
    BOMB_SIZE,
    CONVERTIBLE_KINDS,
    EMPTY_CLASS,
    dogs_mini_dir,
    make_bad_dataset,
    make_convertible_images,
)
from imgtune.core.errors import DataError
from imgtune.data.sample import (
    MARKER_NAME,
    SAMPLE_CLASS_NAMES,
    SAMPLE_CLASSES,
    SAMPLE_SPLITS,
    generate_sample_dataset,
)

DOGS = dogs_mini_dir()
# The shared data is required: the `dogs_mini` fixture (conftest.py) fails the test when it is missing.
needs_dogs = pytest.mark.usefixtures("dogs_mini")


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# --------------------------------------------------------------------------- sample dataset


def test_sample_layout_and_counts(tmp_path: Path) -> None:
    dest = generate_sample_dataset(tmp_path / "sample", per_class=(5, 2, 3), image_size=64)
    assert dest == tmp_path / "sample"
    assert sorted(p.name for p in dest.iterdir()) == sorted([MARKER_NAME, *SAMPLE_SPLITS])
    assert len(SAMPLE_CLASSES) == len(SAMPLE_CLASS_NAMES) >= 4
    for split, n in zip(SAMPLE_SPLITS, (5, 2, 3), strict=True):
        assert sorted(p.name for p in (dest / split).iterdir()) == list(SAMPLE_CLASSES)
        for cls in SAMPLE_CLASSES:
            number, name = cls.split(".", 1)
            assert number.isdigit() and len(number) == 3
            files = sorted((dest / split / cls).iterdir())
            assert len(files) == n
            for f in files:
                assert f.suffix == ".jpg" and f.name.startswith(name + "_")
                with Image.open(f) as im:
                    assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (64, 64))
                    assert "exif" not in im.info
    marker = json.loads((dest / MARKER_NAME).read_text())
    assert marker["per_class"] == [5, 2, 3] and marker["image_size"] == 64 and marker["seed"] == 0
    # No temp folders left beside it.
    assert [p.name for p in tmp_path.iterdir()] == ["sample"]


def test_sample_is_deterministic_and_seeded(tmp_path: Path) -> None:
    a = _files(generate_sample_dataset(tmp_path / "a", per_class=(4, 1, 1)))
    b = _files(generate_sample_dataset(tmp_path / "b", per_class=(4, 1, 1)))
    assert a == b
    c = _files(generate_sample_dataset(tmp_path / "c", per_class=(4, 1, 1), seed=1))
    assert a.keys() == c.keys()
    assert all(a[k] != c[k] for k in a if k.endswith(".jpg"))


def test_sample_images_differ_within_and_across_classes(tmp_path: Path) -> None:
    dest = generate_sample_dataset(tmp_path / "s", per_class=(6, 0, 0))
    images = [p.read_bytes() for p in (dest / "train").rglob("*.jpg")]
    assert len(set(images)) == len(images) == 6 * len(SAMPLE_CLASSES)


def test_sample_reuse_does_not_rewrite(tmp_path: Path) -> None:
    dest = generate_sample_dataset(tmp_path / "s", per_class=(3, 1, 1))
    before = {p: p.stat().st_mtime_ns for p in dest.rglob("*")}
    inode = dest.stat().st_ino
    assert generate_sample_dataset(tmp_path / "s", per_class=(3, 1, 1)) == dest
    assert {p: p.stat().st_mtime_ns for p in dest.rglob("*")} == before
    assert dest.stat().st_ino == inode


def test_sample_other_parameters_replace_it(tmp_path: Path) -> None:
    dest = generate_sample_dataset(tmp_path / "s", per_class=(3, 1, 1))
    generate_sample_dataset(dest, per_class=(2, 1, 1))
    assert len(list((dest / "train").rglob("*.jpg"))) == 2 * len(SAMPLE_CLASSES)
    assert json.loads((dest / MARKER_NAME).read_text())["per_class"] == [2, 1, 1]
    assert [p.name for p in tmp_path.iterdir()] == ["s"]


def test_sample_incomplete_is_regenerated(tmp_path: Path) -> None:
    dest = generate_sample_dataset(tmp_path / "s", per_class=(3, 1, 1))
    next((dest / "train").rglob("*.jpg")).unlink()
    generate_sample_dataset(dest, per_class=(3, 1, 1))
    assert len(list((dest / "train").rglob("*.jpg"))) == 3 * len(SAMPLE_CLASSES)


def test_sample_into_empty_folder_and_refuses_foreign(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    generate_sample_dataset(tmp_path / "empty", per_class=(1, 1, 1))
    assert (tmp_path / "empty" / MARKER_NAME).is_file()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "keep.txt").write_text("precious")
    with pytest.raises(DataError):
        generate_sample_dataset(tmp_path / "mine", per_class=(1, 1, 1))
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["keep.txt"]


# --------------------------------------------------------------------------- bad-data fixtures


@needs_dogs
def test_bad_dataset_has_every_kind(tmp_path: Path) -> None:
    root = tmp_path / "bad"
    bad = make_bad_dataset(root, DOGS, per_class=4)
    assert sorted(bad.values()) == sorted(BAD_KINDS)
    by_kind = {kind: root / rel for rel, kind in bad.items()}
    for rel in bad:
        assert (root / rel).exists(), rel

    classes = sorted(p.name for p in (root / "train").iterdir())
    first, second = classes[0], classes[1]
    assert classes[-1] == EMPTY_CLASS and len(classes) == 4
    for split in ("valid", "test"):
        assert sorted(p.name for p in (root / split).iterdir()) == classes[:3]
    assert len(list((root / "train" / classes[2]).glob("*.jpg"))) == 4
    assert len(list((root / "test" / classes[2]).glob("*.jpg"))) == 2

    with Image.open(by_kind["truncated"]) as im:
        assert im.format == "JPEG"
        with pytest.raises(OSError):
            im.load()

    with Image.open(by_kind["gif"]) as im:
        assert im.format == "GIF" and getattr(im, "n_frames", 1) >= 1
    assert by_kind["gif"].suffix == ".gif"

    with pytest.raises(UnidentifiedImageError):
        Image.open(by_kind["text_as_jpg"])

    assert by_kind["zero_byte"].stat().st_size == 0
    with pytest.raises(UnidentifiedImageError):
        Image.open(by_kind["zero_byte"])

    # The bomb: tiny on disk; PIL refuses it by default, and reads its declared size when allowed.
    assert by_kind["bomb"].stat().st_size < 10_000
    with pytest.raises(Image.DecompressionBombError):
        Image.open(by_kind["bomb"])
    limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with Image.open(by_kind["bomb"]) as im:
            assert (im.format, im.size) == ("PNG", BOMB_SIZE)
    finally:
        Image.MAX_IMAGE_PIXELS = limit

    with Image.open(by_kind["corrupt"]) as im:
        assert (im.format, im.size) == ("JPEG", (224, 224))
        with pytest.raises(OSError):
            im.load()

    dup = by_kind["duplicate_across_splits"]
    assert dup.relative_to(root).parts[:2] == ("valid", first)
    assert any(p.read_bytes() == dup.read_bytes() for p in (root / "train" / first).glob("*.jpg"))

    assert by_kind["empty_class"] == root / "train" / EMPTY_CLASS
    assert list(by_kind["empty_class"].iterdir()) == []

    # The convertible images sit, good, in the second class.
    for name in CONVERTIBLE_KINDS:
        assert (root / "train" / second / name).is_file()
    assert not any(rel.startswith(f"train/{second}/") for rel in bad)


def test_convertible_images_have_their_modes(tmp_path: Path) -> None:
    kinds = make_convertible_images(tmp_path / "conv")
    assert kinds == CONVERTIBLE_KINDS
    expected = {"cmyk": {"CMYK"}, "rgba": {"RGBA"}, "png16": {"I;16", "I;16B", "I"}, "grey": {"L"}}
    expected["palette"] = {"P"}
    for name, kind in kinds.items():
        with Image.open(tmp_path / "conv" / name) as im:
            im.load()
            assert im.mode in expected[kind], (name, im.mode)
            if kind == "rgba":
                alpha = im.getchannel("A").getextrema()
                assert alpha[0] < 255  # some transparency
            if kind == "png16":
                assert im.getextrema()[1] > 255  # really uses 16 bits


@needs_dogs
def test_bomb_png_is_well_formed(tmp_path: Path) -> None:
    """Chunk CRCs are right, so a strict reader sees a valid PNG with a huge IHDR."""
    root = tmp_path / "bad"
    bad = make_bad_dataset(root, DOGS, per_class=2)
    data = next(root / rel for rel, k in bad.items() if k == "bomb").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, kinds = 8, []
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        crc = int.from_bytes(data[pos + 8 + length : pos + 12 + length], "big")
        assert zlib.crc32(kind + body) == crc
        kinds.append(kind)
        pos += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    assert (int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")) == BOMB_SIZE
