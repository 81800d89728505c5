"""Debugger rules: the Rule base class, the built-in rules and custom rules from files."""

from imgtune.debugger.rules.base import REGISTRY, Finding, Rule, load_rule_file, make_rules

__all__ = ["REGISTRY", "Finding", "Rule", "load_rule_file", "make_rules"]
