"""The conformance checks every registered inference backend must pass (imgtune.models.backends), run on each
name in the registry (optuna's shared storage tests are the model): a new backend is covered by registering it.

A tiny convolutional network at 48 px on real photos keeps `compile` affordable on a small CPU. A backend that
cannot run on this machine must say so with BackendUnavailable; only then is it skipped, and the skip says why.
"""

from __future__ import annotations

import typing
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from torch import nn

from imgtune.config import ServeOptions, build_config
from imgtune.config.job import ModelConfig, apply_overrides
from imgtune.core.errors import ConfigError
from imgtune.data.transforms import Preprocessing, load_image
from imgtune.models.backends import (
    AUTO,
    BACKEND_CHOICES,
    FEATURE_AGREEMENT,
    BackendUnavailable,
    EagerBackend,
    agreement,
    auto_candidates,
    backend_names,
    choose_backend,
    make_backend,
    measure_backends,
    register_backend,
    resolve_backend_name,
    unregister_backend,
)

CPU = torch.device("cpu")
SIZE = 48
CLASSES = 10
# quantized backends' outputs on the tiny network: close, not equal (their real check is on labelled photos)
LOSSY_COSINE = {"mean_cosine": 0.95, "min_cosine": 0.8}
BATCH_SIZES = (1, 3, 8)


def tiny_model() -> nn.Module:
    """The same small network (seeded) every call: backends convert the module they are given in place."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 16, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, CLASSES),
    ).eval()


@pytest.fixture(scope="module")
def photos(dogs_mini: Path) -> torch.Tensor:
    """Eight shared photos of different classes, preprocessed as a job at 48 px would."""
    transform = Preprocessing.for_size(SIZE).eval_transform()
    files = sorted(Path(dogs_mini, "train").rglob("*.jpg"))
    return torch.stack([transform(load_image(p)) for p in files[:: len(files) // max(BATCH_SIZES)][: max(BATCH_SIZES)]])


@pytest.fixture(scope="module")
def reference(photos: torch.Tensor) -> torch.Tensor:
    return EagerBackend(tiny_model(), CPU)(photos)


def build_or_skip(name: str, module: nn.Module, **options):
    try:
        return make_backend(name, module, CPU, image_size=SIZE, **options)
    except BackendUnavailable as exc:  # the one reason a backend may not be checked here
        pytest.skip(f"backend {name} is unavailable on this machine (it raised BackendUnavailable: {exc})")


# compile takes tens of seconds to compile on a small CPU: in the full suite, not the fast subset
EVERY_BACKEND = [pytest.param(name, marks=pytest.mark.slow) if name == "compile" else name for name in backend_names()]


@pytest.mark.parametrize("name", EVERY_BACKEND)
def test_backend_agrees_with_fp32_eager_at_every_batch_size(name: str, photos, reference):
    backend = build_or_skip(name, tiny_model(), calibration=photos)  # quantizers calibrate on the photos
    assert backend.name == name
    bound = LOSSY_COSINE if backend.lossy else FEATURE_AGREEMENT
    for size in BATCH_SIZES:
        outputs = backend(photos[:size])
        assert isinstance(outputs, torch.Tensor), type(outputs)
        assert outputs.dtype == torch.float32 and outputs.device.type == "cpu", (outputs.dtype, outputs.device)
        assert tuple(outputs.shape) == (size, CLASSES)
        measured = agreement(outputs, reference[:size])
        assert measured["mean_cosine"] >= bound["mean_cosine"], (size, measured)
        assert measured["min_cosine"] >= bound["min_cosine"], (size, measured)


@pytest.mark.parametrize("name", EVERY_BACKEND)
def test_backend_named_is_checked_and_chosen(name: str, photos, reference, tmp_path):
    build_or_skip(name, tiny_model(), calibration=photos)  # skipped here only for the same reason as above
    labelled = (photos, reference.argmax(1))  # fp32 eager's answers as the labels: a lossy one must match them
    backend, summary = choose_backend(
        tiny_model(), photos, CPU, name, record_file=tmp_path / "choices.json", calibration=photos, validation=labelled
    )
    assert backend.name == name and summary["backend"] == name and summary["chosen_by"] == "configuration"
    (trial,) = summary["trials"]
    assert trial["name"] == name and trial["reason"] is None and trial["accepted"], trial
    assert (trial["validation_images"] == len(photos)) == backend.lossy
    assert not (tmp_path / "choices.json").exists()  # a named backend is checked, not remembered


@pytest.fixture
def noisy() -> Iterator[str]:
    """A deliberately wrong backend, offered to auto: fp32 eager plus noise as large as the outputs."""

    @register_backend("noisy", auto_candidate=True)
    class NoisyBackend(EagerBackend):
        def __call__(self, batch: torch.Tensor) -> torch.Tensor:
            outputs = super().__call__(batch)
            noise = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(0))
            return outputs + noise * outputs.std()

    try:
        yield "noisy"
    finally:
        unregister_backend("noisy")


def test_a_backend_that_disagrees_is_refused_when_named_and_left_out_by_auto(noisy, photos, tmp_path):
    model = tiny_model()
    assert noisy in backend_names() and noisy in auto_candidates() and noisy in BACKEND_CHOICES
    with pytest.raises(ConfigError, match="backend noisy cannot be used here: outputs differ from fp32 eager"):
        choose_backend(model, photos, CPU, noisy)
    backend, summary = choose_backend(model, photos, CPU, AUTO, record_file=tmp_path / "choices.json")
    trials = {t["name"]: t for t in summary["trials"]}
    assert list(trials) == list(auto_candidates())  # it was measured with the others ...
    assert not trials[noisy]["accepted"] and "differ from fp32 eager" in trials[noisy]["reason"]
    assert trials[noisy]["mean_cosine"] < FEATURE_AGREEMENT["mean_cosine"]
    assert summary["chosen_by"] == "measurement" and backend.name != noisy  # ... and left out
    # the only candidate, and still not used: auto falls back to fp32 eager
    backend, summary = choose_backend(model, photos, CPU, AUTO, candidates=(noisy,), record_file=tmp_path / "n.json")
    assert backend.name == "eager" and summary["chosen_by"] == "fallback"


def test_an_unavailable_backend_is_skipped_by_auto_and_refused_when_named(photos, tmp_path):
    @register_backend("nowhere", auto_candidate=True)
    class NowhereBackend(EagerBackend):
        def __init__(self, module, device, **options):
            raise BackendUnavailable("needs hardware this machine lacks")

    try:
        trials, built = measure_backends(tiny_model(), photos, CPU, ("nowhere", "eager"), repeats=1)
        assert [t.accepted for t in trials] == [False, True] and trials[0].reason == "needs hardware this machine lacks"
        assert list(built) == ["eager"]
        with pytest.raises(ConfigError, match="backend nowhere cannot be used here: needs hardware"):
            choose_backend(tiny_model(), photos, CPU, "nowhere")
        _, summary = choose_backend(tiny_model(), photos, CPU, AUTO, record_file=tmp_path / "choices.json")
        assert summary["backend"] != "nowhere"
    finally:
        unregister_backend("nowhere")
    assert "nowhere" not in backend_names()
    with pytest.raises(ConfigError, match="unknown backend 'nowhere'"):
        choose_backend(tiny_model(), photos, CPU, "nowhere")


def test_registry_names_aliases_and_clashes():
    assert backend_names() == ("eager", "channels_last", "bf16", "onnx", "int8", "openvino", "openvino-int8", "compile")
    assert auto_candidates() == ("channels_last", "bf16", "onnx", "int8", "openvino", "openvino-int8")  # not compile
    assert resolve_backend_name("torch") == "channels_last" and resolve_backend_name(AUTO) == AUTO
    assert make_backend("torch", tiny_model(), CPU).name == "channels_last"
    assert list(BACKEND_CHOICES) == [AUTO, *backend_names(), "torch", "onnx-int8"]
    with pytest.raises(ConfigError, match="unknown backend 'fp8'"):
        resolve_backend_name("fp8")
    for taken in ("onnx", "torch", AUTO):
        with pytest.raises(ValueError, match="is taken"):
            register_backend(taken)(EagerBackend)
    assert backend_names() == ("eager", "channels_last", "bf16", "onnx", "int8", "openvino", "openvino-int8", "compile")


# -- the job config's model.backend ----------------------------------------------------------------------------


def test_the_job_configs_backend_choices_are_the_registrys():
    # config may not import models, so it keeps its own Literal: this keeps the two equal
    choices = typing.get_args(ModelConfig.model_fields["backend"].annotation)
    assert sorted(choices) == sorted([AUTO, *backend_names()])
    assert ModelConfig().backend == AUTO
    served = typing.get_args(ServeOptions.model_fields["backend"].annotation)  # the endpoint's take the alias too
    assert sorted(served) == sorted(BACKEND_CHOICES)


def test_model_backend_set_and_an_older_jobs_model_inference_still_loads():
    base = {"data": {"path": "photos"}}
    assert build_config(apply_overrides(dict(base), ["model.backend=onnx"])).model.backend == "onnx"
    older = build_config({**base, "model": {"backbone": "mobilenet_v2", "inference": "eager"}})  # imgtune <= 0.1
    assert older.model.backend == "eager" and "inference" not in older.model_dump()["model"]
    resumed = apply_overrides({**base, "model": {"inference": "eager"}}, ["model.backend=onnx"])
    assert build_config(resumed).model.backend == "onnx"  # the override wins over the old key
    with pytest.raises(ConfigError, match="model.backend"):
        build_config({**base, "model": {"backend": "fp8"}})
