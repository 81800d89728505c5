"""The one Rule contract (imgtune.rules) as both kinds of rules keep it: registry, parameters, statuses,
results and advice."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

import imgtune.debugger.rules as debugger_rules
import imgtune.profiler.rules as profiler_rules
from imgtune.core.errors import ConfigError
from imgtune.debugger.runner import RuleRunner, run_rules_offline
from imgtune.debugger.store import Trial
from imgtune.profiler.data import ProfileData
from imgtune.rules import REGISTRY, Finding, Rule, Status, advice_for, make_rules, rules_of

KINDS = ("debugger", "profiler")
SHARED_KEYS = {"rule", "status", "message", "parameters", "error"}
# One set of parameters, one of each kind of default, given to a test rule of each kind.
PARAMETERS = {"threshold": 0.5, "patience": 3, "stop": False, "mode": None, "name_regex": ".*"}


def builtin(kind: str) -> dict[str, type[Rule]]:
    """The rules of `kind` that imgtune defines (other tests may register their own rules, without advice)."""
    return {name: cls for name, cls in rules_of(kind).items() if cls.__module__.startswith("imgtune.")}


@pytest.fixture
def test_rules() -> Iterator[dict[str, type[Rule]]]:
    """A debugger rule and a profiler rule registered here (and unregistered afterwards), with the same
    parameters; each fires when its input is above `threshold`."""

    class LossAbove(debugger_rules.Rule):
        parameters = PARAMETERS
        description = "the loss is above a threshold"
        advice = "Lower the loss."

        def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
            value = trial.tensor("loss").value(step, "train")
            return Finding(step, f"loss {value} > {self.threshold}", "loss") if value > self.threshold else None

    class InitAbove(profiler_rules.ProfilerRule):
        parameters = PARAMETERS
        description = "initialisation is above a threshold"
        advice = "Start faster."

        def evaluate(self, data: ProfileData) -> profiler_rules.RuleResult:
            seconds = data.timings["initialization"]
            if seconds > self.threshold:
                return self.result(Status.ISSUES, f"{seconds} s", datapoints=1, triggers=1)
            return self.result(Status.NO_ISSUES, f"{seconds} s", datapoints=1)

    def both(base: type[Rule], advice_text: str) -> type[Rule]:
        class Both(base):  # one name in both kinds: they do not collide
            description = "a rule named like one of the other kind"
            advice = advice_text

        return Both

    added = {
        "debugger": [LossAbove, both(debugger_rules.Rule, "Debugger advice.")],
        "profiler": [InitAbove, both(profiler_rules.ProfilerRule, "Profiler advice.")],
    }
    try:
        yield {"debugger": LossAbove, "profiler": InitAbove}
    finally:
        for kind, classes in added.items():
            for cls in classes:
                REGISTRY.pop((kind, cls.__name__), None)


def trial_with_losses(tmp_path, losses: list[float]) -> Trial:
    trial = Trial(tmp_path, load=False)
    for step, value in enumerate(losses):
        trial.add({"name": "loss", "collection": "losses", "mode": "train", "step": step, "v": value})
    return trial


def test_every_builtin_rule_has_a_description_and_advice():
    assert len(builtin("debugger")) == 15 and len(builtin("profiler")) == 12
    assert {"StalledTraining", "Overfit", "CheckInputImages"} <= set(builtin("debugger"))
    assert {"LowGPUUtilization", "OverallSystemUsage"} <= set(builtin("profiler"))
    for kind in KINDS:
        for name, cls in builtin(kind).items():
            assert cls.kind == kind, name
            assert cls.description.strip(), f"{kind} rule {name} has no description"
            assert len(cls.advice.strip()) > 20, f"{kind} rule {name} has no advice"
            assert advice_for(kind, name) == cls.advice
    assert advice_for("debugger", "NoSuchRule") == "" and advice_for("profiler", "StalledTraining") == ""
    assert debugger_rules.REGISTRY.keys() == rules_of("debugger").keys()
    assert profiler_rules.RULES.keys() == rules_of("profiler").keys()


def test_the_report_holds_no_rule_texts():
    import imgtune.report as report

    assert not hasattr(report, "DEBUGGER_ADVICE")
    debugger = {"rules": [{"rule": "Overfit", "status": "IssuesFound", "findings": [{"message": "valid > train"}]}]}
    profiler = {"rules": [{"rule": "BatchSize", "status": "IssuesFound", "message": "idle"}]}  # an older rules.json
    do = {r["rule"]: r["do"] for r in report._recommendations(profiler, debugger)}
    assert do == {
        "Overfit": rules_of("debugger")["Overfit"].advice,
        "BatchSize": rules_of("profiler")["BatchSize"].advice,
    }


@pytest.mark.parametrize("kind", KINDS)
def test_parameters_convert_and_refuse_unknown_names_alike(kind, test_rules):
    cls = test_rules[kind]
    rule = cls(threshold="0.25", patience="7", stop="yes", mode="12", name_regex="loss.*")
    assert (rule.threshold, rule.patience, rule.stop, rule.mode, rule.name_regex) == (0.25, 7, True, 12.0, "loss.*")
    assert type(rule.patience) is int and type(rule.threshold) is float
    assert cls(mode="train").mode == "train"  # an optional parameter keeps a name that is not a number
    assert cls(threshold=2).threshold == 2  # values that are not strings are taken as given
    assert cls().params == PARAMETERS and rule.name == cls.__name__
    with pytest.raises(ConfigError, match=rf"rule {cls.__name__} has no parameter\(s\) bogus, treshold") as error:
        cls(treshold=1, bogus=2)
    assert error.value.hint == "its parameters: threshold, patience, stop, mode, name_regex"
    with pytest.raises(ConfigError, match=rf"rule {cls.__name__}: threshold='tiny' is not a float"):
        cls(threshold="tiny")
    with pytest.raises(ConfigError, match="stop='maybe' is not a bool"):
        cls(stop="maybe")
    with pytest.raises(AttributeError):
        _ = rule.no_such_parameter


def test_rules_registered_here_are_found_by_make_rules_of_their_kind(test_rules):
    [debugger] = make_rules("debugger", ["LossAbove"], {"LossAbove": {"threshold": "1.5"}})
    assert type(debugger) is test_rules["debugger"] and debugger.threshold == 1.5
    [profiler] = make_rules("profiler", ["InitAbove"])
    assert type(profiler) is test_rules["profiler"]
    # through each kind's own helpers, with their signatures of before
    assert [type(r) for r in debugger_rules.make_rules(["LossAbove", "Overfit"])] == [
        test_rules["debugger"],
        rules_of("debugger")["Overfit"],
    ]
    assert [type(r) for r in profiler_rules.make_profiler_rules(["InitAbove"])] == [test_rules["profiler"]]
    # one name in both kinds: each kind finds its own
    assert make_rules("debugger", ["Both"])[0].advice == "Debugger advice."
    assert make_rules("profiler", ["Both"])[0].advice == "Profiler advice."
    with pytest.raises(ConfigError, match="unknown profiler rule 'LossAbove'") as error:
        make_rules("profiler", ["LossAbove"])
    assert "InitAbove" in error.value.hint and "LowGPUUtilization" in error.value.hint
    with pytest.raises(ConfigError, match="unknown rule 'InitAbove'") as error:
        debugger_rules.make_rules(["InitAbove"])
    assert "LossAbove" in error.value.hint and "InitAbove" not in error.value.hint


def test_statuses_and_results_are_one_shape_for_both_kinds(tmp_path, test_rules):
    assert {s.value for s in Status} == {
        "InProgress", "IssuesFound", "NoIssuesFound", "NotApplicable", "InsufficientData", "Error",
    }  # fmt: skip
    assert profiler_rules.ISSUES == "IssuesFound" and profiler_rules.INSUFFICIENT == "InsufficientData"

    rule = test_rules["debugger"](threshold=1.0)
    assert RuleRunner([rule]).results[rule.name].status == Status.IN_PROGRESS
    fired = run_rules_offline(trial_with_losses(tmp_path / "a", [2.0, 0.5, 3.0]), [rule])["LossAbove"]
    assert fired["status"] == "IssuesFound" and fired["finding_count"] == 2
    assert fired["message"] == "loss 2.0 > 1.0" and [f["step"] for f in fired["findings"]] == [0, 2]
    quiet = run_rules_offline(trial_with_losses(tmp_path / "b", [0.5]), [test_rules["debugger"](threshold=1.0)])
    assert quiet["LossAbove"]["status"] == "NoIssuesFound" and quiet["LossAbove"]["finding_count"] == 0

    profiler = profiler_rules.make_profiler_rules(["InitAbove"], {"InitAbove": {"threshold": 10}})
    slow = profiler_rules.evaluate_rules(profiler, ProfileData(timings={"initialization": 60.0}))["InitAbove"]
    assert slow["status"] == "IssuesFound" and slow["recommendation"] == "Start faster."  # the rule's advice
    fast = profiler_rules.evaluate_rules(profiler, ProfileData(timings={"initialization": 1.0}))["InitAbove"]
    assert fast["status"] == "NoIssuesFound" and fast["recommendation"] == ""
    broken = profiler_rules.evaluate_rules(profiler, ProfileData(timings={}))["InitAbove"]
    assert broken["status"] == "Error" and broken["error"] == "KeyError: 'initialization'"

    for result in (fired, quiet["LossAbove"], slow, fast, broken):
        assert set(result) >= SHARED_KEYS and result["status"] in {s.value for s in Status}
        assert type(result["status"]) is str and json.loads(json.dumps(result)) == result
    assert fired["parameters"] == {**PARAMETERS, "threshold": 1.0} and slow["parameters"]["threshold"] == 10
    assert {"findings", "finding_count"} <= set(fired) and not {"datapoints", "recommendation"} & set(fired)
    assert {"datapoints", "triggers", "recommendation", "details"} <= set(slow) and "findings" not in slow


def test_the_configs_rule_names_are_the_registrys():
    # config may not import the rules, so it keeps its own lists: this keeps them equal to the built-in rules
    from imgtune.config import DEFAULT_RULES, PROFILER_RULES

    assert set(PROFILER_RULES) == set(rules_of("profiler"))
    assert set(DEFAULT_RULES) <= set(rules_of("debugger"))
