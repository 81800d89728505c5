"""Inference backends and the endpoint on a CUDA GPU, on the session's `dogs` job (MobileNetV2 trained on
dogs-mini; tests/conftest.py) and 96 of dogs-mini's validation photos, run in batches of 16 (one shape, so that
`compile` compiles once).

Each backend's outputs are compared with fp32 eager on the CPU (the true fp32 reference: CUDA's own eager may use
TF32 in its convolutions):
- the fp32 backends (`eager`, `channels_last`, `compile`, `onnx` with ONNX Runtime's CUDA provider) within the
  bound `auto` itself uses, FEATURE_AGREEMENT (cosine per photo), and the same top-1 class on all but one of
  the 96 photos;
- `bf16` within BF16_AGREEMENT, looser by design (8 bits of mantissa): the README says where `auto` takes it.
"""

from __future__ import annotations

import asyncio
import copy
import sys
from pathlib import Path

import pytest
import torch

from imgtune.data.transforms import load_image
from imgtune.models.backends import (
    FEATURE_AGREEMENT,
    BackendUnavailable,
    EagerBackend,
    agreement,
    agrees,
    auto_candidates,
    choose_backend,
    make_backend,
    measure_backends,
)
from imgtune.models.bundle import load_bundle
from imgtune.serving.predictor import Predictor
from servers import running_server

pytestmark = [pytest.mark.gpu]

CPU = torch.device("cpu")
JOB = "dogs"
BF16_AGREEMENT = {"mean_cosine": 0.99, "top1_agreement": 0.95}  # bf16 on a CPU: 0.9975, 0.969
FP32_TOP1 = 0.98  # all but one of 96 photos (a near tie may flip under TF32 convolutions)
TORCH_FP32 = ("eager", "channels_last", "compile")
PHOTOS, CHUNK = 96, 16


@pytest.fixture(scope="module")
def bundle(dogs_workspace: Path):
    return load_bundle(dogs_workspace / JOB / "model")


@pytest.fixture(scope="module")
def photos(bundle, dogs_mini: Path) -> torch.Tensor:
    transform = bundle.preprocessing.eval_transform()
    files = sorted((dogs_mini / "valid").rglob("*.jpg"))[:PHOTOS]
    return torch.stack([transform(load_image(p)) for p in files])


@pytest.fixture(scope="module")
def cpu_reference(bundle, photos) -> torch.Tensor:
    return EagerBackend(copy.deepcopy(bundle.model), CPU)(photos)


def on_cuda(backend) -> bool:
    return next(backend.module.parameters()).device.type == "cuda"


def outputs_of(backend, photos: torch.Tensor) -> torch.Tensor:
    return torch.cat([backend(chunk) for chunk in photos.split(CHUNK)])


@pytest.mark.parametrize("name", TORCH_FP32)
def test_torch_fp32_backends_on_cuda_agree_with_cpu_fp32(cuda, name, bundle, photos, cpu_reference, tmp_path):
    backend, summary = choose_backend(  # checked against eager on the GPU before it is returned (else ConfigError)
        copy.deepcopy(bundle.model), photos[:CHUNK], cuda, name, record_file=tmp_path / "choices.json"
    )
    assert backend.name == name and summary["trials"][0]["accepted"], summary
    assert on_cuda(backend)
    outputs = outputs_of(backend, photos)
    assert outputs.dtype == torch.float32 and outputs.device.type == "cpu"  # the Backend contract, on CUDA too
    measured = agreement(outputs, cpu_reference)
    assert agrees(measured), measured
    assert measured["top1_agreement"] >= FP32_TOP1, measured


def test_bf16_on_cuda_agrees_within_its_bound(cuda, bundle, photos, cpu_reference):
    backend = make_backend("bf16", copy.deepcopy(bundle.model), cuda)  # an H100/H200 has bf16: never unavailable
    assert on_cuda(backend)
    measured = agreement(outputs_of(backend, photos), cpu_reference)
    assert measured["mean_cosine"] >= BF16_AGREEMENT["mean_cosine"], measured
    assert measured["top1_agreement"] >= BF16_AGREEMENT["top1_agreement"], measured


def test_onnx_runtime_uses_its_cuda_provider_where_installed(cuda, bundle, photos, cpu_reference):
    import onnxruntime as ort

    size = bundle.preprocessing.image_size
    if "CUDAExecutionProvider" not in ort.get_available_providers():  # the plain onnxruntime wheel: CPU only
        with pytest.raises(BackendUnavailable, match="CUDA provider"):
            make_backend("onnx", copy.deepcopy(bundle.model), cuda, image_size=size)
        return
    backend = make_backend("onnx", copy.deepcopy(bundle.model), cuda, image_size=size)
    assert backend.session.get_providers()[0] == "CUDAExecutionProvider"  # not a silent fallback to the CPU
    measured = agreement(outputs_of(backend, photos), cpu_reference)
    assert agrees(measured) and measured["top1_agreement"] >= FP32_TOP1, measured


def test_auto_measures_the_cuda_backends_and_keeps_one_that_agrees(cuda, bundle, photos, tmp_path):
    backend, summary = choose_backend(
        copy.deepcopy(bundle.model), photos[:CHUNK], cuda, "auto", record_file=tmp_path / "choices.json"
    )
    assert summary["chosen_by"] == "measurement" and backend.name in auto_candidates()
    trials = {t["name"]: t for t in summary["trials"]}
    assert trials[backend.name]["accepted"]
    assert all(t["accepted"] or t["reason"] for t in trials.values()), trials  # each refusal says why
    assert "CPU" in trials["openvino"]["reason"]  # OpenVINO runs on CPUs only: refused on CUDA, not run on the CPU
    assert backend.device.type == "cuda"
    trials_again, _ = measure_backends(copy.deepcopy(bundle.model), photos[:CHUNK], cuda, (backend.name,), repeats=1)
    assert trials_again[0].accepted and trials_again[0].mean_cosine >= FEATURE_AGREEMENT["mean_cosine"]


# -- the endpoint on CUDA -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpu_endpoint(cuda, dogs_workspace: Path, tmp_path_factory) -> str:
    log = tmp_path_factory.mktemp("deploy-cuda") / "server.log"
    command = lambda port: [  # noqa: E731
        sys.executable, "-m", "imgtune", "deploy", JOB, "--workspace", str(dogs_workspace), "--port", str(port),
        "--device", "cuda", "--backend", "torch",
    ]  # fmt: skip
    with running_server(command, "/ping", log, ready_status=200) as url:
        yield url


@pytest.fixture(scope="module")
def one_photo_per_class(dogs_mini: Path) -> list[Path]:
    return [sorted(c.iterdir())[0] for c in sorted(p for p in (dogs_mini / "test").iterdir() if p.is_dir())]


def test_the_endpoint_answers_on_cuda_as_the_cpu_model_does(gpu_endpoint, dogs_workspace, one_photo_per_class):
    import httpx

    ready = httpx.get(f"{gpu_endpoint}/health/ready", timeout=30).json()
    assert ready["model"]["device"].startswith("cuda") and ready["model"]["backend"] == "channels_last", ready
    cpu = Predictor.load(JOB, "eager", workspace=dogs_workspace)  # fp32 eager on the CPU, in this process
    for photo in one_photo_per_class:
        response = httpx.post(
            f"{gpu_endpoint}/invocations?top_k=3", content=photo.read_bytes(), headers={"Content-Type": "image/jpeg"}
        )
        assert response.status_code == 200, response.text
        (served,) = response.json()["predictions"]
        (expected,) = cpu.predict([load_image(photo)], 3)
        assert served["classes"][0]["id"] == expected[0]["id"], (photo, served, expected)
        assert served["classes"][0]["probability"] == pytest.approx(expected[0]["probability"], abs=0.01)


def test_the_endpoint_on_cuda_batches_32_concurrent_requests(gpu_endpoint, one_photo_per_class):
    import httpx

    bodies = [p.read_bytes() for p in one_photo_per_class]

    async def send() -> list[httpx.Response]:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=32)) as client:
            limit = asyncio.Semaphore(32)

            async def one(i: int) -> httpx.Response:
                async with limit:
                    body = bodies[i % len(bodies)]
                    return await client.post(
                        f"{gpu_endpoint}/invocations", content=body, headers={"Content-Type": "image/jpeg"}
                    )

            return await asyncio.gather(*(one(i) for i in range(128)))

    responses = asyncio.run(send())
    assert [r.status_code for r in responses] == [200] * 128
    first = {}
    for i, response in enumerate(responses):  # the same photo gets the same answer whatever batch it was in
        top = response.json()["predictions"][0]["classes"][0]["id"]
        assert first.setdefault(i % len(bodies), top) == top
    metrics = httpx.get(f"{gpu_endpoint}/metrics", timeout=30).text
    values = {
        line.split()[0]: float(line.split()[1])
        for line in metrics.splitlines()
        if line.startswith(("imgtune_batch_size_sum", "imgtune_batch_size_count"))
    }
    assert values["imgtune_batch_size_sum"] / values["imgtune_batch_size_count"] > 1.5  # requests shared passes
