"""Search spaces: which job-config keys a tuning job varies, and how.

A space is a mapping from a config key (as `--set` writes it) to a parameter::

    train.lr:         {type: float, low: 0.001, high: 0.1, scale: log}
    train.batch_size: {type: categorical, values: [16, 32, 64, 128, 256]}
    train.epochs:     {type: int, low: 3, high: 10}
    train.momentum:   {type: float, low: 0.8, high: 0.999, scale: reverse_log}
    model.dropout:    {type: float, low: 0.0, high: 0.5}

Types: ``float`` and ``int`` (scales ``linear``, ``log``, ``reverse_log``: log-spaced towards ``high``, for
values near 1 such as momentum) and ``categorical``. For the grid strategy a numeric parameter takes
``grid_points`` values (default 3) spaced on its scale. The default space is the original project's: learning
rate 0.001-0.1 (log) and batch size {16, 32, 64, 128, 256}; `finetune` (FINETUNE_SPACE) is for an unfrozen
backbone.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from imgtune.config import build_config
from imgtune.core.errors import ConfigError

SCALES = ("linear", "log", "reverse_log")
TYPES = ("float", "int", "categorical")
DEFAULT_SPACE = {
    "train.lr": {"type": "float", "low": 0.001, "high": 0.1, "scale": "log"},
    "train.batch_size": {"type": "categorical", "values": [16, 32, 64, 128, 256]},
}
# `--space finetune`: for an unfrozen backbone (the finetune recipes): the head's rate, the backbone's share of
# it, the warmup, the augmentation's strength and how much of the network trains (and when).
FINETUNE_SPACE = {
    "train.lr": {"type": "float", "low": 0.0003, "high": 0.003, "scale": "log"},
    "train.backbone_lr_ratio": {"type": "float", "low": 0.03, "high": 0.3, "scale": "log"},
    "train.warmup_epochs": {"type": "categorical", "values": [0.0, 0.5, 1.0]},
    "train.augment": {"type": "categorical", "values": ["basic", "trivialaugment", "randaugment"]},
    "model.freeze": {"type": "categorical", "values": ["none", "all_but_last"]},
    "train.head_only_epochs": {"type": "categorical", "values": [0, 1]},
}
NAMED_SPACES = {"default": DEFAULT_SPACE, "finetune": FINETUNE_SPACE}


@dataclass(frozen=True)
class Parameter:
    key: str
    type: str
    low: float | None = None
    high: float | None = None
    scale: str = "linear"
    values: tuple[Any, ...] = field(default_factory=tuple)
    grid_points: int = 3

    def ray_domain(self, grid: bool = False) -> Any:
        """The Ray Tune domain (or grid_search) for this parameter; reverse_log samples 1 - value on a log scale."""
        from ray import tune

        if grid:
            return tune.grid_search(self.grid_values())
        if self.type == "categorical":
            return tune.choice(list(self.values))
        low, high = self._sampled_bounds()
        if self.type == "int" and self.scale == "linear":
            return tune.randint(int(low), int(high) + 1)  # randint's upper bound is exclusive
        if self.scale == "linear":
            return tune.uniform(low, high)
        return tune.loguniform(low, high)

    def _sampled_bounds(self) -> tuple[float, float]:
        assert self.low is not None and self.high is not None
        if self.scale == "reverse_log":
            return 1 - self.high, 1 - self.low
        return self.low, self.high

    def value(self, sampled: Any) -> Any:
        """The config value of a sampled point (undoes reverse_log, rounds ints)."""
        if self.type == "categorical":
            return sampled
        value = 1 - sampled if self.scale == "reverse_log" else sampled
        return int(round(value)) if self.type == "int" else float(value)

    def sample_of(self, value: Any) -> Any:
        """The sampled point of a config value (for warm starts): the inverse of `value`."""
        if self.type == "categorical":
            return value
        return 1 - value if self.scale == "reverse_log" else value

    def grid_values(self) -> list[Any]:
        """Values the grid strategy tries (in the sampled space: reverse_log's are 1 - value)."""
        if self.type == "categorical":
            return list(self.values)
        low, high = self._sampled_bounds()
        n = max(self.grid_points, 1)
        if n == 1:
            points = [low]
        elif self.scale == "linear":
            points = [low + (high - low) * i / (n - 1) for i in range(n)]
        else:
            points = [math.exp(math.log(low) + (math.log(high) - math.log(low)) * i / (n - 1)) for i in range(n)]
        if self.type == "int" and self.scale == "linear":
            return sorted({int(round(p)) for p in points})
        return points


@dataclass
class SearchSpace:
    parameters: list[Parameter]

    @property
    def keys(self) -> list[str]:
        return [p.key for p in self.parameters]

    def ray_space(self, grid: bool = False) -> dict[str, Any]:
        return {p.key: p.ray_domain(grid) for p in self.parameters}

    def values(self, sampled: dict[str, Any]) -> dict[str, Any]:
        """Config values (real types) of a trial's sampled config."""
        by_key = {p.key: p for p in self.parameters}
        return {k: by_key[k].value(v) for k, v in sampled.items() if k in by_key}

    def samples(self, values: dict[str, Any]) -> dict[str, Any]:
        by_key = {p.key: p for p in self.parameters}
        return {k: by_key[k].sample_of(v) for k, v in values.items() if k in by_key}

    def to_dict(self) -> dict[str, dict[str, Any]]:
        out = {}
        for p in self.parameters:
            if p.type == "categorical":
                out[p.key] = {"type": p.type, "values": list(p.values)}
            else:
                out[p.key] = {"type": p.type, "low": p.low, "high": p.high, "scale": p.scale}
                if p.grid_points != 3:
                    out[p.key]["grid_points"] = p.grid_points
        return out

    def check_against(self, base: dict[str, Any]) -> None:
        """Every corner of the space must make a valid job config (a typo'd key or a bad bound fails now)."""
        for p in self.parameters:
            for value in _corners(p):
                raw = copy.deepcopy(base)
                _set(raw, p.key, value)
                build_config(raw, f"job config with the search space's {p.key}={value}")


def _corners(p: Parameter) -> list[Any]:
    if p.type == "categorical":
        return list(p.values)
    return [p.value(x) for x in p._sampled_bounds()]


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    node = raw
    *parents, last = key.split(".")
    for part in parents:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"search space key {key!r}: {part!r} is not a config section")
        node = child
    node[last] = value


def apply_values(base: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """A copy of the raw job config `base` with a trial's values set at their dotted keys."""
    raw = copy.deepcopy(base)
    for key, value in values.items():
        _set(raw, key, value)
    return raw


def parse_space(raw: dict[str, Any]) -> SearchSpace:
    if not isinstance(raw, dict) or not raw:
        raise ConfigError(
            "a search space must map config keys to parameters",
            "e.g. train.lr: {type: float, low: 0.001, high: 0.1, scale: log}",
        )
    parameters = []
    for key, spec in raw.items():
        if not isinstance(spec, dict):
            raise ConfigError(f"search space {key}: expected a mapping, got {spec!r}")
        kind = spec.get("type", "categorical" if "values" in spec else "float")
        unknown = set(spec) - {"type", "low", "high", "scale", "values", "grid_points"}
        if unknown:
            raise ConfigError(f"search space {key}: unknown field(s) {sorted(unknown)}")
        if kind not in TYPES:
            raise ConfigError(f"search space {key}: type must be one of {', '.join(TYPES)}, not {kind!r}")
        if kind == "categorical":
            values = spec.get("values")
            if not isinstance(values, list) or not values:
                raise ConfigError(f"search space {key}: a categorical parameter needs a non-empty list of values")
            parameters.append(Parameter(key, kind, values=tuple(values)))
            continue
        scale = spec.get("scale", "linear")
        if scale not in SCALES:
            raise ConfigError(f"search space {key}: scale must be one of {', '.join(SCALES)}, not {scale!r}")
        try:
            low, high = float(spec["low"]), float(spec["high"])
        except (KeyError, TypeError, ValueError):
            raise ConfigError(f"search space {key}: a {kind} parameter needs numeric low and high") from None
        if not low < high:
            raise ConfigError(f"search space {key}: low ({low:g}) must be below high ({high:g})")
        if scale == "log" and low <= 0:
            raise ConfigError(f"search space {key}: a log scale needs low > 0")
        if scale == "reverse_log" and high >= 1:
            raise ConfigError(f"search space {key}: a reverse_log scale needs high < 1")
        grid_points = int(spec.get("grid_points", 3))
        if grid_points < 1:
            raise ConfigError(f"search space {key}: grid_points must be at least 1")
        parameters.append(Parameter(key, kind, low, high, scale, grid_points=grid_points))
    return SearchSpace(parameters)


def load_space(path: str | Path | None) -> SearchSpace:
    """The space in a YAML file, or a named one (NAMED_SPACES: `default`, `finetune`), or the default one."""
    if path is None:
        return parse_space(DEFAULT_SPACE)
    if str(path) in NAMED_SPACES and not Path(path).is_file():
        return parse_space(NAMED_SPACES[str(path)])
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"search space file not found: {path}")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ConfigError(f"search space file {path} is not valid YAML: {exc}") from None
    return parse_space(raw)
