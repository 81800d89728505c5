"""The one Rule contract shared by the debugger's and the profiler's rules.

A rule is a small class: SageMaker's parameter names and defaults in `parameters`, a one-line `description`,
the `advice` to follow when it fires, and its `kind` ("debugger" or "profiler"). Defining a concrete subclass
registers it under (kind, class name); `make_rules(kind, names, parameters)` builds rules by name. How a rule
is run (per step, over a whole job) belongs to its kind's base class; what it ends with is a RuleResult, whose
`status` is one of the Status words.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any, ClassVar

from imgtune.core.errors import ConfigError


class Status(StrEnum):
    """A rule's status, as written to rules.json and job.json (the words of SageMaker)."""

    IN_PROGRESS = "InProgress"
    ISSUES = "IssuesFound"
    NO_ISSUES = "NoIssuesFound"
    NOT_APPLICABLE = "NotApplicable"
    INSUFFICIENT = "InsufficientData"
    ERROR = "Error"


@dataclass
class Finding:
    """One issue a rule found: at which step, in which tensor, why, and the numbers behind it."""

    step: int
    message: str
    tensor: str | None = None
    evidence: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Keys of a RuleResult that belong to one kind (or to a failure): left out of `to_dict()` while unset (None),
# so each kind's rules.json keeps the keys its readers know and none that are always empty.
_OPTIONAL_KEYS = ("findings", "finding_count", "datapoints", "triggers", "recommendation", "details", "traceback")


@dataclass
class RuleResult:
    """What one rule concluded about one job: an entry of rules.json.

    Both kinds have `rule`, `status`, `message` (one line: what it found, or why it could not tell),
    `parameters` and `error` (why the rule itself failed, else None). Debugger rules add their `findings` (the
    first ones) and `finding_count`; profiler rules add `datapoints` (how many they read), `triggers` (how
    many fired), `recommendation` (the rule's advice, when it fired) and `details` (the numbers behind it).
    """

    rule: str
    status: Status
    message: str = ""
    datapoints: int | None = None
    triggers: int | None = None
    recommendation: str | None = None
    details: dict[str, Any] | None = None
    findings: list[Finding] | None = None
    finding_count: int | None = None
    parameters: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    traceback: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The entry of rules.json (shallow: it shares `parameters` and `details` with the result)."""
        data = {f.name: getattr(self, f.name) for f in fields(self)}
        data["status"] = str(self.status)
        if self.findings is not None:
            data["findings"] = [finding.to_dict() for finding in self.findings]
        return {k: v for k, v in data.items() if v is not None or k not in _OPTIONAL_KEYS}


REGISTRY: dict[tuple[str, str], type[Rule]] = {}
"""Every registered rule class, keyed by (kind, class name); filled when a rule's module is imported."""


class Rule:
    """Base of every rule. A kind's base class sets `kind` (and opts out of the registry with
    `register=False`); each rule sets `parameters`, `description` and `advice`.

    Parameters given to the constructor override the defaults and read as attributes (`self.threshold`);
    unknown names are refused, and string values (from the command line) are converted to the default's
    type.
    """

    kind: ClassVar[str] = ""
    parameters: ClassVar[dict[str, Any]] = {}
    description: ClassVar[str] = ""
    advice: ClassVar[str] = ""

    def __init_subclass__(cls, register: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if register and cls.kind and not inspect.isabstract(cls):
            REGISTRY[(cls.kind, cls.__name__)] = cls

    def __init__(self, **params: Any):
        unknown = sorted(set(params) - set(self.parameters))
        if unknown:
            raise ConfigError(
                f"rule {self.name} has no parameter(s) {', '.join(unknown)}",
                f"its parameters: {', '.join(self.parameters) or 'none'}",
            )
        self.params = {
            **self.parameters,
            **{k: convert_parameter(v, self.parameters[k], k, self.name) for k, v in params.items()},
        }

    @property
    def name(self) -> str:
        return type(self).__name__

    def __getattr__(self, item: str) -> Any:
        params = self.__dict__.get("params", {})
        if item in params:
            return params[item]
        raise AttributeError(item)


def convert_parameter(value: Any, default: Any, key: str, rule: str) -> Any:
    """`value` as the type of `default` when it is a string (from the command line); other values as given."""
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


class _KindView(Mapping[str, type[Rule]]):
    """The registered rules of one kind, by name, in registration order (a live view of REGISTRY)."""

    def __init__(self, kind: str):
        self.kind = kind

    def __getitem__(self, name: str) -> type[Rule]:
        return REGISTRY[(self.kind, name)]

    def __iter__(self) -> Iterator[str]:
        return iter([name for kind, name in REGISTRY if kind == self.kind])

    def __len__(self) -> int:
        return sum(kind == self.kind for kind, _ in REGISTRY)

    def __repr__(self) -> str:
        return f"rules_of({self.kind!r}): {list(self)}"


def rules_of(kind: str) -> Mapping[str, type[Rule]]:
    """The registered rule classes of `kind` by name (a live, read-only view)."""
    return _KindView(kind)


def _noun(kind: str) -> str:
    # SageMaker calls the debugger's rules plain "rules" and the profiler's "profiler rules".
    return "rule" if kind == "debugger" else f"{kind} rule"


def make_rules(kind: str, names: list[str], parameters: dict[str, dict[str, Any]] | None = None) -> list[Rule]:
    """Instantiate registered rules of `kind` by name, with their parameter overrides (name -> {key: value})."""
    parameters = parameters or {}
    known = rules_of(kind)
    rules = []
    for name in names:
        if name not in known:
            raise ConfigError(f"unknown {_noun(kind)} {name!r}", f"known {_noun(kind)}s: {', '.join(sorted(known))}")
        rules.append(known[name](**parameters.get(name, {})))
    return rules


def advice_for(kind: str, name: str) -> str:
    """What to do when rule `name` of `kind` fires ("" for a rule that is not registered or gives none)."""
    cls = REGISTRY.get((kind, name))
    return cls.advice if cls is not None else ""
