"""`channels_last` (alias `torch`): fp32 with channels-last memory format (oneDNN's preferred layout on CPUs)."""

from __future__ import annotations

from imgtune.models.backends.base import TorchBackend
from imgtune.models.backends.registry import register_backend


@register_backend("channels_last", auto_candidate=True, aliases=("torch",))
class ChannelsLastBackend(TorchBackend):
    channels_last = True
