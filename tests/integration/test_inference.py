"""Inference backends (imgtune.models.backends) on a real job: measured, checked against fp32 eager on the
shared photos, remembered, and used by the feature cache, evaluation and the endpoint's Predictor.
(tests/test_backends.py holds the conformance checks every registered backend must pass.)"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch

from imgtune.config import build_config
from imgtune.core.errors import ConfigError
from imgtune.data.transforms import load_image
from imgtune.models.backends import (
    FEATURE_AGREEMENT,
    LOSSY_AGREEMENT,
    EagerBackend,
    agreement,
    auto_candidates,
    bf16_supported,
    choose_backend,
    measure_backends,
)
from imgtune.runs.train import run_training_job
from imgtune.serving.predictor import Predictor
from imgtune.storage.jobs import Job

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def dogs_job(dogs_workspace) -> Path:
    """The session's `dogs` job (frozen MobileNetV2, 3 epochs on dogs-mini; tests/conftest.py)."""
    return dogs_workspace / "dogs"


@pytest.fixture(scope="module")
def all_photos(dogs_mini) -> list[Path]:
    """Every dogs-mini photo (500)."""
    return sorted(Path(dogs_mini).rglob("*.jpg"))


class LayoutBug(torch.nn.Module):
    """The model, but wrong whenever its input is channels-last: how a broken kernel for one memory format
    would look. Its own fp32 eager backend is right, so the check against eager must catch the other one."""

    def __init__(self, inner: torch.nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.inner(x)
        if x.dim() == 4 and x.shape[1] > 1 and x.is_contiguous(memory_format=torch.channels_last):
            return logits.flip(1)
        return logits


def batches(backend, images: torch.Tensor, size: int = 50) -> torch.Tensor:
    return torch.cat([backend(images[i : i + size]) for i in range(0, len(images), size)])


@pytest.mark.slow
def test_the_chosen_backend_agrees_with_fp32_eager_on_every_shared_photo(dogs_job, all_photos, imgtune_cache):
    predictor = Predictor.load(dogs_job)  # auto: measured on this CPU
    choice = predictor.choice
    # measured here, or earlier in this session for a job with the very same weights (training is deterministic)
    assert choice["chosen_by"] in ("measurement", "remembered measurement") and choice["backend"] in auto_candidates()
    names = [t["name"] for t in choice["trials"]]
    assert names == list(auto_candidates())  # every candidate was timed or said why it could not run
    chosen = next(t for t in choice["trials"] if t["name"] == choice["backend"])
    accepted = [t for t in choice["trials"] if t["accepted"]]
    assert chosen["ms_per_image"] == min(t["ms_per_image"] for t in accepted)  # the fastest that agrees
    images = torch.stack([predictor.transform(load_image(p)) for p in all_photos])
    assert len(images) == 500
    reference = batches(EagerBackend(predictor.bundle.model, CPU), images)
    logits = batches(predictor.backend, images)
    measured = agreement(logits, reference)
    if chosen["validation_images"]:  # a quantized backend: taken on its answers (this CPU's int8 was good enough)
        assert chosen["top1_agreement"] >= LOSSY_AGREEMENT["top1_agreement"], chosen
        assert measured["top1_agreement"] >= 0.95, measured  # on all 500, most of them photos it was not checked on
    else:
        assert measured["top1_agreement"] >= 0.995, measured  # the bound, on all 500 shared photos
        assert measured["mean_cosine"] >= FEATURE_AGREEMENT["mean_cosine"], measured
    # the backbone's features too: the backend the feature cache used for this job
    record = Job(dogs_job).read()
    assert record["feature_backend"] in auto_candidates()
    again = Predictor.load(dogs_job)
    assert again.choice["chosen_by"] == "remembered measurement" and again.backend.name == choice["backend"]


@pytest.mark.slow
def test_every_backend_is_timed_and_checked_and_bad_agreement_is_refused(dogs_job, all_photos, tmp_path):
    predictor = Predictor.load(dogs_job, backend="eager")
    model = predictor.bundle.model
    example = torch.stack([predictor.transform(load_image(p)) for p in all_photos[::25]])
    trials, built = measure_backends(model, example, CPU, ("eager", "channels_last", "bf16", "onnx"))
    by_name = {t.name: t for t in trials}
    for name in ("eager", "channels_last", "onnx"):
        assert by_name[name].accepted and by_name[name].ms_per_image > 0 and name in built
        assert by_name[name].mean_cosine > 0.99999  # fp32 everywhere: the same numbers up to summation order
    bf16 = by_name["bf16"]
    if bf16_supported(CPU):
        assert bf16.ms_per_image > 0 and bf16.mean_cosine < 0.99999  # bfloat16 is measurably coarser
        assert bf16.accepted == (
            bf16.mean_cosine >= FEATURE_AGREEMENT["mean_cosine"] and bf16.min_cosine >= FEATURE_AGREEMENT["min_cosine"]
        )
    else:
        assert not bf16.accepted and "no bfloat16 support" in bf16.reason
    # a backend that does not agree with fp32 eager is left out by auto, and refused when named
    broken = LayoutBug(model)
    trials, built = measure_backends(broken, example, CPU, ("channels_last", "onnx"))
    assert not trials[0].accepted and "differ from fp32 eager" in trials[0].reason and trials[1].accepted
    backend, summary = choose_backend(broken, example, CPU, "auto", record_file=tmp_path / "c.json")
    assert backend.name != "channels_last"
    with pytest.raises(ConfigError, match="differ from fp32 eager"):
        choose_backend(broken, example, CPU, "channels_last")
    backend, summary = choose_backend(model, example, CPU, "onnx")
    assert backend.name == "onnx" and summary["chosen_by"] == "configuration" and summary["trials"][0]["accepted"]
    with pytest.raises(ConfigError, match="unknown backend"):
        choose_backend(model, example, CPU, "fp8")


@pytest.mark.slow
def test_the_backend_is_part_of_the_feature_cache_key(dogs_job, dogs_mini, mobilenet_weights, tmp_path):
    base = json.loads((dogs_job / "job.json").read_text())["config"]
    base["model"]["backend"] = "eager"
    base["name"] = "eager-features"
    job = run_training_job(build_config(base), workspace=tmp_path, progress=False)
    record = job.read()
    assert record["feature_backend"] == "eager" and record["timings"]["feature_cache"] > 0
    extraction = record["feature_extraction"]  # computed, not found: a new key for the eager backend
    assert extraction["images"] == 500 and 0 <= extraction["data_wait_fraction"] < 1
    assert extraction["backbone_seconds"] > 0 and extraction["images_per_second"] > 0
    assert record["status"] == "completed"


@pytest.mark.slow
def test_a_quantized_backend_is_judged_by_its_answers_on_the_jobs_validation_photos(dogs_job, dogs_mini, caplog):
    """int8, named: calibrated on the job's training photos, checked on all 100 of its validation photos against
    fp32 eager (top-1 agreement and accuracy, recomputed here), served with a warning when it falls short; and
    auto takes it only when it does not."""
    with caplog.at_level(logging.WARNING, logger="imgtune"):
        int8 = Predictor.load(dogs_job, backend="int8")
    (trial,) = int8.choice["trials"]
    assert trial["name"] == "int8" and trial["validation_images"] == 100  # dogs-mini's whole valid split
    eager = Predictor.load(dogs_job, backend="eager")
    photos = sorted((dogs_mini / "valid").rglob("*.jpg"))
    images = torch.stack([eager.transform(load_image(p)) for p in photos])
    index_of = {c.id: i for i, c in enumerate(eager.bundle.classes)}
    truth = torch.tensor([index_of[p.parent.name] for p in photos])
    quantized, reference = batches(int8.backend, images).argmax(1), batches(eager.backend, images).argmax(1)
    assert trial["top1_agreement"] == pytest.approx((quantized == reference).float().mean().item())
    assert trial["accuracy"] == pytest.approx((quantized == truth).float().mean().item())
    assert trial["reference_accuracy"] == pytest.approx((reference == truth).float().mean().item())
    assert 0.5 < trial["top1_agreement"] <= 1  # a working int8 model, close but measured (not the fp32 copy)
    good_enough = trial["top1_agreement"] >= 0.99 and trial["accuracy"] >= trial["reference_accuracy"] - 0.005
    assert trial["accepted"] == good_enough
    auto = Predictor.load(dogs_job)
    auto_int8 = next(t for t in auto.choice["trials"] if t["name"] == "int8")
    assert auto_int8["validation_images"] == 100
    if not good_enough:  # MobileNetV2's int8 agrees on about 91-96% here: refused by auto, served when named
        assert "backend int8 serves as asked" in caplog.text and "top-1 agreement" in caplog.text
        assert not auto_int8["accepted"] and auto.backend.name != "int8"
