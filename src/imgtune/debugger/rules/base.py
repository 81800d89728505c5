"""The Rule contract, the registry of built-in rules, and loading custom rules from a file.

A rule is a small class: SageMaker's parameter names and defaults in `parameters`, the collections it reads
in `requirements()`, and `invoke_at_step(trial, step)` that returns a Finding (or None) for one step. The
same rule runs online (the RuleRunner calls it as steps are saved) and offline over a stored job.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from imgtune.core.errors import ConfigError
from imgtune.debugger.capture import Requirement
from imgtune.debugger.store import Trial

REGISTRY: dict[str, type[Rule]] = {}


@dataclass
class Finding:
    """One issue a rule found: at which step, in which tensor, why, and the numbers behind it."""

    step: int
    message: str
    tensor: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Rule:
    """Base class of debugger rules. Subclasses set `parameters` and implement `invoke_at_step`.

    Parameters given to the constructor override the defaults; unknown names are refused, and string values
    (from the command line) are converted to the default's type.
    """

    parameters: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register and not inspect.isabstract(cls):
            REGISTRY[cls.__name__] = cls

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            raise ConfigError(
                f"rule {self.name} has no parameter(s) {', '.join(unknown)}",
                f"its parameters: {', '.join(self.parameters) or 'none'}",
            )
        self.params = {
            **self.parameters,
            **{k: _convert(v, self.parameters[k], k, self.name) for k, v in params.items()},
        }

    @property
    def name(self) -> str:
        return type(self).__name__

    def __getattr__(self, item: str) -> Any:
        params = self.__dict__.get("params", {})
        if item in params:
            return params[item]
        raise AttributeError(item)

    def requirements(self) -> list[Requirement]:
        """What must be captured for this rule (the runner asks the capture for it)."""
        return []

    def missing_data(self, trial: Trial) -> str | None:
        """Why the rule could not be evaluated on `trial` (a required collection was never saved), or None."""
        for requirement in self.requirements():
            if not saved(trial, requirement):
                what = requirement.collection + (f" matching {requirement.regex!r}" if requirement.regex else "")
                return f"no {what} tensors were saved, so the rule could not be evaluated"
        return None

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        """Look at the data of global `step` (and earlier steps); return a Finding when the rule fires."""
        raise NotImplementedError

    def finish(self, trial: Trial) -> list[Finding]:
        """Called once when training ends (or at the end of an offline run); for whole-run checks."""
        return []


def saved(trial: Trial, requirement: Requirement) -> bool:
    """Did the job save what `requirement` asks for?"""
    if requirement.collection == "weight_updates":
        return any(
            "update" in record
            for name in trial.tensor_names(collection="weights")
            for records in trial.tensor(name).by_mode.values()
            for record in records.values()
        )
    return bool(trial.tensor_names(collection=requirement.collection, regex=requirement.regex))


def _convert(value: Any, default: Any, key: str, rule: str) -> Any:
    if not isinstance(value, str) or isinstance(default, str):
        return value
    if default is None:  # an optional number or name: a number when it reads as one
        try:
            return float(value)
        except ValueError:
            return value
    try:
        if isinstance(default, bool):
            if value.lower() in ("true", "1", "yes"):
                return True
            if value.lower() in ("false", "0", "no"):
                return False
            raise ValueError(value)
        return type(default)(value)
    except ValueError:
        raise ConfigError(f"rule {rule}: {key}={value!r} is not a {type(default).__name__}") from None


def load_rule_file(path: str | Path) -> list[type[Rule]]:
    """Import a user's Python file and return the Rule subclasses it defines (registered by name)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"rule file not found: {path}")
    module_name = f"imgtune_user_rules_{abs(hash(str(path.resolve())))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        raise ConfigError(f"cannot load rules from {path}: {type(exc).__name__}: {exc}") from None
    found = [
        obj
        for obj in vars(module).values()
        if inspect.isclass(obj) and issubclass(obj, Rule) and obj is not Rule and obj.__module__ == module_name
    ]
    if not found:
        raise ConfigError(f"{path} defines no class deriving from imgtune.debugger.rules.Rule")
    return found


def make_rules(
    names: list[str], parameters: dict[str, dict[str, Any]] | None = None, rule_files: list[str] | None = None
) -> list[Rule]:
    """Instantiate rules by name (built-in or from `rule_files`) with their parameter overrides."""
    import imgtune.debugger.rules.builtin  # noqa: F401  (registers the built-in rules)

    for path in rule_files or []:
        load_rule_file(path)
    parameters = parameters or {}
    rules = []
    for name in names:
        if name not in REGISTRY:
            raise ConfigError(f"unknown rule {name!r}", f"built-in rules: {', '.join(sorted(REGISTRY))}")
        rules.append(REGISTRY[name](**parameters.get(name, {})))
    return rules
