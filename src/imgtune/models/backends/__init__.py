"""Inference backends for a frozen backbone or a whole classifier, chosen by measurement on this device.

A backend takes a float32 NCHW batch and returns float32 outputs on the CPU. The built-in ones, one module
each, registered in this order:

- `eager`: the module as it is, fp32, NCHW: the reference every other backend is checked against;
- `channels_last` (alias `torch`): fp32 with channels-last memory format (oneDNN's preferred layout on CPUs);
- `bf16`: channels-last under bfloat16 autocast, where the CPU (AVX512-BF16/AMX) or GPU supports it;
- `onnx`: ONNX Runtime on an export of the module, kept in the cache;
- `int8` (alias `onnx-int8`): ONNX Runtime on a static QDQ int8 quantization of that export, calibrated on
  real photos (lossy: checked on labelled photos, see below);
- `openvino`, `openvino-int8`: OpenVINO on the fp32 export and on the int8 model;
- `compile`: torch.compile of the channels-last module (only when named: compiling is slow on a small CPU).

`choose_backend` builds the one a user names, or for `auto` times each auto candidate on an example batch of
real inputs, keeps those whose outputs agree with fp32 eager within FEATURE_AGREEMENT (cosine similarity per
sample) or, for lossy backends, within LOSSY_AGREEMENT on labelled validation photos (top-1 agreement and
accuracy), takes the fastest and remembers it in the cache.

Adding a backend: a module here with a `Backend` subclass decorated with `@register_backend("name", ...)`,
imported below; tests/test_backends.py runs the conformance checks on every registered backend.
"""

from __future__ import annotations

from imgtune.models.backends.base import (
    Backend,
    BackendUnavailable,
    TorchBackend,
    architecture_signature,
    device_description,
    weights_fingerprint,
)
from imgtune.models.backends.registry import (
    AUTO,
    BACKEND_CHOICES,
    BACKEND_NAMES,
    auto_candidates,
    backend_aliases,
    backend_choices,
    backend_class,
    backend_names,
    make_backend,
    register_backend,
    resolve_backend_name,
    unregister_backend,
)

# isort: off
# The built-in backends register themselves on import; this order is the registry's (the order users see).
from imgtune.models.backends.eager import EagerBackend
from imgtune.models.backends.channels_last import ChannelsLastBackend
from imgtune.models.backends.bf16 import Bf16Backend, bf16_supported
from imgtune.models.backends.onnx import OnnxBackend, export_onnx, exported_onnx
from imgtune.models.backends.int8 import Int8Backend, quantize_onnx
from imgtune.models.backends.openvino import OpenVinoBackend, OpenVinoInt8Backend
from imgtune.models.backends.compile import CompileBackend

# isort: on
from imgtune.models.backends.choose import (
    FEATURE_AGREEMENT,
    LOSSY_AGREEMENT,
    BackendTrial,
    agreement,
    agrees,
    answers_agree,
    answers_agreement,
    choice_key,
    choose_backend,
    default_record_file,
    known_backend_name,
    measure_backends,
    remembered_backend,
)

__all__ = [
    "AUTO",
    "BACKEND_CHOICES",
    "BACKEND_NAMES",
    "FEATURE_AGREEMENT",
    "LOSSY_AGREEMENT",
    "Backend",
    "BackendTrial",
    "BackendUnavailable",
    "Bf16Backend",
    "Int8Backend",
    "OpenVinoBackend",
    "OpenVinoInt8Backend",
    "ChannelsLastBackend",
    "CompileBackend",
    "EagerBackend",
    "OnnxBackend",
    "TorchBackend",
    "agreement",
    "agrees",
    "answers_agree",
    "answers_agreement",
    "architecture_signature",
    "auto_candidates",
    "backend_aliases",
    "backend_class",
    "backend_choices",
    "backend_names",
    "bf16_supported",
    "choice_key",
    "choose_backend",
    "default_record_file",
    "device_description",
    "export_onnx",
    "exported_onnx",
    "quantize_onnx",
    "known_backend_name",
    "make_backend",
    "measure_backends",
    "register_backend",
    "remembered_backend",
    "resolve_backend_name",
    "unregister_backend",
    "weights_fingerprint",
]
