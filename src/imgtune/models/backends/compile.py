"""`compile`: torch.compile of the channels-last module. Compiling takes tens of seconds on a small CPU, so
`auto` leaves it out: it runs only when named."""

from __future__ import annotations

from imgtune.models.backends.base import TorchBackend
from imgtune.models.backends.registry import register_backend


@register_backend("compile")
class CompileBackend(TorchBackend):
    channels_last = True
    compiled = True
