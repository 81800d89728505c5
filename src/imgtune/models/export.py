"""Exporting a model bundle into a self-contained model that serves without imgtune.

One format per export (`FORMATS`); the folder holds the model, its labels and how to feed it:

  OUT/
    model.onnx | model.pt | model.xml + model.bin
    labels.txt          one class name per line, in output order (Triton's label_filename)
    classes.json        index, id and label of each class
    preprocessing.json  resize, crop, mean, std, interpolation, input/output names, shapes and layout
    README.md           how to feed it, in a few lines

or, with `triton=True`, a Triton model repository: OUT/NAME/config.pbtxt, OUT/NAME/1/<model file> and the
other files in OUT/NAME/.

The normalisation is inside every exported graph: the model takes float32 NCHW RGB in [0, 1] (resized and
centre-cropped, divided by 255) and computes (x - mean) / std itself. A client then needs no statistics of the
backbone's pretraining, a Triton client can send plain pixels, and int8 quantizes the [0, 1] input exactly
(1/255 steps) rather than a normalised range.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import torch
from torch import nn
from torchvision.transforms import v2

from imgtune.config import DataConfig
from imgtune.core.errors import ConfigError, DataError, JobError
from imgtune.core.io import atomic_write_json
from imgtune.core.version import __version__
from imgtune.data.dataset import prepare_data
from imgtune.data.folders import ALL, discover
from imgtune.data.transforms import Preprocessing, load_image
from imgtune.models.bundle import JOB_CONFIG_FILE, Bundle, load_bundle

ExportFormat = Literal["onnx", "onnx-int8", "openvino", "torchscript"]
FORMATS: tuple[str, ...] = get_args(ExportFormat)
CALIBRATION_IMAGES = 64  # training photos int8 is calibrated on, spread over the classes
MIN_CALIBRATION_IMAGES = 8
TRITON_MAX_BATCH_SIZE = 64
INPUT_NAME, OUTPUT_NAME = "images", "logits"
# TorchScript has no tensor names; Triton's libtorch backend binds by the `<name>__<index>` convention.
TORCHSCRIPT_NAMES = ("images__0", "logits__0")
MODEL_FILES = {
    "onnx": ("model.onnx",),
    "onnx-int8": ("model.onnx",),
    "openvino": ("model.xml", "model.bin"),
    "torchscript": ("model.pt",),
}
TRITON_PLATFORMS = {  # the config.pbtxt line that picks the runtime
    "onnx": 'platform: "onnxruntime_onnx"',
    "onnx-int8": 'platform: "onnxruntime_onnx"',
    "openvino": 'backend: "openvino"',
    "torchscript": 'platform: "pytorch_libtorch"',
}


class NormalizedClassifier(nn.Module):
    """A classifier with its input normalisation inside: float32 NCHW RGB in [0, 1] in, logits out."""

    def __init__(self, model: nn.Module, mean: tuple[float, ...], std: tuple[float, ...]):
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.model((images - self.mean) / self.std)


@dataclass
class ExportResult:
    """What an export wrote: the folder, the format, the files with their sizes."""

    out: Path
    format: str
    name: str
    triton: bool
    model_dir: Path  # the folder of the model's files (OUT, or OUT/NAME for Triton)
    files: dict[str, int] = field(default_factory=dict)  # path relative to `out` -> bytes
    calibration_images: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "out": str(self.out),
            "format": self.format,
            "name": self.name,
            "triton": self.triton,
            "model_dir": str(self.model_dir),
            "files": self.files,
            "bytes": sum(self.files.values()),
            "calibration_images": self.calibration_images,
        }


def sanitized_name(name: str) -> str:
    """A name Triton accepts as a model (directory) name: letters, digits, `_`, `-`, `.`; not hidden."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("._") or "model"
    return cleaned[:100]


def unnormalized_transform(preprocessing: Preprocessing) -> v2.Compose:
    """The bundle's eval transform without its normalisation: what the exported graph takes."""
    steps = [t for t in preprocessing.eval_transform().transforms if not isinstance(t, v2.Normalize)]
    return v2.Compose(steps)


def _evenly(per_class: list[list[Path]], limit: int) -> list[Path]:
    """Up to `limit` files, every class before any class's second, evenly spaced within each class."""
    classes = [files for files in per_class if files]
    if not classes:
        return []
    take = math.ceil(limit / len(classes))
    picked = [[files[i * len(files) // take] for i in range(min(take, len(files)))] for files in classes]
    return [row[i] for i in range(take) for row in picked if i < len(row)][:limit]


def _spread(per_class: list[list[Path]], limit: int) -> list[Path]:
    """`limit` files spread over the classes, then as many more as spares (for files that do not decode)."""
    chosen = _evenly(per_class, limit)
    taken = set(chosen)
    return chosen + [file for file in _evenly(per_class, 2 * limit) if file not in taken]


def folder_training_photos(folder: str | Path, limit: int = CALIBRATION_IMAGES) -> list[Path]:
    """`limit` photos of a folder's train split (of every photo of a ROOT/CLASS/* folder) spread over the classes,
    then spares."""
    layout = discover(folder)
    per_class = layout.files.get("train") or layout.files.get(ALL) or {}
    return _spread([files for _, files in sorted(per_class.items())], limit)


def job_training_photos(data_config: dict[str, Any], limit: int = CALIBRATION_IMAGES) -> list[Path]:
    """`limit` photos of a job's train split (split as the job split it) spread over the classes, then spares."""
    data = prepare_data(DataConfig.model_validate(data_config), progress=False)
    per_class: dict[int, list[Path]] = {}
    for sample in data.splits.get("train", []):
        per_class.setdefault(sample.label, []).append(Path(sample.path))
    return _spread([per_class[label] for label in sorted(per_class)], limit)


def calibration_batch(
    preprocessing: Preprocessing, photos: list[Path], limit: int = CALIBRATION_IMAGES
) -> torch.Tensor:
    """The exported graph's input ([0, 1], resized and cropped) for up to `limit` of `photos`.

    Raises:
        DataError: fewer than MIN_CALIBRATION_IMAGES of them could be read.
    """
    transform = unnormalized_transform(preprocessing)
    images = []
    for file in photos:
        try:
            images.append(transform(load_image(file)))
        except Exception:  # a bad file is skipped: training skipped it too
            continue
        if len(images) == limit:
            break
    if len(images) < MIN_CALIBRATION_IMAGES:
        raise DataError(
            f"onnx-int8 needs at least {MIN_CALIBRATION_IMAGES} training photos to calibrate on; "
            f"found {len(images)} usable",
            "pass --calibration-data DIR (a folder of the training photos, one folder per class)",
        )
    return torch.stack(images)


def job_data_config(model_dir: Path) -> dict[str, Any] | None:
    """The data section of the config of the bundle's job (its job.json, or the job-config.json beside a bundle
    that left its job)."""
    for config_file, key in ((model_dir.parent / "job.json", "config"), (model_dir / JOB_CONFIG_FILE, None)):
        if config_file.is_file():
            try:
                data = json.loads(config_file.read_text())
            except json.JSONDecodeError:
                continue
            section = ((data.get(key) if key else data) or {}).get("data") or {}
            if section.get("path"):
                return section
    return None


def calibration_photos(
    model_dir: Path, calibration_data: str | Path | None, limit: int = CALIBRATION_IMAGES
) -> Callable[[], list[Path]]:
    """Where int8's calibration photos come from: `calibration_data`, else the job's own training split, if its
    dataset is on this machine. Checked now; the photos are listed when the returned function is called.

    Raises:
        ConfigError: `calibration_data` is not a folder.
        JobError: the job's dataset is unknown or not at hand.
    """
    if calibration_data is not None:
        folder = Path(calibration_data).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"--calibration-data {folder} is not a folder", "pass the folder of the training photos")
        return lambda: folder_training_photos(folder, limit)
    data_config = job_data_config(model_dir)
    if data_config is None:
        raise JobError(
            f"onnx-int8 needs the job's training photos to calibrate on, and {model_dir} does not say where they are",
            "pass --calibration-data DIR (the training photos, one folder per class)",
        )
    path = str(data_config["path"])
    if "://" in path or not Path(path).expanduser().is_dir():
        raise JobError(
            f"onnx-int8 needs the job's training photos to calibrate on; they are not at hand ({path})",
            "copy them here and pass --calibration-data DIR (one folder per class)",
        )
    return lambda: job_training_photos(data_config, limit)


def _export_onnx(module: nn.Module, image_size: int, onnx_file: Path) -> Path:
    """fp32 ONNX with a dynamic batch, its output named OUTPUT_NAME."""
    import onnx

    from imgtune.models.backends.onnx import export_onnx

    export_onnx(module, image_size, onnx_file)
    graph_model = onnx.load(str(onnx_file))
    old = graph_model.graph.output[0].name
    if old != OUTPUT_NAME:  # export_onnx names its output for the endpoint's backend; exports say what it is
        for node in graph_model.graph.node:
            node.output[:] = [OUTPUT_NAME if name == old else name for name in node.output]
        for info in graph_model.graph.value_info:
            if info.name == old:
                info.name = OUTPUT_NAME
        graph_model.graph.output[0].name = OUTPUT_NAME
        onnx.save(graph_model, str(onnx_file))
    return onnx_file


def _export_torchscript(module: nn.Module, image_size: int, path: Path) -> None:
    example = torch.rand(2, 3, image_size, image_size)
    with torch.no_grad(), warnings.catch_warnings():
        # the tracer's notes on Python values, and TorchScript's deprecation: Triton's libtorch backend and
        # C++ clients load TorchScript, not torch.export's programs
        warnings.simplefilter("ignore")
        traced = torch.jit.trace(module, example, check_trace=False)
        torch.jit.save(traced, str(path))


def _export_openvino(fp32_onnx: Path, xml: Path) -> None:
    try:
        import openvino as ov
    except ImportError:
        raise ConfigError("the openvino format needs OpenVINO", "pip install 'openvino>=2024.0'") from None
    ov.save_model(ov.convert_model(str(fp32_onnx)), str(xml), compress_to_fp16=False)


def write_model(
    fmt: str,
    module: nn.Module,
    image_size: int,
    folder: Path,
    calibration: Callable[[], torch.Tensor] | None = None,
) -> list[Path]:
    """Write `module` (a NormalizedClassifier, eval, CPU) in format `fmt` into `folder`; its model files."""
    if fmt == "torchscript":
        _export_torchscript(module, image_size, folder / "model.pt")
    elif fmt == "onnx":
        _export_onnx(module, image_size, folder / "model.onnx")
    else:
        with tempfile.TemporaryDirectory(prefix="imgtune-export-") as scratch:
            fp32 = _export_onnx(module, image_size, Path(scratch) / "fp32.onnx")
            if fmt == "openvino":
                _export_openvino(fp32, folder / "model.xml")
            elif fmt == "onnx-int8":
                from imgtune.models.backends.int8 import quantize_onnx

                assert calibration is not None, "onnx-int8 needs calibration photos"
                quantize_onnx(fp32, calibration(), folder / "model.onnx")
    return [folder / name for name in MODEL_FILES[fmt]]


def preprocessing_spec(fmt: str, preprocessing: Preprocessing, num_classes: int) -> dict[str, Any]:
    """preprocessing.json: everything a client needs to turn a photo into the model's input."""
    input_name, output_name = TORCHSCRIPT_NAMES if fmt == "torchscript" else (INPUT_NAME, OUTPUT_NAME)
    size = preprocessing.image_size
    return {
        "format": fmt,
        "model_file": MODEL_FILES[fmt][0],
        "color": "RGB",
        "resize_size": preprocessing.resize_size,
        "resize": "shorter side to resize_size, longer side int(resize_size * long / short), aspect kept",
        "interpolation": preprocessing.interpolation,
        "antialias": True,
        "crop_size": size,
        "crop": "centre crop of crop_size x crop_size; top = round((height - crop_size) / 2), likewise left",
        "scale": 1 / 255,
        "mean": list(preprocessing.mean),
        "std": list(preprocessing.std),
        "normalization": "in_model",
        "normalization_note": "feed RGB/255 in [0, 1]; the model computes (x - mean) / std itself",
        "input_name": input_name,
        "input_layout": "NCHW",
        "input_dtype": "float32",
        "input_shape": [-1, 3, size, size],
        "output_name": output_name,
        "output_dtype": "float32",
        "output_shape": [-1, num_classes],
        "output": "logits, one per line of labels.txt; softmax gives probabilities",
        "labels_file": "labels.txt",
        "imgtune_version": __version__,
    }


def triton_config(name: str, fmt: str, spec: dict[str, Any], max_batch_size: int = TRITON_MAX_BATCH_SIZE) -> str:
    """config.pbtxt of a Triton model with a dynamic batch dimension (dims leave it out)."""
    size = spec["crop_size"]
    return f"""name: "{name}"
{TRITON_PLATFORMS[fmt]}
max_batch_size: {max_batch_size}
input [
  {{
    name: "{spec["input_name"]}"
    data_type: TYPE_FP32
    dims: [ 3, {size}, {size} ]
  }}
]
output [
  {{
    name: "{spec["output_name"]}"
    data_type: TYPE_FP32
    dims: [ {spec["output_shape"][1]} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{ }}
"""


def readme(name: str, fmt: str, spec: dict[str, Any], triton: bool) -> str:
    size, resize = spec["crop_size"], spec["resize_size"]
    runtime = {
        "onnx": "ONNX Runtime (`onnxruntime.InferenceSession`)",
        "onnx-int8": "ONNX Runtime (`onnxruntime.InferenceSession`); int8 QDQ, best on CPUs with VNNI/AMX",
        "openvino": "OpenVINO (`openvino.Core().compile_model`)",
        "torchscript": "PyTorch (`torch.jit.load`), no imgtune needed",
    }[fmt]
    layout = (
        f"A model of a Triton model repository (`{name}/config.pbtxt`, `{name}/1/{spec['model_file']}`): serve\n"
        f"the folder that holds `{name}/` with `tritonserver --model-repository FOLDER`, send `{spec['input_name']}`\n"
        f"(up to {TRITON_MAX_BATCH_SIZE} images a request) to `/v2/models/{name}/infer`; asking for the output\n"
        "with `classification` gives top-k labels.\n\n"
        if triton
        else ""
    )
    notes = {
        "openvino": "\nOpenVINO computes in bfloat16 on CPUs that have it unless told otherwise: for fp32\n"
        'answers, compile with `{"INFERENCE_PRECISION_HINT": "f32"}`.\n',
        "onnx-int8": "\nQuantized: its answers differ a little from the fp32 model's (a few top-1 answers may\n"
        "change).\n",
    }
    return f"""# {name} ({fmt})

An image classifier exported by imgtune {__version__}, for {runtime}.

{layout}## Input `{spec["input_name"]}`: float32, NCHW, shape [batch, 3, {size}, {size}]

1. Decode the photo to 8-bit RGB.
2. Resize its shorter side to {resize} ({spec["interpolation"]}, antialiased), keeping the aspect ratio.
3. Centre-crop {size} x {size}.
4. Divide by 255 (values in [0, 1]) and put channels first.

Do not subtract the mean or divide by the std: the model does that itself (`preprocessing.json` has the
values). Batch any number of images.
{notes.get(fmt, "")}
## Output `{spec["output_name"]}`: float32, shape [batch, {spec["output_shape"][1]}]

Logits: softmax gives probabilities; index i is line i of `labels.txt` (`classes.json` has ids too).
"""


def _is_export(folder: Path) -> bool:
    return (folder / "preprocessing.json").is_file() or any(folder.glob("*/preprocessing.json"))


def _check_out(out: Path, force: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out {out} is a file", "pass a folder to export into")
    if out.is_dir() and any(out.iterdir()):
        if not force:
            raise ConfigError(f"--out {out} is not empty", "pass an empty or new folder, or --force to replace it")
        if not _is_export(out):  # --force replaces an earlier export, never a folder of something else
            raise ConfigError(
                f"--out {out} holds files that are not an earlier export; --force will not delete them",
                "pass an empty or new folder",
            )


def export_bundle(
    model_dir: str | Path,
    fmt: str,
    out: str | Path,
    *,
    triton: bool = False,
    force: bool = False,
    name: str | None = None,
    calibration_data: str | Path | None = None,
    bundle: Bundle | None = None,
) -> ExportResult:
    """Export the model bundle in `model_dir` as `fmt` (one of FORMATS) into the folder `out`.

    The folder is written beside its destination and moved into place at the end, so a failed export leaves
    nothing behind (and, with `force`, the earlier export where it was). `name`: the model's name (the
    Triton model's), by default the job's. onnx-int8 calibrates on up to CALIBRATION_IMAGES of the job's
    training photos (`calibration_data`: a folder of them, when the job's own are not on this machine).

    Raises:
        ConfigError: an unknown format, or `out` a file, not empty (without `force`) or not an export.
        JobError: no bundle there, or int8 without training photos at hand.
    """
    if fmt not in FORMATS:
        raise ConfigError(f"unknown export format {fmt!r}", f"choose one of {', '.join(FORMATS)}")
    model_dir, out = Path(model_dir), Path(out).expanduser().absolute()
    _check_out(out, force)
    photos = calibration_photos(model_dir, calibration_data) if fmt == "onnx-int8" else None  # before the work
    bundle = bundle or load_bundle(model_dir)
    model_name = sanitized_name(name or bundle.manifest.get("job") or model_dir.parent.name or "model")
    preprocessing = bundle.preprocessing
    module = NormalizedClassifier(bundle.model, preprocessing.mean, preprocessing.std).cpu().eval()
    spec = preprocessing_spec(fmt, preprocessing, len(bundle.classes))

    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed export of this process id
    calibrated: list[int] = []

    def calibrate() -> torch.Tensor:
        assert photos is not None
        batch = calibration_batch(preprocessing, photos())
        calibrated.append(len(batch))
        return batch

    try:
        folder = staging / model_name if triton else staging
        model_folder = folder / "1" if triton else folder
        model_folder.mkdir(parents=True)
        write_model(fmt, module, preprocessing.image_size, model_folder, calibrate if photos else None)
        (folder / "labels.txt").write_text("".join(f"{c.name}\n" for c in bundle.classes))
        classes = [{"index": i, "id": c.id, "label": c.name} for i, c in enumerate(bundle.classes)]
        atomic_write_json(folder / "classes.json", classes)
        atomic_write_json(folder / "preprocessing.json", spec)
        (folder / "README.md").write_text(readme(model_name, fmt, spec, triton))
        if triton:
            (folder / "config.pbtxt").write_text(triton_config(model_name, fmt, spec))
        if out.exists():
            shutil.rmtree(out)  # empty, or an earlier export with --force (checked above)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    files = {str(p.relative_to(out)): p.stat().st_size for p in sorted(out.rglob("*")) if p.is_file()}
    return ExportResult(
        out=out,
        format=fmt,
        name=model_name,
        triton=triton,
        model_dir=out / model_name if triton else out,
        files=files,
        calibration_images=calibrated[0] if calibrated else None,
    )
