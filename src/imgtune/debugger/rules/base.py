"""The debugger's part of the Rule contract (imgtune.rules), and loading custom rules from a file.

A debugger rule is an `imgtune.rules.Rule` of kind "debugger": besides its parameters, description and
advice, it names the collections it reads in `requirements()` and implements `invoke_at_step(trial, step)`,
which returns a Finding (or None) for one step. The same rule runs online (the RuleRunner calls it as steps
are saved) and offline over a stored job.
"""

from __future__ import annotations

import importlib.util
import inspect
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import imgtune.rules as contract
from imgtune.core.errors import ConfigError
from imgtune.debugger.capture import Requirement
from imgtune.debugger.store import Trial
from imgtune.rules import Finding

KIND = "debugger"
REGISTRY: Mapping[str, type[Rule]] = contract.rules_of(KIND)  # the debugger rules by name (a live view)

__all__ = ["KIND", "REGISTRY", "Finding", "Rule", "load_rule_file", "make_rules", "saved"]


class Rule(contract.Rule, register=False):
    """Base class of debugger rules. Subclasses set `parameters`, `description`, `advice` and implement
    `invoke_at_step` (and, where needed, `requirements`, `finish`, `missing_data`, the idle watchdog)."""

    kind: ClassVar[str] = KIND

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

    def idle_threshold(self) -> float | None:
        """Seconds without a new step after which the online runner's watchdog calls `on_idle` (None: never).

        A step that never comes (a hung data loader) is invisible to `invoke_at_step`; a rule that wants to
        see it says how long it waits here.
        """
        return None

    def on_idle(self, trial: Trial, seconds: float) -> Finding | None:
        """Called from the watchdog thread, once per pause, when no step came for more than `idle_threshold()`
        seconds (`seconds` so far); return a Finding to report the pause while it lasts."""
        return None


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
    """Instantiate debugger rules by name (built-in or from `rule_files`) with their parameter overrides."""
    load_rule_files(rule_files or [])
    return contract.make_rules(KIND, names, parameters)


def load_rule_files(rule_files: list[str]) -> None:
    """Register the built-in debugger rules and those of `rule_files` (each file is imported: it runs)."""
    import imgtune.debugger.rules.builtin  # noqa: F401  (registers the built-in rules)

    for path in rule_files:
        load_rule_file(path)
