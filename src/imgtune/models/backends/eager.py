"""`eager`: the module as it is, fp32, NCHW: the reference every other backend is checked against."""

from __future__ import annotations

from imgtune.models.backends.base import TorchBackend
from imgtune.models.backends.registry import register_backend


@register_backend("eager")
class EagerBackend(TorchBackend):
    pass
