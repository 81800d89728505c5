"""Debugger rules: the Rule base class, the built-in rules and custom rules from files.

Importing this package registers the built-in rules (so `REGISTRY` and `imgtune.rules.advice_for` know them).
"""

from imgtune.debugger.rules import builtin  # noqa: F401  (registers the built-in rules)
from imgtune.debugger.rules.base import REGISTRY, Finding, Rule, load_rule_file, make_rules

__all__ = ["REGISTRY", "Finding", "Rule", "load_rule_file", "make_rules"]
