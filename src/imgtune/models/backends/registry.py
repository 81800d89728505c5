"""The registry of backends: names, aliases, which ones `auto` measures, and how one is built."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import overload

import torch
from torch import nn

from imgtune.core.errors import ConfigError
from imgtune.models.backends.base import Backend

AUTO = "auto"  # not a backend: the fastest auto candidate that agrees with fp32 eager, measured here


@dataclass(frozen=True)
class Registration:
    name: str
    backend: type[Backend]
    auto_candidate: bool
    aliases: tuple[str, ...]


_REGISTRY: dict[str, Registration] = {}  # in registration order: the order users see and `auto` measures


def register_backend(
    name: str, *, auto_candidate: bool = False, aliases: tuple[str, ...] = ()
) -> Callable[[type[Backend]], type[Backend]]:
    """Class decorator: register a Backend subclass under `name` (and `aliases`, other names for it).

    `auto_candidate`: `auto` measures it; leave it False for a backend too slow to build to try unasked.
    """

    def register(backend: type[Backend]) -> type[Backend]:
        taken = {AUTO, *_REGISTRY, *backend_aliases()}
        clashes = sorted(taken & {name, *aliases})
        if clashes:
            raise ValueError(f"backend name {clashes[0]!r} is taken")
        if not (isinstance(backend, type) and issubclass(backend, Backend)):
            raise TypeError(f"{backend!r} is not a Backend subclass")
        backend.name = name
        _REGISTRY[name] = Registration(name, backend, auto_candidate, tuple(aliases))
        return backend

    return register


def unregister_backend(name: str) -> None:
    """Take a backend (and its aliases) out of the registry; for tests and plugins that replace one."""
    del _REGISTRY[name]


def backend_names() -> tuple[str, ...]:
    """Every registered backend's name, in registration order (no aliases, no `auto`)."""
    return tuple(_REGISTRY)


def auto_candidates() -> tuple[str, ...]:
    """The backends `auto` measures."""
    return tuple(r.name for r in _REGISTRY.values() if r.auto_candidate)


def backend_aliases() -> dict[str, str]:
    """alias -> backend name."""
    return {alias: r.name for r in _REGISTRY.values() for alias in r.aliases}


def backend_choices() -> tuple[str, ...]:
    """Everything a user may name: `auto`, each backend, then the aliases."""
    return (AUTO, *backend_names(), *backend_aliases())


def resolve_backend_name(choice: str) -> str:
    """`choice` as a backend name (an alias resolved; `auto` stays `auto`); ConfigError when unknown."""
    if choice == AUTO or choice in _REGISTRY:
        return choice
    aliases = backend_aliases()
    if choice in aliases:
        return aliases[choice]
    raise ConfigError(f"unknown backend {choice!r}", f"use one of {', '.join(backend_choices())}")


def backend_class(name: str) -> type[Backend]:
    """The Backend subclass registered under `name` (or an alias)."""
    resolved = resolve_backend_name(name)
    if resolved == AUTO:
        raise ConfigError("auto is not a backend", "name one of the backends")
    return _REGISTRY[resolved].backend


def make_backend(
    name: str,
    module: nn.Module,
    device: torch.device,
    *,
    image_size: int = 224,
    threads: int | None = None,
    fingerprint: str | None = None,
    calibration: torch.Tensor | None = None,
) -> Backend:
    """Build one backend (by name or alias); BackendUnavailable when it cannot run on this device."""
    if resolve_backend_name(name) == AUTO:
        raise ConfigError("auto is not a backend to build", "use choose_backend for auto")
    options = {"image_size": image_size, "threads": threads, "fingerprint": fingerprint, "calibration": calibration}
    return backend_class(name)(module, device, **options)


class LiveNames(Sequence[str]):
    """A read-only view of names in the registry as it is now (a tuple taken at import would miss backends
    registered later): supports `in`, iteration, `len` and `", ".join(...)`."""

    def __init__(self, read: Callable[[], tuple[str, ...]]):
        self._read = read

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> tuple[str, ...]: ...
    def __getitem__(self, index):
        return self._read()[index]

    def __len__(self) -> int:
        return len(self._read())

    def __repr__(self) -> str:
        return repr(self._read())


BACKEND_NAMES: Sequence[str] = LiveNames(backend_names)
BACKEND_CHOICES: Sequence[str] = LiveNames(backend_choices)
