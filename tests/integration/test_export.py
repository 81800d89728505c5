"""`imgtune export`: a job's model as ONNX, int8 ONNX, OpenVINO IR and TorchScript, plain or as a Triton model
repository, each loaded by its own runtime and fed photos preprocessed from its preprocessing.json alone (PIL and
numpy here, not imgtune's transforms), answering as the job's Predictor does."""

from __future__ import annotations

import json
import re
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from imgtune.cli import app
from imgtune.serving.predictor import Predictor

pytestmark = [pytest.mark.slow]

runner = CliRunner()
JOB = "dogs"
FP32_FORMATS = ("onnx", "torchscript", "openvino")
MODEL_FILES = {"onnx": ["model.onnx"], "onnx-int8": ["model.onnx"], "torchscript": ["model.pt"],
               "openvino": ["model.xml", "model.bin"]}  # fmt: skip
TRITON_RUNTIMES = {"onnx": ("platform", "onnxruntime_onnx"), "torchscript": ("platform", "pytorch_libtorch"),
                   "openvino": ("backend", "openvino")}  # fmt: skip


@pytest.fixture(scope="module")
def workspace(dogs_workspace) -> Path:
    """The session's workspace holding `dogs` (frozen MobileNetV2, 3 epochs on dogs-mini; tests/conftest.py)."""
    return dogs_workspace


@pytest.fixture(scope="module")
def reference(workspace) -> Predictor:
    """The job's model as imgtune serves it, in fp32 eager (the reference every backend is checked against)."""
    return Predictor.load(JOB, backend="eager", workspace=workspace)


@pytest.fixture(scope="module")
def photos(dogs_mini) -> list[Path]:
    """20 test photos: two from each of the 10 classes."""
    classes = sorted(p for p in (dogs_mini / "test").iterdir() if p.is_dir())
    return [photo for c in classes for photo in sorted(c.iterdir())[:2]]


@pytest.fixture(scope="module")
def split_photos(dogs_mini) -> list[Path]:
    """The whole test split (100 photos)."""
    return sorted(p for p in (dogs_mini / "test").rglob("*") if p.is_file())


def export(workspace: Path, out: Path, *options: str) -> Any:
    return runner.invoke(app, ["export", JOB, "--out", str(out), "--workspace", str(workspace), *options])


@pytest.fixture(scope="module")
def exported(workspace, tmp_path_factory):
    """An export of the job per (format, triton), made once through the CLI."""
    made: dict[tuple[str, bool], Path] = {}

    def make(fmt: str, triton: bool = False) -> Path:
        if (fmt, triton) not in made:
            out = tmp_path_factory.mktemp("exports") / f"{fmt}{'-triton' if triton else ''}"
            result = export(workspace, out, "--format", fmt, *(["--triton"] if triton else []))
            assert result.exit_code == 0, result.output
            assert "exported as" in result.output and "total" in result.output  # the Rich summary
            made[(fmt, triton)] = out
        return made[(fmt, triton)]

    return make


# -- a client that knows nothing of imgtune ---------------------------------------------------------------


def preprocess(path: Path, spec: dict[str, Any]) -> np.ndarray:
    """One photo as the model's input, from preprocessing.json only: CHW float32."""
    assert spec["normalization"] == "in_model" and spec["input_layout"] == "NCHW" and spec["color"] == "RGB"
    with Image.open(path) as image:
        image = image.convert("RGB")
    width, height = image.size
    short, long = sorted(image.size)
    resized_short, resized_long = spec["resize_size"], int(spec["resize_size"] * long / short)
    size = (resized_short, resized_long) if width <= height else (resized_long, resized_short)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC, "nearest": Image.NEAREST}[spec["interpolation"]]
    image = image.resize(size, resample)
    crop = spec["crop_size"]
    top, left = round((image.height - crop) / 2), round((image.width - crop) / 2)
    image = image.crop((left, top, left + crop, top + crop))
    pixels = np.asarray(image, dtype=np.float32) * np.float32(spec["scale"])
    return np.ascontiguousarray(pixels.transpose(2, 0, 1), dtype=np.dtype(spec["input_dtype"]))


def run_model(model_dir: Path, batch: np.ndarray) -> np.ndarray:
    """Logits from the exported model, on its own runtime."""
    spec = json.loads((model_dir / "preprocessing.json").read_text())
    model_file = next(model_dir.glob(f"**/{spec['model_file']}"))
    if spec["format"] in ("onnx", "onnx-int8"):
        import onnxruntime as ort

        session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
        assert [i.name for i in session.get_inputs()] == [spec["input_name"]]
        return session.run([spec["output_name"]], {spec["input_name"]: batch})[0]
    if spec["format"] == "torchscript":
        import torch

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated": Triton loads it
            module = torch.jit.load(str(model_file))
        with torch.no_grad():
            return module(torch.from_numpy(batch)).numpy()
    import openvino as ov

    compiled = ov.Core().compile_model(str(model_file), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled({spec["input_name"]: batch})[spec["output_name"]]


def softmax(logits: np.ndarray) -> np.ndarray:
    shifted = np.exp(logits - logits.max(axis=1, keepdims=True))
    return shifted / shifted.sum(axis=1, keepdims=True)


def answers(model_dir: Path, photos: list[Path]) -> tuple[list[str], np.ndarray]:
    """Top-1 labels (read from labels.txt) and probabilities of the exported model for `photos`."""
    spec = json.loads((model_dir / "preprocessing.json").read_text())
    labels = (model_dir / spec["labels_file"]).read_text().splitlines()
    batch = np.stack([preprocess(photo, spec) for photo in photos])
    logits = run_model(model_dir, batch)
    assert logits.shape == (len(photos), len(labels))
    # one image at a time too: the batch dimension is dynamic
    assert np.allclose(run_model(model_dir, batch[:1]), logits[:1], atol=1e-4)
    return [labels[i] for i in logits.argmax(axis=1)], softmax(logits.astype(np.float64))


def reference_answers(reference: Predictor, photos: list[Path]) -> tuple[list[str], np.ndarray]:
    images = [Image.open(photo) for photo in photos]
    predictions = reference.predict(images, k=len(reference.labels))
    probabilities = np.zeros((len(photos), len(reference.labels)))
    for row, classes in enumerate(predictions):
        for c in classes:
            probabilities[row, c["index"]] = c["probability"]
    return [classes[0]["label"] for classes in predictions], probabilities


# -- the formats ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("fmt", FP32_FORMATS)
def test_fp32_export_answers_as_the_predictor(fmt, exported, reference, photos):
    out = exported(fmt)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["README.md", "classes.json", "labels.txt", "preprocessing.json", *MODEL_FILES[fmt]]
    )
    labels, probabilities = answers(out, photos)
    expected_labels, expected = reference_answers(reference, photos)
    assert labels == expected_labels
    assert np.abs(probabilities - expected).max() < 1e-3


def test_int8_export_mostly_agrees(exported, reference, split_photos):
    # On the whole test split: int8 changes ~5% of this small model's top-1 answers (its median top
    # probability is ~0.6), so 20 photos would make the 90% bar a coin toss.
    out = exported("onnx-int8")
    labels, _ = answers(out, split_photos)
    expected_labels, _ = reference_answers(reference, split_photos)
    agreement = np.mean([a == b for a, b in zip(labels, expected_labels, strict=True)])
    assert agreement >= 0.9, f"int8 agrees with fp32 on {agreement:.0%} of {len(split_photos)} photos"
    fp32_size = (exported("onnx") / "model.onnx").stat().st_size
    assert (out / "model.onnx").stat().st_size < fp32_size / 2  # int8 weights


def test_labels_classes_and_preprocessing_files(exported, reference):
    out = exported("onnx")
    labels = (out / "labels.txt").read_text().splitlines()
    assert labels == [name for _, name in reference.labels]
    classes = json.loads((out / "classes.json").read_text())
    assert classes == [{"index": i, "id": cid, "label": name} for i, (cid, name) in enumerate(reference.labels)]
    spec = json.loads((out / "preprocessing.json").read_text())
    prep = reference.bundle.preprocessing
    assert (spec["resize_size"], spec["crop_size"], spec["interpolation"]) == (
        prep.resize_size, prep.image_size, prep.interpolation,
    )  # fmt: skip
    assert spec["mean"] == list(prep.mean) and spec["std"] == list(prep.std)
    assert spec["input_shape"] == [-1, 3, prep.image_size, prep.image_size]
    assert spec["output_shape"] == [-1, len(labels)]
    readme = (out / "README.md").read_text()
    assert "Centre-crop" in readme and spec["input_name"] in readme


# -- Triton ---------------------------------------------------------------------------------------------


def parse_pbtxt(text: str) -> dict[str, Any]:
    """Protobuf text format, enough of it for a model config: fields, messages, lists; a repeated field is a
    list."""
    tokens = re.findall(r'"(?:[^"\\]|\\.)*"|[{}\[\]:,]|[^\s{}\[\]:,"]+', re.sub(r"#.*", "", text))
    position = 0

    def value() -> Any:
        nonlocal position
        token = tokens[position]
        position += 1
        if token == "{":
            return message("}")
        if token == "[":
            items = []
            while tokens[position] != "]":
                items.append(value())
                position += tokens[position] == ","
            position += 1
            return items
        if token.startswith('"'):
            return json.loads(token)
        return int(token) if re.fullmatch(r"-?\d+", token) else token

    def message(end: str | None) -> dict[str, Any]:
        nonlocal position
        fields: dict[str, Any] = {}
        while position < len(tokens) and tokens[position] != end:
            key = tokens[position]
            position += 1
            position += tokens[position] == ":"
            fields.setdefault(key, []).append(value())
        position += 1
        return {k: v[0] if len(v) == 1 else v for k, v in fields.items()}

    return message(None)


@pytest.mark.parametrize("fmt", FP32_FORMATS)
def test_triton_layout(fmt, exported, reference, photos):
    out = exported(fmt, triton=True)
    assert [p.name for p in out.iterdir()] == [JOB]
    model = out / JOB
    config = parse_pbtxt((model / "config.pbtxt").read_text())
    spec = json.loads((model / "preprocessing.json").read_text())
    key, runtime = TRITON_RUNTIMES[fmt]
    assert config["name"] == JOB and config[key] == runtime
    assert config["max_batch_size"] == 64 and config["dynamic_batching"] == {}
    size = reference.image_size
    assert config["input"] == [{"name": spec["input_name"], "data_type": "TYPE_FP32", "dims": [3, size, size]}]
    assert config["output"] == [
        {"name": spec["output_name"], "data_type": "TYPE_FP32", "dims": [len(reference.labels)],
         "label_filename": "labels.txt"}
    ]  # fmt: skip
    assert sorted(p.name for p in (model / "1").iterdir()) == sorted(MODEL_FILES[fmt])
    assert (model / "labels.txt").read_text().splitlines() == [name for _, name in reference.labels]
    if fmt == "torchscript":  # Triton's libtorch backend binds outputs by the <name>__<index> convention
        assert re.fullmatch(r".+__0", spec["output_name"]) and re.fullmatch(r".+__0", spec["input_name"])
    labels, _ = answers(model, photos[:4])  # the model in 1/ is the model
    assert labels == reference_answers(reference, photos[:4])[0]


# -- what goes wrong ------------------------------------------------------------------------------------


def test_unknown_job_and_unknown_format(workspace, tmp_path):
    result = runner.invoke(app, ["export", "nope", "--format", "onnx", "--out", str(tmp_path / "x"),
                                 "--workspace", str(workspace)])  # fmt: skip
    assert result.exit_code == 2 and "error:" in result.output and "nope" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "x").exists()
    result = export(workspace, tmp_path / "y", "--format", "tflite")
    assert result.exit_code == 2 and "tflite" in result.output and not (tmp_path / "y").exists()


def test_out_not_empty_needs_force(exported, workspace, tmp_path):
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    result = export(workspace, mine, "--format", "torchscript")
    assert result.exit_code == 2 and "not empty" in result.output and "--force" in result.output
    result = export(workspace, mine, "--format", "torchscript", "--force")  # not an export: never deleted
    assert result.exit_code == 2 and (mine / "notes.txt").read_text() == "keep me"
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]  # and nothing left beside it either
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]

    earlier = tmp_path / "earlier"
    shutil.copytree(exported("onnx"), earlier)
    result = export(workspace, earlier, "--format", "torchscript", "--force")
    assert result.exit_code == 0, result.output
    assert "model.pt" in {p.name for p in earlier.iterdir()} and not (earlier / "model.onnx").exists()


def test_job_without_model_or_without_its_photos(workspace, dogs_mini, tmp_path):
    other = tmp_path / "workspace"
    shutil.copytree(workspace / JOB, other / "unfinished", ignore=shutil.ignore_patterns("model"))
    result = runner.invoke(app, ["export", "unfinished", "--format", "onnx", "--out", str(tmp_path / "a"),
                                 "--workspace", str(other)])  # fmt: skip
    assert result.exit_code == 2 and "has no model" in result.output

    moved = other / "moved"
    shutil.copytree(workspace / JOB, moved)
    record = json.loads((moved / "job.json").read_text())
    record["config"]["data"]["path"] = str(tmp_path / "gone")  # the data stayed on the machine that trained
    (moved / "job.json").write_text(json.dumps(record))
    result = runner.invoke(app, ["export", "moved", "--format", "onnx-int8", "--out", str(tmp_path / "b"),
                                 "--workspace", str(other)])  # fmt: skip
    assert result.exit_code == 2 and "training photos" in result.output and "--calibration-data" in result.output
    assert not (tmp_path / "b").exists()
    moved_export = ["export", "moved", "--format", "onnx-int8", "--workspace", str(other), "--calibration-data"]
    result = runner.invoke(app, [*moved_export, str(tmp_path / "nothing"), "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "is not a folder" in result.output and not (tmp_path / "b").exists()
    # a copy of the photos, named: its train split, spread over the classes
    result = runner.invoke(app, [*moved_export, str(dogs_mini), "--out", str(tmp_path / "b"), "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["calibration_images"] == 64 and summary["format"] == "onnx-int8"
    assert (tmp_path / "b" / "model.onnx").stat().st_size == summary["files"]["model.onnx"]


def test_the_cli_offers_every_format():
    from typing import get_args

    from imgtune.cli.serve import ExportFormat
    from imgtune.models.export import FORMATS

    assert get_args(ExportFormat) == FORMATS
    result = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    assert result.exit_code == 0 and all(fmt in result.output for fmt in FORMATS) and "--triton" in result.output
