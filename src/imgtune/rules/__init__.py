"""One Rule contract for the debugger's and the profiler's rules: parameters, statuses, results, advice, registry."""

from imgtune.rules.base import (
    REGISTRY,
    Finding,
    Rule,
    RuleResult,
    Status,
    advice_for,
    convert_parameter,
    make_rules,
    rules_of,
)

__all__ = [
    "REGISTRY",
    "Finding",
    "Rule",
    "RuleResult",
    "Status",
    "advice_for",
    "convert_parameter",
    "make_rules",
    "rules_of",
]
