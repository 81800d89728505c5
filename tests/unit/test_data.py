"""Datasets end to end on real files: discovery, checking, the check cache, splitting, transforms,
configs and the `imgtune data check` command. Nothing of imgtune is mocked."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from typer.testing import CliRunner

from bad_data import CONVERTIBLE_KINDS, EMPTY_CLASS, make_bad_dataset, make_convertible_images
from imgtune.cli import app
from imgtune.config import DataConfig, apply_overrides, build_config, load_config_file
from imgtune.core.errors import ConfigError, DataError
from imgtune.data.check import check_dataset, declared_pixels
from imgtune.data.dataset import PreparedData, prepare_data
from imgtune.data.folders import ALL, discover, readable_name
from imgtune.data.transforms import IMAGENET_MEAN, IMAGENET_STD, Preprocessing, load_image, read_image, to_rgb

DOGS_CLASSES = (
    "001.Shih-Tzu",
    "002.Rhodesian_ridgeback",
    "003.beagle",
    "004.English_foxhound",
    "005.Border_terrier",
    "006.Australian_terrier",
    "007.golden_retriever",
    "008.Old_English_sheepdog",
    "009.Samoyed",
    "010.dingo",
)
PER_CLASS = 4  # train photos per class in the bad dataset (valid/test get 2)

#: What each bad kind's reason must say.
REASONS = {
    "truncated": ("truncated",),
    "gif": ("unsupported format GIF",),
    "text_as_jpg": ("not an image",),
    "zero_byte": ("zero-byte",),
    "bomb": ("exceeds the limit",),
    # Seen: "corrupt image: broken data stream when reading image file".
    "corrupt": ("corrupt", "truncated"),
    "duplicate_across_splits": ("identical",),
}


# --------------------------------------------------------------------------- helpers


def _copy_photos(src: Path, dst: Path, n: int, start: int = 0) -> list[Path]:
    photos = sorted(src.glob("*.jpg"))[start : start + n]
    assert len(photos) == n, f"{src} holds too few photos"
    dst.mkdir(parents=True, exist_ok=True)
    for photo in photos:
        shutil.copyfile(photo, dst / photo.name)
    return [dst / p.name for p in photos]


def _classes_layout(root: Path, dogs: Path, n_classes: int = 3, per_class: int = 10) -> dict[str, list[Path]]:
    """ROOT/CLASS/*.jpg from dogs-mini train photos."""
    return {cls: _copy_photos(dogs / "train" / cls, root / cls, per_class) for cls in DOGS_CLASSES[:n_classes]}


def _garbage(path: Path) -> None:
    path.write_bytes(b"definitely not a picture " * 7)


def _paths(data: PreparedData, split: str) -> list[str]:
    return [s.path for s in data.splits[split]]


def _prepare(path: Path, **kwargs: object) -> PreparedData:
    return prepare_data(DataConfig(path=str(path), **kwargs), progress=False)


@pytest.fixture(scope="module")
def bad_dataset(dogs_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A read-only bad dataset shared by the tests that do not modify it: (root, bad rel path -> kind)."""
    root = tmp_path_factory.mktemp("bad") / "bad"
    return root, make_bad_dataset(root, dogs_mini, per_class=PER_CLASS)


def _bad_files(root: Path, bad: dict[str, str]) -> dict[str, str]:
    """Absolute path -> kind of every bad FILE (the empty class is a folder)."""
    return {str(root / rel): kind for rel, kind in bad.items() if kind != "empty_class"}


# --------------------------------------------------------------------------- discover


def test_discover_dogs_mini_splits_layout(dogs_mini: Path) -> None:
    layout = discover(dogs_mini)
    assert layout.kind == "splits"
    assert layout.splits == ["train", "valid", "test"]
    assert layout.missing_splits == []
    assert [c.id for c in layout.classes] == list(DOGS_CLASSES)
    names = {c.id: c.name for c in layout.classes}
    assert names["001.Shih-Tzu"] == "Shih-Tzu"
    assert names["002.Rhodesian_ridgeback"] == "Rhodesian ridgeback"
    assert names["007.golden_retriever"] == "golden retriever"
    assert names["010.dingo"] == "dingo"
    for split, n in (("train", 30), ("valid", 10), ("test", 10)):
        assert sorted(layout.files[split]) == list(DOGS_CLASSES)
        for files in layout.files[split].values():
            assert len(files) == n and files == sorted(files)
            assert all(f.suffix == ".jpg" for f in files)
    assert layout.stray_files == []


def test_readable_name() -> None:
    assert readable_name("001.Affenpinscher") == "Affenpinscher"
    assert readable_name("002.Rhodesian_ridgeback") == "Rhodesian ridgeback"
    assert readable_name("golden_retriever") == "golden retriever"
    assert readable_name("n02086240") == "n02086240"


def test_discover_val_folder_is_the_valid_split(dogs_mini: Path, tmp_path: Path) -> None:
    for cls in DOGS_CLASSES[:2]:
        _copy_photos(dogs_mini / "train" / cls, tmp_path / "train" / cls, 2)
        _copy_photos(dogs_mini / "valid" / cls, tmp_path / "val" / cls, 1)
    layout = discover(tmp_path)
    assert layout.kind == "splits"
    assert layout.splits == ["train", "valid"]
    assert layout.split_dirs["valid"] == tmp_path / "val"
    assert layout.missing_splits == ["test"]
    assert {cls: len(fs) for cls, fs in layout.files["valid"].items()} == {c: 1 for c in DOGS_CLASSES[:2]}


def test_discover_classes_layout(dogs_mini: Path, tmp_path: Path) -> None:
    copied = _classes_layout(tmp_path, dogs_mini, n_classes=3, per_class=3)
    (tmp_path / ".hidden").mkdir()  # hidden folders are not classes
    layout = discover(tmp_path)
    assert layout.kind == "classes"
    assert layout.splits == [ALL]
    assert layout.missing_splits == []
    assert [c.id for c in layout.classes] == list(DOGS_CLASSES[:3])
    assert layout.classes[1].name == "Rhodesian ridgeback"
    assert layout.files[ALL] == {cls: sorted(paths) for cls, paths in copied.items()}


def test_discover_classes_tsv_gives_names(dogs_mini: Path, tmp_path: Path) -> None:
    for wnid in ("n02086240", "n02087394", "n02088364"):
        _copy_photos(dogs_mini / "train" / "001.Shih-Tzu", tmp_path / wnid, 1)
    (tmp_path / "classes.tsv").write_text("n02086240\tShih-Tzu\nn02087394\tRhodesian ridgeback\n")
    layout = discover(tmp_path)
    assert layout.kind == "classes"
    assert {c.id: c.name for c in layout.classes} == {
        "n02086240": "Shih-Tzu",
        "n02087394": "Rhodesian ridgeback",
        "n02088364": "n02088364",  # not in the file: its folder name
    }


def test_discover_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="not found"):
        discover(tmp_path / "nope")
    (tmp_path / "file.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="not a folder"):
        discover(tmp_path / "file.jpg")
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataError, match="no class folders"):
        discover(tmp_path / "flat")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        discover(tmp_path / "empty")


# --------------------------------------------------------------------------- check


def test_check_finds_every_bad_file(bad_dataset: tuple[Path, dict[str, str]]) -> None:
    root, bad = bad_dataset
    report = check_dataset(root)
    reasons = {p.path: p.reason for p in report.problems}
    bad_files = _bad_files(root, bad)
    assert set(reasons) == set(bad_files), "exactly the bad files are problems"
    for path, kind in bad_files.items():
        assert any(word in reasons[path] for word in REASONS[kind]), (kind, reasons[path])
    dup = next(p for p in report.problems if bad_files[p.path] == "duplicate_across_splits")
    assert (dup.split, dup.class_id) == ("valid", DOGS_CLASSES[0])
    assert "train" in dup.reason
    assert not report.fatal
    assert all(i.severity == "warning" for i in report.issues)
    assert any(EMPTY_CLASS in i.message for i in report.issues), report.issues


def test_check_convertible_images_are_good_and_counts_exclude_bad(
    bad_dataset: tuple[Path, dict[str, str]],
) -> None:
    root, _ = bad_dataset
    report = check_dataset(root)
    second = DOGS_CLASSES[1]
    problem_paths = {Path(p.path) for p in report.problems}
    for name in CONVERTIBLE_KINDS:
        assert root / "train" / second / name not in problem_paths
    good_train_second = {Path(f.path).name for f in report.good["train"][second]}
    assert set(CONVERTIBLE_KINDS) <= good_train_second
    assert report.counts() == {
        "train": {
            DOGS_CLASSES[0]: PER_CLASS,
            second: PER_CLASS + 5,
            DOGS_CLASSES[2]: PER_CLASS,
            EMPTY_CLASS: 0,
        },
        "valid": {DOGS_CLASSES[0]: 2, second: 2, DOGS_CLASSES[2]: 2, EMPTY_CLASS: 0},
        "test": {DOGS_CLASSES[0]: 2, second: 2, DOGS_CLASSES[2]: 2, EMPTY_CLASS: 0},
    }
    assert {"CMYK", "RGBA", "L", "P"} <= set(report.modes())
    assert report.modes().get("I;16", 0) + report.modes().get("I", 0) == 1
    summary = report.to_dict()
    assert summary["images"] == {"train": 3 * PER_CLASS + 5, "valid": 6, "test": 6}
    assert summary["sizes"]["max_width"] == 224 and summary["fatal"] is False


def test_check_one_class_is_fatal(dogs_mini: Path, tmp_path: Path) -> None:
    _copy_photos(dogs_mini / "train" / DOGS_CLASSES[0], tmp_path / "a", 3)
    (tmp_path / "b").mkdir()
    _garbage(tmp_path / "b" / "x.jpg")  # the second class has nothing usable
    report = check_dataset(tmp_path)
    assert report.fatal
    assert any(i.severity == "error" and "one class" in i.message for i in report.issues), report.issues
    with pytest.raises(DataError, match="one class"):
        _prepare(tmp_path)


def test_check_splits_without_usable_train_images_is_fatal(dogs_mini: Path, tmp_path: Path) -> None:
    for cls in DOGS_CLASSES[:2]:
        (tmp_path / "train" / cls).mkdir(parents=True)
        _garbage(tmp_path / "train" / cls / "a.jpg")
        (tmp_path / "train" / cls / "b.jpg").write_bytes(b"")
        _copy_photos(dogs_mini / "valid" / cls, tmp_path / "valid" / cls, 2)
    report = check_dataset(tmp_path)
    assert report.kind == "splits"
    assert report.fatal
    assert any(i.severity == "error" and "no usable images" in i.message for i in report.issues)
    with pytest.raises(DataError, match="cannot be trained on"):
        _prepare(tmp_path)


def test_check_without_train_split_is_fatal(dogs_mini: Path, tmp_path: Path) -> None:
    for split in ("valid", "test"):
        for cls in DOGS_CLASSES[:2]:
            _copy_photos(dogs_mini / split / cls, tmp_path / split / cls, 1)
    report = check_dataset(tmp_path)
    assert report.kind == "splits" and report.fatal
    assert any(i.severity == "error" and "no train split" in i.message for i in report.issues)


# --------------------------------------------------------------------------- check cache


def _cache_file_for(cache: Path, root: Path) -> Path:
    hits = [
        f for f in (cache / "checks").glob("*.json") if any(k.startswith(str(root)) for k in json.loads(f.read_text()))
    ]
    assert len(hits) == 1, f"expected one cache file for {root} under {cache / 'checks'}, found {hits}"
    return hits[0]


def test_check_cache_second_check_is_the_same_and_cached(dogs_mini: Path, tmp_path: Path, imgtune_cache: Path) -> None:
    root = tmp_path / "bad"
    make_bad_dataset(root, dogs_mini, per_class=2)
    first = check_dataset(root, cache_dir=imgtune_cache)
    cache_file = _cache_file_for(imgtune_cache, root)
    entries = json.loads(cache_file.read_text())
    all_files = {str(p) for p in root.rglob("*") if p.is_file()}
    assert set(entries) == all_files

    second = check_dataset(root, cache_dir=imgtune_cache)
    assert second.to_dict() == first.to_dict()
    assert second.good == first.good and second.problems == first.problems

    # Really served from the cache file: a (hand-edited) cached verdict is what the next check reports.
    good_path = str(sorted((root / "train" / DOGS_CLASSES[2]).glob("*.jpg"))[0])
    entries[good_path]["info"]["problem"] = "verdict from the cache file"
    cache_file.write_text(json.dumps(entries))
    third = check_dataset(root, cache_dir=imgtune_cache)
    assert {p.path: p.reason for p in third.problems}[good_path] == "verdict from the cache file"


def test_check_cache_sees_modified_files(dogs_mini: Path, tmp_path: Path, imgtune_cache: Path) -> None:
    root = tmp_path / "bad"
    bad = make_bad_dataset(root, dogs_mini, per_class=2)
    first = check_dataset(root, cache_dir=imgtune_cache)
    good = sorted((root / "train" / DOGS_CLASSES[2]).glob("*.jpg"))[0]
    text_as_jpg = next(root / rel for rel, kind in bad.items() if kind == "text_as_jpg")
    assert str(good) not in {p.path for p in first.problems}

    _garbage(good)  # a good image becomes garbage...
    shutil.copyfile(sorted((dogs_mini / "test" / DOGS_CLASSES[0]).glob("*.jpg"))[-1], text_as_jpg)  # ...and back
    second = check_dataset(root, cache_dir=imgtune_cache)
    reasons = {p.path: p.reason for p in second.problems}
    assert "not an image" in reasons[str(good)]
    assert str(text_as_jpg) not in reasons
    assert second.counts()["train"][DOGS_CLASSES[2]] == first.counts()["train"][DOGS_CLASSES[2]] - 1
    assert second.counts()["train"][DOGS_CLASSES[0]] == first.counts()["train"][DOGS_CLASSES[0]] + 1


def test_check_without_cache_dir_writes_no_cache(dogs_mini: Path, tmp_path: Path) -> None:
    _classes_layout(tmp_path / "ds", dogs_mini, n_classes=2, per_class=2)
    check_dataset(tmp_path / "ds", cache_dir=None)
    check_dataset(tmp_path / "ds", cache_dir=None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds"]


# --------------------------------------------------------------------------- prepare_data


def test_prepare_bad_dataset_excludes_every_bad_file(bad_dataset: tuple[Path, dict[str, str]]) -> None:
    root, bad = bad_dataset
    data = _prepare(root)
    bad_files = _bad_files(root, bad)
    used = {s.path for samples in data.splits.values() for s in samples}
    assert not used & set(bad_files)
    assert {p.path for p in data.excluded} == set(bad_files)
    assert [c.id for c in data.classes] == list(DOGS_CLASSES[:3])
    assert EMPTY_CLASS not in {c.id for c in data.classes}
    assert {split: len(s) for split, s in data.splits.items()} == {
        "train": 3 * PER_CLASS + 5,
        "valid": 6,
        "test": 6,
    }
    for samples in data.splits.values():
        for s in samples:
            assert data.classes[s.label].id == Path(s.path).parent.name
    # The convertible images are trained on.
    assert {root / "train" / DOGS_CLASSES[1] / n for n in CONVERTIBLE_KINDS} <= {Path(p) for p in _paths(data, "train")}
    summary = data.summary()
    assert summary["excluded_count"] == len(bad_files) and summary["images"]["train"] == 3 * PER_CLASS + 5


def test_prepare_classes_layout_splits_by_ratios(dogs_mini: Path, tmp_path: Path) -> None:
    copied = _classes_layout(tmp_path / "ds", dogs_mini, n_classes=3, per_class=10)
    data = _prepare(tmp_path / "ds", split_ratios=(0.6, 0.2, 0.2), split_seed=0)
    assert sorted(data.splits) == ["test", "train", "valid"]
    # Stratified: each class is split by the ratios.
    for split, n in (("train", 6), ("valid", 2), ("test", 2)):
        per_class = {c.id: 0 for c in data.classes}
        for s in data.splits[split]:
            per_class[data.classes[s.label].id] += 1
            assert data.classes[s.label].id == Path(s.path).parent.name
        assert per_class == {cls: n for cls in DOGS_CLASSES[:3]}, split
    # Every file in exactly one split.
    sets = {split: set(_paths(data, split)) for split in data.splits}
    assert not sets["train"] & sets["valid"] and not sets["train"] & sets["test"] and not sets["valid"] & sets["test"]
    assert set().union(*sets.values()) == {str(p) for ps in copied.values() for p in ps}
    assert any("ratios" in note for note in data.notes)

    again = _prepare(tmp_path / "ds", split_ratios=(0.6, 0.2, 0.2), split_seed=0)
    assert again.splits == data.splits
    other = _prepare(tmp_path / "ds", split_ratios=(0.6, 0.2, 0.2), split_seed=1)
    assert {split: set(_paths(other, split)) for split in other.splits} != sets
    assert sorted(len(s) for s in other.splits.values()) == sorted(len(s) for s in data.splits.values())


def _splits_without_test(root: Path, dogs: Path, n_classes: int = 3) -> dict[str, list[Path]]:
    train = {}
    for cls in DOGS_CLASSES[:n_classes]:
        train[cls] = _copy_photos(dogs / "train" / cls, root / "train" / cls, 10)
        _copy_photos(dogs / "valid" / cls, root / "valid" / cls, 3)
    return train


def test_prepare_carves_a_missing_test_split(dogs_mini: Path, tmp_path: Path) -> None:
    train = _splits_without_test(tmp_path / "ds", dogs_mini)
    data = _prepare(tmp_path / "ds", carve_missing=True, carve_fraction=0.2)
    assert sorted(data.splits) == ["test", "train", "valid"]
    train_set, test_set = set(_paths(data, "train")), set(_paths(data, "test"))
    assert not train_set & test_set
    assert train_set | test_set == {str(p) for ps in train.values() for p in ps}
    assert len(test_set) == 3 * 2 and len(train_set) == 3 * 8  # 20% of each class
    assert {data.classes[s.label].id for s in data.splits["test"]} == set(DOGS_CLASSES[:3])
    assert len(data.splits["valid"]) == 9
    assert any("carved" in note and "test" in note for note in data.notes), data.notes
    assert _prepare(tmp_path / "ds", carve_missing=True, carve_fraction=0.2).splits == data.splits


def test_prepare_without_carving_has_no_test_split(dogs_mini: Path, tmp_path: Path) -> None:
    _splits_without_test(tmp_path / "ds", dogs_mini)
    data = _prepare(tmp_path / "ds")
    assert "test" not in data.splits
    assert len(data.splits["train"]) == 30 and len(data.splits["valid"]) == 9
    assert any("no test split" in note for note in data.notes), data.notes
    assert any(i.severity == "warning" and "no test split" in i.message for i in data.issues)


# --------------------------------------------------------------------------- transforms


@pytest.fixture(scope="module")
def convertible(dogs_mini: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(folder of convertible images, the photo they were made from)."""
    source = sorted((dogs_mini / "train" / DOGS_CLASSES[2]).glob("*.jpg"))[0]
    folder = tmp_path_factory.mktemp("convertible")
    make_convertible_images(folder, source=source)
    return folder, source


def _rgb(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float64)


@pytest.mark.parametrize("name", sorted(CONVERTIBLE_KINDS))
def test_load_image_converts_to_8bit_rgb(convertible: tuple[Path, Path], name: str) -> None:
    folder, source = convertible
    img = load_image(folder / name)
    assert img.mode == "RGB"
    arr = np.asarray(img, dtype=np.float64)
    assert arr.dtype == np.float64 and arr.shape == (224, 224, 3)
    photo = _rgb(source)
    with Image.open(source) as im:
        grey = np.asarray(im.convert("L"), dtype=np.float64)
    kind = CONVERTIBLE_KINDS[name]
    if kind in ("cmyk", "palette"):
        assert np.abs(arr - photo).mean() < 6, "colours survive the conversion"
    elif kind in ("grey", "png16"):
        assert np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2])
        assert np.abs(arr[..., 0] - grey).mean() < 3
    # rgba: see test_rgba_transparent_pixels_become_white


@pytest.mark.parametrize("name", ["photo.jpg", *sorted(CONVERTIBLE_KINDS)])
def test_read_image_decodes_rgb_and_grey_jpegs_with_torchvision_and_the_rest_as_load_image(
    convertible: tuple[Path, Path], name: str
) -> None:
    """RGB and greyscale JPEGs come back as uint8 tensors (libjpeg-turbo), within a grey level or two of PIL's
    decoding; every other kind (CMYK JPEG, PNGs) exactly as load_image gives it."""
    folder, source = convertible
    path = source if name == "photo.jpg" else folder / name
    image = read_image(path)
    reference = torch.from_numpy(np.array(load_image(path))).permute(2, 0, 1)
    if name in ("photo.jpg", "grey.jpg"):
        assert isinstance(image, torch.Tensor) and image.dtype == torch.uint8 and image.shape == reference.shape
        assert (image.float() - reference.float()).abs().mean() < 2
    else:
        assert isinstance(image, Image.Image)
        assert torch.equal(torch.from_numpy(np.array(image)).permute(2, 0, 1), reference)


def test_read_image_keeps_the_pixel_limit(tmp_path: Path, dogs_mini: Path) -> None:
    """PIL reads the header first: a JPEG over twice Image.MAX_IMAGE_PIXELS is refused before any decoding."""
    photo = sorted((dogs_mini / "train" / DOGS_CLASSES[0]).glob("*.jpg"))[0]
    with Image.open(photo) as im:
        pixels = im.size[0] * im.size[1]
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = pixels // 3
    try:
        with pytest.raises(Image.DecompressionBombError):
            read_image(photo)
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def test_16bit_png_is_scaled_not_clipped(convertible: tuple[Path, Path]) -> None:
    folder, _ = convertible
    with Image.open(folder / "gray16.png") as im:
        im.load()
        raw = np.asarray(im, dtype=np.float64)
        assert raw.max() > 255
        converted = np.asarray(to_rgb(im), dtype=np.float64)
    assert abs(converted.mean() - raw.mean() / 257) < 1.0
    assert abs(converted.max() - raw.max() / 257) <= 1 and abs(converted.min() - raw.min() / 257) <= 1
    assert (converted == 255).mean() < 0.05  # clipping would saturate nearly every pixel at 255


def test_rgba_transparent_pixels_become_white(convertible: tuple[Path, Path]) -> None:
    folder, _ = convertible
    with Image.open(folder / "rgba.png") as im:
        im.load()
        rgba = np.asarray(im, dtype=np.float64)
    rgb = np.asarray(load_image(folder / "rgba.png"), dtype=np.float64)
    alpha = rgba[..., 3]
    transparent, partial = alpha == 0, alpha > 0
    assert transparent.any() and partial.any()
    assert (rgb[transparent] == 255).all()
    # Semi-transparent pixels are composited on white.
    a = alpha[partial][:, None] / 255
    expected = rgba[..., :3][partial] * a + 255 * (1 - a)
    assert np.abs(rgb[partial] - expected).max() <= 2


def test_to_rgb_leaves_rgb_alone_and_handles_la() -> None:
    rgb = Image.new("RGB", (4, 4), (10, 20, 30))
    assert to_rgb(rgb) is rgb
    la = Image.new("LA", (4, 4), (0, 0))
    assert to_rgb(la).getpixel((0, 0)) == (255, 255, 255)
    palette = Image.new("P", (4, 4), 0)
    palette.putpalette([0, 0, 0] * 256)
    palette.info["transparency"] = 0
    assert to_rgb(palette).getpixel((1, 1)) == (255, 255, 255)


def test_eval_transform_shape_and_normalisation() -> None:
    pre = Preprocessing.for_size(64)
    assert (pre.image_size, pre.resize_size) == (64, 73)
    colour = (255, 0, 128)
    tensor = pre.eval_transform()(Image.new("RGB", (150, 90), colour))
    assert isinstance(tensor, torch.Tensor)
    assert tensor.dtype == torch.float32 and tuple(tensor.shape) == (3, 64, 64)
    expected = [(c / 255 - m) / s for c, m, s in zip(colour, IMAGENET_MEAN, IMAGENET_STD, strict=True)]
    for channel in range(3):
        assert torch.allclose(tensor[channel], torch.full((64, 64), expected[channel]), atol=1e-3)


def test_train_transform_shape(dogs_mini: Path) -> None:
    pre = Preprocessing(image_size=48, resize_size=56)
    photo = load_image(sorted((dogs_mini / "train" / DOGS_CLASSES[0]).glob("*.jpg"))[0]).resize((120, 80))
    torch.manual_seed(0)
    for _ in range(3):
        out = pre.train_transform()(photo)
        assert out.dtype == torch.float32 and tuple(out.shape) == (3, 48, 48)
        assert torch.isfinite(out).all()
    evaluated = pre.eval_transform()(photo)
    assert tuple(evaluated.shape) == (3, 48, 48)
    # Normalised: a photo's values straddle zero within ImageNet's range.
    assert evaluated.min() < 0 < evaluated.max() and evaluated.abs().max() < 3


def test_preprocessing_round_trip() -> None:
    pre = Preprocessing.for_size(160, interpolation="bicubic", train_scale=(0.5, 1.0))
    assert Preprocessing.from_dict(pre.to_dict()) == pre
    assert Preprocessing.from_dict(json.loads(json.dumps(pre.to_dict()))) == pre  # lists back to tuples


# --------------------------------------------------------------------------- config


def _err(raw: dict) -> str:
    with pytest.raises(ConfigError) as info:
        build_config(raw)
    return str(info.value)


def test_build_config_defaults() -> None:
    cfg = build_config({"data": {"path": "photos"}})
    assert cfg.data.path == "photos" and cfg.data.split_ratios == (0.8, 0.1, 0.1)
    assert cfg.train.lr == 1e-3 and cfg.train.optimizer == "adam"


def test_build_config_rejects_unknown_keys_and_bad_values() -> None:
    assert "bogus" in _err({"data": {"path": "x"}, "bogus": 1})
    assert "train.lrr" in _err({"data": {"path": "x"}, "train": {"lrr": 0.1}})
    assert "train.lr" in _err({"data": {"path": "x"}, "train": {"lr": -1}})
    assert "train.optimizer" in _err({"data": {"path": "x"}, "train": {"optimizer": "foo"}})
    assert "data.split_ratios" in _err({"data": {"path": "x", "split_ratios": [0.5, 0.2, 0.2]}})
    assert "data.image_size" in _err({"data": {"path": "x", "image_size": 4}})
    assert "train.early_stopping.patience" in _err(
        {"data": {"path": "x"}, "train": {"early_stopping": {"patience": 0}}}
    )
    assert "data" in _err({})
    assert "contradict" in _err({"data": {"path": "x"}, "model": {"weights": "w.pth", "pretrained": "none"}})


def test_apply_overrides_parses_yaml_scalars() -> None:
    raw = apply_overrides(
        {"train": {"epochs": 3}},
        [
            "data.path=/photos",
            "train.lr=0.01",
            "train.feature_cache=false",
            "data.split_ratios=[0.7,0.2,0.1]",
            "model.backbone=resnet18",
            "train.early_stopping.patience=7",
        ],
    )
    assert raw["train"]["lr"] == 0.01 and isinstance(raw["train"]["lr"], float)
    assert raw["train"]["feature_cache"] is False
    assert raw["data"]["split_ratios"] == [0.7, 0.2, 0.1]
    assert raw["train"]["epochs"] == 3 and raw["train"]["early_stopping"]["patience"] == 7
    cfg = build_config(raw)
    assert cfg.data.split_ratios == (0.7, 0.2, 0.1)
    assert cfg.model.backbone == "resnet18" and cfg.train.feature_cache is False


@pytest.mark.parametrize("bad", ["train.lr", "=0.01", " =1"])
def test_apply_overrides_rejects_malformed(bad: str) -> None:
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, [bad])


def test_apply_overrides_rejects_setting_below_a_scalar() -> None:
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"train": {"lr": 0.1}}, ["train.lr.x=1"])


def test_load_config_file(tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text("data:\n  path: photos\ntrain:\n  lr: 0.005\n  optimizer: sgd\n")
    raw = load_config_file(path)
    assert raw == {"data": {"path": "photos"}, "train": {"lr": 0.005, "optimizer": "sgd"}}
    assert build_config(raw).train.optimizer == "sgd"
    (tmp_path / "empty.yaml").write_text("")
    assert load_config_file(tmp_path / "empty.yaml") == {}
    with pytest.raises(ConfigError, match="not found"):
        load_config_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config_file(tmp_path / "list.yaml")
    (tmp_path / "broken.yaml").write_text("data: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(tmp_path / "broken.yaml")


# --------------------------------------------------------------------------- CLI: imgtune data check


def test_cli_check_json_lists_every_bad_file(bad_dataset: tuple[Path, dict[str, str]]) -> None:
    root, bad = bad_dataset
    result = CliRunner().invoke(app, ["data", "check", str(root), "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    listed = {p["path"]: p["reason"] for p in report["problem_files"]}
    bad_files = _bad_files(root, bad)
    assert set(listed) == set(bad_files)
    for path, kind in bad_files.items():
        assert any(word in listed[path] for word in REASONS[kind]), (kind, listed[path])
    assert report["fatal"] is False and report["layout"] == "splits"
    assert report["images"] == {"train": 3 * PER_CLASS + 5, "valid": 6, "test": 6}


def test_cli_check_human_output_names_each_bad_file(
    bad_dataset: tuple[Path, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, bad = bad_dataset
    monkeypatch.setenv("COLUMNS", "400")  # Rich folds long paths in narrow tables
    result = CliRunner().invoke(app, ["data", "check", str(root)])
    assert result.exit_code == 0, result.output
    for path in _bad_files(root, bad):
        assert path in result.stdout, path
    assert EMPTY_CLASS in result.stdout
    assert "usable for training" in result.stdout


def test_cli_check_one_class_exits_2(dogs_mini: Path, tmp_path: Path) -> None:
    _copy_photos(dogs_mini / "train" / DOGS_CLASSES[0], tmp_path / "only" / DOGS_CLASSES[0], 3)
    runner = CliRunner()
    result = runner.invoke(app, ["data", "check", str(tmp_path / "only")])
    assert result.exit_code == 2, result.output
    assert "one class" in result.output
    result = runner.invoke(app, ["data", "check", str(tmp_path / "only"), "--json"])
    assert result.exit_code == 2
    assert json.loads(result.stdout)["fatal"] is True


def test_cli_check_missing_path_is_one_error_line(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dataset"
    result = CliRunner().invoke(app, ["data", "check", str(missing)])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert "not found" in error_lines[0] and str(missing) in error_lines[0], result.stderr
    assert result.stdout == ""


def test_a_class_named_train_does_not_make_a_split_layout(dogs_mini: Path, tmp_path: Path) -> None:
    for name, source in (("bus", "001.Shih-Tzu"), ("car", "002.Rhodesian_ridgeback"), ("train", "003.beagle")):
        _copy_photos(dogs_mini / "train" / source, tmp_path / name, 3)
    layout = discover(tmp_path)
    assert layout.kind == "classes"
    assert [c.id for c in layout.classes] == ["bus", "car", "train"]


def test_camera_file_names_starting_with_underscore_are_kept(dogs_mini: Path, tmp_path: Path) -> None:
    photos = _copy_photos(dogs_mini / "train/001.Shih-Tzu", tmp_path / "a", 2)
    _copy_photos(dogs_mini / "train/003.beagle", tmp_path / "b", 2)
    photos[0].rename(photos[0].with_name("_DSC0001.JPG"))
    (tmp_path / "a" / ".DS_Store").write_bytes(b"\0\1")
    names = [p.name for p in discover(tmp_path).files[ALL]["a"]]
    assert "_DSC0001.JPG" in names and ".DS_Store" not in names


def test_multi_picture_jpegs_from_phones_are_accepted(dogs_mini: Path, tmp_path: Path) -> None:
    from imgtune.data.check import inspect_file

    photo = Image.open(next((dogs_mini / "train/001.Shih-Tzu").iterdir())).convert("RGB")
    path = tmp_path / "phone.jpg"
    photo.save(path, "MPO", save_all=True, append_images=[photo.resize((64, 64))])
    info = inspect_file(path, max_pixels=10**8)
    assert info.format == "MPO" and info.problem is None


def test_ratio_split_is_stable_when_other_files_change(dogs_mini: Path, tmp_path: Path) -> None:
    _classes_layout(tmp_path, dogs_mini, n_classes=2, per_class=20)
    before = _prepare(tmp_path)
    b_class = before.classes[1].id
    placement = {s.path: split for split, samples in before.splits.items() for s in samples if b_class in s.path}
    _copy_photos(dogs_mini / "valid" / before.classes[0].id, tmp_path / before.classes[0].id, 5)
    after = _prepare(tmp_path)
    moved = [
        s.path for split, samples in after.splits.items() for s in samples if placement.get(s.path, split) != split
    ]
    assert moved == []


def test_identical_files_in_one_class_land_in_the_same_split(dogs_mini: Path, tmp_path: Path) -> None:
    photos = _copy_photos(dogs_mini / "train/001.Shih-Tzu", tmp_path / "a", 10)
    _copy_photos(dogs_mini / "train/003.beagle", tmp_path / "b", 10)
    for photo in photos:
        shutil.copy(photo, photo.with_name("copy-" + photo.name))
    data = _prepare(tmp_path)
    split_of: dict[str, set[str]] = {}
    for split, samples in data.splits.items():
        for s in samples:
            split_of.setdefault(s.sha1, set()).add(split)
    assert all(len(splits) == 1 for splits in split_of.values())
    assert "valid" in data.splits and "test" in data.splits


def test_declared_pixels_reads_the_header_only_and_never_raises() -> None:
    """The serving request budget's count: what an image's header declares, without decoding it."""
    import io

    from PIL import Image

    def png(width: int, height: int) -> bytes:
        buffer = io.BytesIO()
        Image.new("1", (width, height)).save(buffer, format="PNG")
        return buffer.getvalue()

    assert declared_pixels(png(2000, 1250), 25_000_000) == 2_500_000
    huge = png(15000, 15000)  # 225 MP in a small file: over PIL's own limit (2 x 89.5 MP)
    assert declared_pixels(huge, 25_000_000) is None  # refused on its own by decode_image
    assert declared_pixels(huge, 300_000_000) == 225_000_000  # a higher cap: counted, so the budget sees it
    assert declared_pixels(b"not an image", 25_000_000) is None
