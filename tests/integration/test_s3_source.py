"""s3:// dataset sources against a real S3 API: moto's server mode as a subprocess on 127.0.0.1.

Nothing of imgtune, fsspec, s3fs or botocore is mocked: the endpoint comes from AWS_ENDPOINT_URL, as it
would for a user's MinIO or S3, and every request goes over HTTP to 127.0.0.1 only.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imgtune.cli import app
from imgtune.config import DataConfig
from imgtune.core.errors import DataError
from imgtune.data.dataset import prepare_data
from imgtune.data.sources import resolve_source

BUCKET = "imgtune-test"
PREFIX = "dogs"
URL = f"s3://{BUCKET}/{PREFIX}"
MISSING_BUCKET = "imgtune-no-such-bucket"
CLASSES = ("001.Shih-Tzu", "002.Rhodesian_ridgeback", "003.beagle")
PER_SPLIT = {"train": 4, "valid": 2, "test": 2}
BAD_FILE = "train/001.Shih-Tzu/notes.jpg"
BAD_TEXT = b"These are my notes about the dogs, not a picture.\n" * 4
SOURCE_RECORD = ".imgtune-source.json"  # written by resolve_source next to the copied files (and its .lock)


@pytest.fixture(scope="module")
def s3_dogs(s3_client: Any, dogs_mini: Path) -> dict[str, bytes]:
    """Uploads 3 dogs-mini classes (train 4 / valid 2 / test 2) and a text file named .jpg under URL.

    Returns the uploaded bytes by path relative to the prefix.
    """
    files: dict[str, bytes] = {}
    for split, n in PER_SPLIT.items():
        for class_id in CLASSES:
            photos = sorted((dogs_mini / split / class_id).glob("*.jpg"))[:n]
            assert len(photos) == n, f"dogs-mini {split}/{class_id} holds too few photos"
            for photo in photos:
                files[f"{split}/{class_id}/{photo.name}"] = photo.read_bytes()
    files[BAD_FILE] = BAD_TEXT
    s3_client.create_bucket(Bucket=BUCKET)
    for rel, data in files.items():
        s3_client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{rel}", Body=data)
    return files


def _local_files(root: Path) -> dict[str, Path]:
    files = (p for p in sorted(root.rglob("*")) if p.is_file() and not p.name.startswith(SOURCE_RECORD))
    return {p.relative_to(root).as_posix(): p for p in files}


# --------------------------------------------------------------------------- resolve_source


def test_resolve_source_copies_once_then_only_changed_files(
    s3_dogs: dict[str, bytes], s3_client: Any, dogs_mini: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    local = resolve_source(URL, cache=cache, progress=True)  # progress on: the Rich bar runs too
    assert local.is_dir() and local.is_relative_to(cache / "sources")
    files = _local_files(local)
    assert set(files) == set(s3_dogs)
    assert {rel: p.read_bytes() for rel, p in files.items()} == s3_dogs
    record = json.loads((local / SOURCE_RECORD).read_text())
    assert record["url"] == URL and set(record["files"]) == set(s3_dogs)
    assert not list(local.rglob("*.part")), "no partial downloads left behind"

    # Mark every copy with an old mtime: a file copied again gets a fresh one.
    old_ns = 1_000_000_000 * 10**9
    for path in files.values():
        os.utime(path, ns=(old_ns, old_ns))

    assert resolve_source(URL, cache=cache, progress=False) == local
    assert {rel: p.stat().st_mtime_ns for rel, p in _local_files(local).items()} == dict.fromkeys(s3_dogs, old_ns)

    # Replace one photo by another photo of the same class (a different size): only it is copied again.
    changed = next(rel for rel in s3_dogs if rel.startswith(f"train/{CLASSES[0]}/") and rel != BAD_FILE)
    new_bytes = sorted((dogs_mini / "train" / CLASSES[0]).glob("*.jpg"))[PER_SPLIT["train"]].read_bytes()
    assert len(new_bytes) != len(s3_dogs[changed])
    s3_client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{changed}", Body=new_bytes)
    try:
        assert resolve_source(URL, cache=cache, progress=False) == local
    finally:
        s3_client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{changed}", Body=s3_dogs[changed])
    after = _local_files(local)
    assert set(after) == set(s3_dogs)
    recopied = {rel for rel, p in after.items() if p.stat().st_mtime_ns != old_ns}
    assert recopied == {changed}
    assert after[changed].read_bytes() == new_bytes


def test_resolve_source_missing_bucket_is_a_clear_data_error(s3_env: str, tmp_path: Path) -> None:
    url = f"s3://{MISSING_BUCKET}/dogs"
    with pytest.raises(DataError) as info:
        resolve_source(url, cache=tmp_path, progress=False)
    assert info.value.message.startswith(f"cannot list {url}: ")
    assert "bucket does not exist" in info.value.message
    assert "AWS_ENDPOINT_URL" in (info.value.hint or "")
    assert not (tmp_path / "sources").exists(), "nothing is created for a source that cannot be listed"


def test_resolve_source_empty_prefix_is_a_data_error(s3_dogs: dict[str, bytes], tmp_path: Path) -> None:
    with pytest.raises(DataError, match=f"no files under s3://{BUCKET}/no-such-prefix"):
        resolve_source(f"s3://{BUCKET}/no-such-prefix", cache=tmp_path, progress=False)


# --------------------------------------------------------------------------- prepare_data


def test_prepare_data_from_s3(s3_dogs: dict[str, bytes], tmp_path: Path) -> None:
    data = prepare_data(DataConfig(path=URL, num_workers=0), progress=False, cache=tmp_path)
    assert data.source == URL
    assert data.root.is_relative_to(tmp_path / "sources")
    assert [c.id for c in data.classes] == list(CLASSES)
    assert {split: len(samples) for split, samples in data.splits.items()} == {
        split: n * len(CLASSES) for split, n in PER_SPLIT.items()
    }
    assert [Path(p.path).relative_to(data.root).as_posix() for p in data.excluded] == [BAD_FILE]
    assert data.excluded[0].split == "train" and data.excluded[0].class_id == CLASSES[0]
    assert "not an image" in data.excluded[0].reason


# --------------------------------------------------------------------------- CLI


def test_cli_data_check_s3_json(s3_dogs: dict[str, bytes], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(app, ["data", "check", URL, "--json"])
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["fatal"] is False and report["layout"] == "splits"
    assert report["images"] == {split: n * len(CLASSES) for split, n in PER_SPLIT.items()}
    problems = [p["path"] for p in report["problem_files"]]
    assert len(problems) == 1 and Path(problems[0]).as_posix().endswith(f"/{BAD_FILE}"), problems
    assert Path(problems[0]).is_relative_to(tmp_path / "cache" / "sources")


@pytest.mark.slow
def test_cli_train_reads_its_data_from_s3(s3_dogs: dict[str, bytes], mobilenet_weights: Path, tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app,
        ["train", "--data", URL, "--backbone", "mobilenet_v2", "--weights", str(mobilenet_weights), "--epochs", "2",
         "--image-size", "64", "--workspace", str(tmp_path / "ws"), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "completed" and summary["excluded_files"] == 1  # the text file named .jpg
    assert summary["test"]["samples"] == PER_SPLIT["test"] * len(CLASSES)
    record = json.loads((Path(summary["path"]) / "job.json").read_text())
    assert record["config"]["data"]["path"] == URL and record["dataset"]["source"] == URL


def test_cli_data_check_missing_bucket_is_one_error_line(
    s3_env: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path / "cache"))
    url = f"s3://{MISSING_BUCKET}/dogs"
    result = CliRunner().invoke(app, ["data", "check", url, "--json"])
    assert result.exit_code == 2, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1, result.stderr
    assert url in error_lines[0] and "bucket does not exist" in error_lines[0], result.stderr
    assert result.stdout == ""


def test_resolve_source_follows_same_size_edits_and_deletions(
    s3_dogs: dict[str, bytes], s3_client: Any, tmp_path: Path
) -> None:
    cache = tmp_path / "cache"
    local = resolve_source(URL, cache=cache, progress=False)
    edited, deleted = sorted(rel for rel in s3_dogs if rel.startswith("train/") and rel != BAD_FILE)[:2]
    same_size = s3_dogs[edited][:-2] + b"\xff\xd9"[::-1]  # same length, other bytes
    assert len(same_size) == len(s3_dogs[edited]) and same_size != s3_dogs[edited]
    s3_client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{edited}", Body=same_size)
    s3_client.delete_object(Bucket=BUCKET, Key=f"{PREFIX}/{deleted}")
    try:
        assert resolve_source(URL, cache=cache, progress=False) == local
        files = _local_files(local)
        assert deleted not in files
        assert files[edited].read_bytes() == same_size
    finally:
        s3_client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{edited}", Body=s3_dogs[edited])
        s3_client.put_object(Bucket=BUCKET, Key=f"{PREFIX}/{deleted}", Body=s3_dogs[deleted])
