"""Every built-in debugger rule on real tiny training runs: a deliberately broken run where it fires, and a
healthy run where it finds nothing. Plus custom rules from a file, parameter checking, rule errors, stop_on,
on_finding, missing data, and offline evaluation agreeing with the online one.

The runs are real (`tests/debug_harness.py`): small torch models on in-memory data through the `Trainer`, with
the `DebuggerCallback` capturing and a `RuleCallback` evaluating the rules as training goes.
"""

from __future__ import annotations

import json
import math
import time

import pytest
import torch
from torch import nn
from torch.utils.data import Dataset, TensorDataset

from debug_harness import RunResult, blobs, images, mlp, noise, run, seeded, small_cnn
from imgtune.config import SaveConfig, build_config
from imgtune.core.errors import ConfigError
from imgtune.debugger.capture import Requirement
from imgtune.debugger.rules import REGISTRY, Finding, Rule, load_rule_file, make_rules
from imgtune.debugger.rules.builtin import BUILTIN_RULES
from imgtune.debugger.runner import run_rules_offline
from imgtune.debugger.store import RULES_FILE, Trial
from imgtune.training.callbacks import Callback

EVERY_STEP = {"train": SaveConfig(save_interval=1)}  # save weights/gradients at every training step


def rule(name: str, **params) -> list[Rule]:
    return make_rules([name], {name: params})


def assert_fires(result: RunResult, name: str) -> dict:
    """The rule ended in IssuesFound; returns its first finding (a dict with step, message, tensor, evidence)."""
    assert result.status(name) == "IssuesFound", result.results[name]
    finding = result.first(name)
    assert finding["message"] and finding["evidence"]
    return finding


def assert_quiet(result: RunResult, name: str) -> None:
    assert result.status(name) == "NoIssuesFound", result.results[name]
    assert result.results[name]["finding_count"] == 0 and result.results[name]["error"] is None


def he_mlp(hidden: int = 32, *, seed: int = 0) -> nn.Sequential:
    """Two ReLU layers with He (Kaiming) initialisation: activation variances stay even across layers."""
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 3))
    for layer in model:
        if isinstance(layer, nn.Linear):
            nn.init.kaiming_normal_(layer.weight, nonlinearity="relu")
            nn.init.zeros_(layer.bias)
    return model


def sigmoid_chain(depth: int = 16, width: int = 8, *, std: float = 0.1, seed: int = 0) -> nn.Sequential:
    """A deep Linear+Sigmoid chain with small weights: each layer multiplies the gradient by far less than 1
    (sigmoid' <= 0.25, weights ~ N(0, std^2)), so the first layers' gradients vanish."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for _ in range(depth):
        linear = nn.Linear(width, width)
        nn.init.normal_(linear.weight, std=std)
        nn.init.zeros_(linear.bias)
        layers += [linear, nn.Sigmoid()]
    return nn.Sequential(*layers, nn.Linear(width, 3))


def tanh_net(weight_scale: float = 1.0, *, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].weight.mul_(weight_scale)
    return model


class SlowItem(Dataset):
    """A dataset whose item `index` takes `seconds` to load (a stalled data source)."""

    def __init__(self, base: Dataset, index: int, seconds: float):
        self.base, self.index, self.seconds = base, index, seconds

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int):
        if i == self.index:
            time.sleep(self.seconds)
        return self.base[i]


# -- VanishingGradient ----------------------------------------------------------------------------------------


def test_vanishing_gradient_fires_on_deep_sigmoid_chain(tmp_path):
    result = run(tmp_path, sigmoid_chain(), blobs(), None, rule("VanishingGradient"), epochs=1)
    finding = assert_fires(result, "VanishingGradient")
    assert finding["step"] == 0 and finding["tensor"].startswith("gradient/0.")  # the first layer, at once
    assert finding["evidence"]["mean_abs"] < 1e-7 and finding["evidence"]["threshold"] == 1e-7


def test_vanishing_gradient_quiet_on_small_relu_mlp(tmp_path):
    result = run(tmp_path, mlp(), blobs(), blobs(48, seed=7), rule("VanishingGradient"), epochs=3)
    assert_quiet(result, "VanishingGradient")
    assert len(result.trial.tensor("gradient/0.weight").steps("train")) >= 2  # it had gradients to look at


# -- ExplodingTensor ------------------------------------------------------------------------------------------


def test_exploding_tensor_fires_on_huge_learning_rate(tmp_path):
    result = run(tmp_path, mlp(), blobs(), blobs(48, seed=7), rule("ExplodingTensor"), epochs=2, lr=1e6)
    finding = assert_fires(result, "ExplodingTensor")
    assert finding["evidence"]["nan"] + finding["evidence"]["inf"] > 0
    assert not math.isfinite(result.trainer.history[-1]["train_loss"])  # the run really blew up


def test_exploding_tensor_quiet_on_sane_learning_rate(tmp_path):
    result = run(tmp_path, mlp(), blobs(), blobs(48, seed=7), rule("ExplodingTensor"), epochs=2, lr=0.05)
    assert_quiet(result, "ExplodingTensor")


# -- PoorWeightInitialization ---------------------------------------------------------------------------------


def test_poor_weight_initialization_fires_on_uneven_layer_scales(tmp_path):
    model = he_mlp()
    with torch.no_grad():
        model[2].weight.mul_(100)  # the second layer's ReLU inputs get ~10^4 times the variance of the first's
    result = run(tmp_path, model, blobs(320), None, rule("PoorWeightInitialization"), lr=0.01, optimizer="adam")
    finding = assert_fires(result, "PoorWeightInitialization")
    assert finding["step"] == 0
    assert set(finding["evidence"]["variances"]) == {"1_relu_input", "3_relu_input"}
    assert finding["evidence"]["ratio"] > 1000


def test_poor_weight_initialization_fires_on_zero_init_without_gradient_spread(tmp_path):
    model = he_mlp()
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.zero_()  # all-zero init: no signal reaches the first layer's weights
                layer.bias.zero_()
    result = run(tmp_path, model, blobs(320), None, rule("PoorWeightInitialization"), lr=0.01, optimizer="adam")
    finding = assert_fires(result, "PoorWeightInitialization")
    assert finding["step"] == 0 and finding["tensor"] == "gradient/0.weight" and "P5 and P95" in finding["message"]
    assert finding["evidence"]["p95_minus_p5"] < 0.001


def test_poor_weight_initialization_fires_when_loss_does_not_fall_in_first_steps(tmp_path):
    # lr 0 and no shuffling: 80 / 16 = 5 batches an epoch, so steps 5-9 repeat the losses of steps 0-4 exactly
    result = run(tmp_path, he_mlp(), blobs(80), None, rule("PoorWeightInitialization"), epochs=2, lr=0.0, shuffle=False)
    finding = assert_fires(result, "PoorWeightInitialization")
    assert finding["tensor"] == "loss" and "did not fall in the first 10 steps" in finding["message"]
    assert finding["evidence"]["last_mean"] == finding["evidence"]["first_mean"]


def test_poor_weight_initialization_quiet_on_he_init(tmp_path):
    result = run(tmp_path, he_mlp(), blobs(320), None, rule("PoorWeightInitialization"), lr=0.01, optimizer="adam")
    assert_quiet(result, "PoorWeightInitialization")
    # the window of 10 dense steps was captured: both ReLU inputs and the gradients
    assert result.trial.tensor("3_relu_input").steps("train") == list(range(10))
    assert result.trial.tensor("gradient/0.weight").steps("train")[:10] == list(range(10))


# -- LossNotDecreasing ----------------------------------------------------------------------------------------

LND = {"mode": "train", "num_steps": 5}  # 80 samples / 16 = 5 batches: each window is one epoch


def test_loss_not_decreasing_fires_on_zero_learning_rate(tmp_path):
    result = run(tmp_path, mlp(), blobs(80), None, rule("LossNotDecreasing", **LND), epochs=4, lr=0.0)
    finding = assert_fires(result, "LossNotDecreasing")
    assert finding["step"] == result.trial.tensor("loss").steps("train")[9]  # as soon as two windows of 5 losses
    assert abs(finding["evidence"]["decrease_percent"]) < 0.1 and finding["evidence"]["mode"] == "train"


def test_loss_not_decreasing_quiet_while_learning(tmp_path):
    result = run(tmp_path, mlp(), blobs(80), None, rule("LossNotDecreasing", **LND), epochs=6, lr=0.05)
    assert_quiet(result, "LossNotDecreasing")
    losses = [h["train_loss"] for h in result.trainer.history]
    assert all(b < a for a, b in zip(losses, losses[1:], strict=False))


# -- Overfit --------------------------------------------------------------------------------------------------


def test_overfit_fires_when_memorising_random_labels(tmp_path):
    result = run(
        tmp_path,
        mlp(hidden=64),
        noise(16, seed=1),
        noise(64, seed=2),
        rule("Overfit"),
        epochs=20,
        lr=0.01,
        optimizer="adam",
    )
    finding = assert_fires(result, "Overfit")
    assert finding["evidence"]["ratio"] > 0.1
    assert finding["evidence"]["valid_loss"] > finding["evidence"]["train_loss"]
    last = result.trainer.history[-1]
    assert last["train_accuracy"] == 1.0 and last["valid_loss"] > 5 * last["train_loss"]  # memorised


def test_overfit_quiet_when_train_and_valid_come_from_one_distribution(tmp_path):
    train, valid = blobs(960, spread=1.5), blobs(960, spread=1.5, seed=9)
    result = run(tmp_path, mlp(), train, valid, rule("Overfit"), epochs=3, lr=0.02, optimizer="adam", batch_size=64)
    assert_quiet(result, "Overfit")
    assert len(result.trial.tensor("valid_loss").steps()) == 3


# -- Overtraining ---------------------------------------------------------------------------------------------

PATIENCE = {"patience_train": 3, "patience_validation": 3}


def test_overtraining_fires_when_nothing_improves(tmp_path):
    result = run(tmp_path, mlp(), blobs(64), blobs(32, seed=3), rule("Overtraining", **PATIENCE), epochs=5, lr=0.0)
    finding = assert_fires(result, "Overtraining")
    assert finding["evidence"]["epochs_without_valid_improvement"] == 3
    assert result.results["Overtraining"]["finding_count"] == 2  # after epochs 4 and 5
    assert finding["step"] == result.trial.tensor("valid_loss").steps()[3]  # at the end of epoch 4


def test_overtraining_quiet_while_improving(tmp_path):
    result = run(tmp_path, mlp(), blobs(64), blobs(32, seed=3), rule("Overtraining", **PATIENCE), epochs=5, lr=0.05)
    assert_quiet(result, "Overtraining")
    valid = [h["valid_loss"] for h in result.trainer.history]
    assert all(b < a - 0.01 for a, b in zip(valid, valid[1:], strict=False))


# -- ClassImbalance -------------------------------------------------------------------------------------------


def test_class_imbalance_fires_on_95_percent_one_class(tmp_path):
    x = torch.randn(100, 8, generator=seeded(3))
    y = torch.zeros(100, dtype=torch.long)
    y[torch.randperm(100, generator=seeded(4))[:5]] = 1
    result = run(
        tmp_path, mlp(classes=2), TensorDataset(x, y), None, rule("ClassImbalance", samples=100), batch_size=20
    )
    finding = assert_fires(result, "ClassImbalance")
    assert finding["evidence"]["counts"] == {0: 95, 1: 5} and finding["evidence"]["ratio"] == 19.0


def test_class_imbalance_quiet_on_balanced_learnable_labels(tmp_path):
    result = run(
        tmp_path,
        mlp(),
        blobs(200),
        None,
        rule("ClassImbalance", samples=100),
        batch_size=20,
        lr=0.05,
        optimizer="adam",
    )
    assert_quiet(result, "ClassImbalance")
    labels = result.trial.tensor("labels")
    assert sum(len(labels.by_mode["train"][s]["values"]) for s in labels.steps("train")) >= 100


# -- DeadRelu -------------------------------------------------------------------------------------------------


def test_dead_relu_fires_on_large_negative_bias(tmp_path):
    model = mlp()
    with torch.no_grad():
        model[0].bias.fill_(-100.0)  # every ReLU input is far below 0
    result = run(tmp_path, model, blobs(), blobs(32, seed=3), rule("DeadRelu"), epochs=2)
    finding = assert_fires(result, "DeadRelu")
    assert finding["tensor"] == "1_relu_output"
    assert finding["evidence"] == {"channels": 16, "inactive_channels": 16, "percent": 100.0}


def test_dead_relu_quiet_on_normal_mlp(tmp_path):
    result = run(tmp_path, mlp(), blobs(), blobs(32, seed=3), rule("DeadRelu"), epochs=2)
    assert_quiet(result, "DeadRelu")


# -- SaturatedActivation --------------------------------------------------------------------------------------


def test_saturated_activation_fires_on_huge_tanh_inputs(tmp_path):
    result = run(tmp_path, tanh_net(weight_scale=1e4), blobs(), None, rule("SaturatedActivation"), epochs=2)
    finding = assert_fires(result, "SaturatedActivation")
    assert finding["tensor"] == "1_tanh_input" and finding["evidence"]["percent"] > 50
    tanh_input = result.trial.tensor("1_tanh_input")
    assert tanh_input.reduction(0, "l1") / tanh_input.reduction(0, "numel") > 100  # mean |x| >> the tanh range 9.5


def test_saturated_activation_fires_on_sigmoid_too(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sigmoid(), nn.Linear(16, 3))
    with torch.no_grad():
        model[0].bias.fill_(50.0)  # sigmoid inputs about 50, beyond its upper bound of 17
    result = run(tmp_path, model, blobs(), None, rule("SaturatedActivation"))
    assert assert_fires(result, "SaturatedActivation")["tensor"] == "1_sigmoid_input"


def test_saturated_activation_quiet_on_small_inputs(tmp_path):
    result = run(tmp_path, tanh_net(), blobs(), None, rule("SaturatedActivation"), epochs=2)
    assert_quiet(result, "SaturatedActivation")


# -- WeightUpdateRatio ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("lr", "size"), [(1e4, "large"), (1e-12, "small")])
def test_weight_update_ratio_fires_on_extreme_learning_rates(tmp_path, lr, size):
    result = run(tmp_path, mlp(), blobs(), None, rule("WeightUpdateRatio"), lr=lr, debugger_overrides=EVERY_STEP)
    finding = assert_fires(result, "WeightUpdateRatio")
    assert f"too {size}" in finding["message"] and finding["step"] == 0
    ratio = finding["evidence"]["ratio"]
    assert ratio > 10 if size == "large" else ratio < 1e-8


def test_weight_update_ratio_quiet_on_sane_learning_rate(tmp_path):
    result = run(tmp_path, mlp(), blobs(), None, rule("WeightUpdateRatio"), lr=0.01, debugger_overrides=EVERY_STEP)
    assert_quiet(result, "WeightUpdateRatio")
    weight = result.trial.tensor("0.weight")
    assert len(weight.steps("train")) == 6 and all("update" in record for record in weight.by_mode["train"].values())


# -- AllZero --------------------------------------------------------------------------------------------------


def test_all_zero_fires_on_zero_initialised_frozen_weights(tmp_path):
    model = mlp()
    with torch.no_grad():
        model[0].weight.zero_()
    result = run(tmp_path, model, blobs(), None, rule("AllZero", collection_names="weights"), lr=0.0)
    finding = assert_fires(result, "AllZero")
    assert finding["tensor"] == "0.weight" and finding["evidence"]["zero_percent"] == 100.0


def test_all_zero_quiet_on_normal_init(tmp_path):
    result = run(tmp_path, mlp(), blobs(), None, rule("AllZero", collection_names="weights"), lr=0.05)
    assert_quiet(result, "AllZero")
    assert result.trial.tensor_names(collection="weights") == ["0.weight", "2.weight"]


# -- UnchangedTensor ------------------------------------------------------------------------------------------


def test_unchanged_tensor_fires_when_weights_do_not_move(tmp_path):
    result = run(
        tmp_path,
        mlp(),
        blobs(),
        None,
        rule("UnchangedTensor", collection_names="weights"),
        lr=0.0,
        debugger_overrides=EVERY_STEP,
    )
    finding = assert_fires(result, "UnchangedTensor")
    assert finding["step"] == 2 and finding["evidence"]["steps"] == [0, 1, 2]


def test_unchanged_tensor_quiet_when_weights_train(tmp_path):
    result = run(
        tmp_path,
        mlp(),
        blobs(),
        None,
        rule("UnchangedTensor", collection_names="weights"),
        lr=0.05,
        debugger_overrides=EVERY_STEP,
    )
    assert_quiet(result, "UnchangedTensor")
    assert len(result.trial.tensor("2.weight").steps("train")) == 6


# -- TensorVariance -------------------------------------------------------------------------------------------


def test_tensor_variance_fires_on_scaled_up_weights(tmp_path):
    model = mlp()
    with torch.no_grad():
        model[0].weight.mul_(100)
    rules = make_rules(["TensorVariance"], {"TensorVariance": {"collection_names": "weights", "max_threshold": "1"}})
    assert rules[0].max_threshold == 1.0  # a string parameter, as from the command line, read as a number
    result = run(tmp_path, model, blobs(), None, rules, lr=0.001)
    finding = assert_fires(result, "TensorVariance")
    assert finding["tensor"] == "0.weight" and finding["evidence"]["variance"] > 100


def test_tensor_variance_quiet_on_default_init(tmp_path):
    rules = rule("TensorVariance", collection_names="weights", max_threshold=1.0, min_threshold=1e-6)
    result = run(tmp_path, mlp(), blobs(), None, rules, lr=0.05)
    assert_quiet(result, "TensorVariance")
    assert result.trial.tensor_names(collection="weights")


# -- StalledTraining ------------------------------------------------------------------------------------------


def test_stalled_training_fires_on_a_slow_batch(tmp_path):
    slow = SlowItem(blobs(), index=50, seconds=0.8)  # in the 4th batch (no shuffle): step 3
    result = run(tmp_path, mlp(), slow, None, rule("StalledTraining", threshold=0.4), shuffle=False)
    assert_fires(result, "StalledTraining")
    findings = result.results["StalledTraining"]["findings"]
    # The watchdog reports the stall while it lasts, once; the step that finally arrives does not repeat it.
    assert len(findings) == 1 and findings[0]["evidence"]["watchdog"]
    assert findings[0]["step"] == 3 and 0.4 < findings[0]["evidence"]["seconds"] < 0.8
    assert len(result.trainer.history) == 1  # only reported: training went on


def test_stalled_training_stop_training_on_fire(tmp_path):
    slow = SlowItem(blobs(), index=50, seconds=0.8)
    rules = rule("StalledTraining", threshold=0.4, stop_training_on_fire="true")
    result = run(tmp_path, mlp(), slow, None, rules, shuffle=False, epochs=2)
    assert_fires(result, "StalledTraining")
    assert "StalledTraining" in result.trainer.stop_reason and result.trainer.history == []
    assert result.trial.tensor("loss").steps() == [0, 1, 2, 3]


def test_stalled_training_quiet_without_pauses(tmp_path):
    result = run(tmp_path, mlp(), blobs(), blobs(32, seed=3), rule("StalledTraining", threshold=0.4), epochs=2)
    assert_quiet(result, "StalledTraining")


# -- CheckInputImages -----------------------------------------------------------------------------------------


def test_check_input_images_fires_on_unnormalised_images(tmp_path):
    result = run(tmp_path, small_cnn(), images(normalised=False), None, rule("CheckInputImages", threshold_samples=64))
    finding = assert_fires(result, "CheckInputImages")
    assert finding["evidence"]["images"] == 64 and finding["step"] == 3  # judged once 4 batches of 16 were seen
    means = finding["evidence"]["channel_means"]
    assert set(means) == {f"inputs_channel{c}_mean" for c in range(3)}
    assert all(abs(m - 0.5) < 0.05 for m in means.values())


def test_check_input_images_quiet_on_normalised_images(tmp_path):
    result = run(tmp_path, small_cnn(), images(normalised=True), None, rule("CheckInputImages", threshold_samples=64))
    assert_quiet(result, "CheckInputImages")
    assert len(result.trial.tensor("inputs").steps("train")) == 6  # the requirement turned the inputs on


def test_every_builtin_rule_has_a_broken_and_a_healthy_run():
    tested = {
        name
        for name in REGISTRY
        if any(f"test_{_snake(name)}_fires" in key for key in globals())
        and any(f"test_{_snake(name)}_quiet" in key for key in globals())
    }
    assert {cls.__name__ for cls in BUILTIN_RULES} <= tested


def _snake(name: str) -> str:
    return "".join(f"_{c.lower()}" if c.isupper() else c for c in name).lstrip("_")


# -- custom rules, parameters, errors, actions ---------------------------------------------------------------

CUSTOM_RULE = '''
from imgtune.debugger.rules import Finding, Rule


class LossAboveOne(Rule):
    """Fires when a training loss is above `limit`."""

    parameters = {"limit": 1.0}

    def invoke_at_step(self, trial, step):
        loss = trial.tensor("loss")
        if step in loss.steps("train") and loss.value(step, "train") > self.limit:
            value = loss.value(step, "train")
            return Finding(step, f"loss {value:.3f} > {self.limit}", "loss", {"loss": value, "limit": self.limit})
        return None
'''


def test_custom_rule_from_file(tmp_path):
    path = tmp_path / "my_rules.py"
    path.write_text(CUSTOM_RULE)
    [cls] = load_rule_file(path)
    assert cls.__name__ == "LossAboveOne" and issubclass(cls, Rule)

    [custom] = make_rules(["LossAboveOne"], {"LossAboveOne": {"limit": "0.5"}}, rule_files=[str(path)])
    assert custom.limit == 0.5 and isinstance(custom.limit, float)
    result = run(tmp_path / "fires", mlp(), blobs(), None, [custom])
    finding = assert_fires(result, "LossAboveOne")
    assert finding["step"] == 0 and finding["evidence"]["loss"] > 0.5 and finding["evidence"]["limit"] == 0.5

    [lenient] = make_rules(["LossAboveOne"], {"LossAboveOne": {"limit": "5"}}, rule_files=[str(path)])
    assert_quiet(run(tmp_path / "quiet", mlp(), blobs(), None, [lenient]), "LossAboveOne")


def test_rule_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        load_rule_file(tmp_path / "nope.py")
    (tmp_path / "empty.py").write_text("x = 1\n")
    with pytest.raises(ConfigError, match="defines no class"):
        load_rule_file(tmp_path / "empty.py")
    (tmp_path / "broken.py").write_text("def (:\n")
    with pytest.raises(ConfigError, match="cannot load rules"):
        load_rule_file(tmp_path / "broken.py")


def test_unknown_rule_and_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="unknown rule 'NoSuchRule'"):
        make_rules(["NoSuchRule"])
    with pytest.raises(ConfigError, match="has no parameter.*treshold"):
        make_rules(["VanishingGradient"], {"VanishingGradient": {"treshold": 1e-6}})
    with pytest.raises(ConfigError, match="threshold='tiny' is not a float"):
        make_rules(["VanishingGradient"], {"VanishingGradient": {"threshold": "tiny"}})
    with pytest.raises(ConfigError, match="needs collection_names or tensor_regex"):
        make_rules(["AllZero"])
    [vg] = make_rules(["VanishingGradient"], {"VanishingGradient": {"threshold": "1e-5"}})
    assert vg.threshold == 1e-5


class BuggyRule(Rule, register=False):
    """A rule with a bug: it raises at step 3."""

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        if step == 3:
            raise ZeroDivisionError("the rule divided by zero")
        return None


def test_rule_that_raises_ends_in_error_and_training_completes(tmp_path):
    rules = [BuggyRule(), *rule("VanishingGradient")]
    result = run(tmp_path, mlp(), blobs(), blobs(32, seed=3), rules, epochs=2)
    broken = result.results["BuggyRule"]
    assert broken["status"] == "Error" and broken["error"] == "ZeroDivisionError: the rule divided by zero"
    assert "ZeroDivisionError" in broken["traceback"]
    assert len(result.trainer.history) == 2 and result.trainer.stop_reason is None  # training went on
    assert_quiet(result, "VanishingGradient")  # the other rules were unaffected
    written = {r["rule"]: r for r in json.loads((result.directory / RULES_FILE).read_text())["rules"]}
    assert written["BuggyRule"]["status"] == "Error" and written["VanishingGradient"]["status"] == "NoIssuesFound"


def test_stop_on_stops_training_at_the_finding(tmp_path):
    result = run(
        tmp_path,
        mlp(),
        blobs(),
        blobs(48, seed=7),
        rule("ExplodingTensor"),
        epochs=3,
        lr=1e6,
        stop_on=["ExplodingTensor"],
    )
    finding = assert_fires(result, "ExplodingTensor")
    reason = result.trainer.stop_reason
    assert reason and "ExplodingTensor" in reason and f"step {finding['step']}" in reason
    assert len(result.trainer.history) < 3
    assert max(result.trial.steps()) == finding["step"]  # nothing ran after the batch that exploded
    assert result.results["ExplodingTensor"]["finding_count"] == 1


def test_without_stop_on_training_runs_to_the_end(tmp_path):
    result = run(tmp_path, mlp(), blobs(), blobs(48, seed=7), rule("ExplodingTensor"), epochs=3, lr=1e6)
    assert_fires(result, "ExplodingTensor")
    assert result.trainer.stop_reason is None and len(result.trainer.history) == 3


def test_on_finding_receives_rule_name_and_finding(tmp_path):
    calls: list[tuple[str, Finding]] = []
    rules = rule("UnchangedTensor", collection_names="weights")
    result = run(
        tmp_path,
        mlp(),
        blobs(),
        None,
        rules,
        lr=0.0,
        debugger_overrides=EVERY_STEP,
        on_finding=lambda name, finding: calls.append((name, finding)),
    )
    assert calls and all(name == "UnchangedTensor" and isinstance(f, Finding) for name, f in calls)
    assert len(calls) == result.results["UnchangedTensor"]["finding_count"]
    assert [f.to_dict() for _, f in calls] == result.findings("UnchangedTensor")


def test_rule_without_its_data_ends_in_error(tmp_path):
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))  # no ReLU for DeadRelu to look at
    rules = [*rule("DeadRelu"), *rule("SaturatedActivation")]
    result = run(tmp_path, model, blobs(), None, rules)
    dead = result.results["DeadRelu"]
    assert dead["status"] == "Error" and "no activations matching '.*relu_output' tensors were saved" in dead["error"]
    assert_quiet(result, "SaturatedActivation")  # its tanh inputs were there

    no_tanh = run(tmp_path / "mlp", mlp(), blobs(), None, rule("SaturatedActivation"))
    assert no_tanh.status("SaturatedActivation") == "Error"
    assert "were saved" in no_tanh.results["SaturatedActivation"]["error"]


class GradientSpy(Rule, register=False):
    """Records the steps at which it was shown saved gradients."""

    def __init__(self):
        super().__init__()
        self.seen: list[int] = []

    def requirements(self) -> list[Requirement]:
        return [Requirement("gradients")]

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        if step in trial.tensor("gradient/0.weight").steps("train"):
            self.seen.append(step)
        return None


def test_online_rules_see_every_saved_step(tmp_path):
    # 10 train batches an epoch and a save_interval of 10: the saved steps are each epoch's first batch, which
    # comes right after the previous epoch's metrics; a rule must be shown each of them once.
    spy = GradientSpy()
    result = run(tmp_path, mlp(), blobs(160), blobs(48, seed=7), [spy], epochs=3)
    saved = result.trial.tensor("gradient/0.weight").steps("train")
    assert len(saved) == 3 and spy.seen == saved


# -- offline evaluation ---------------------------------------------------------------------------------------

OFFLINE_RULES = (
    ["VanishingGradient", "ExplodingTensor", "LossNotDecreasing", "Overtraining", "UnchangedTensor", "Overfit"],
    {
        "LossNotDecreasing": {"mode": "train", "num_steps": 10},
        "Overtraining": {"patience_train": 2, "patience_validation": 2},
        "UnchangedTensor": {"collection_names": "weights"},
    },
)


@pytest.mark.parametrize("broken", [True, False], ids=["broken", "healthy"])
def test_offline_evaluation_matches_online(tmp_path, broken):
    # 160 samples / 16 = 10 train batches per epoch: with the harness's save_interval of 10, the saved training
    # steps are the first batch of each epoch, right after the previous epoch's metrics.
    model, lr = (sigmoid_chain(), 0.0) if broken else (mlp(), 0.05)
    online = run(tmp_path, model, blobs(160), blobs(48, seed=7), make_rules(*OFFLINE_RULES), epochs=3, lr=lr)
    offline = run_rules_offline(Trial(online.directory), make_rules(*OFFLINE_RULES))
    for name, result in online.results.items():
        assert offline[name]["status"] == result["status"], name
        assert offline[name]["findings"] == result["findings"], name
        assert offline[name]["error"] == result["error"], name
    statuses = {name: r["status"] for name, r in online.results.items()}
    if broken:
        assert statuses == {
            "VanishingGradient": "IssuesFound",
            "ExplodingTensor": "NoIssuesFound",
            "LossNotDecreasing": "IssuesFound",
            "Overtraining": "IssuesFound",
            "UnchangedTensor": "IssuesFound",
            "Overfit": "NoIssuesFound",  # nothing learnt, so nothing memorised either
        }
        # every epoch's saved gradients were checked online, the first batch of epochs 2 and 3 included
        assert len(online.findings("VanishingGradient")) == 3
    else:
        assert set(statuses.values()) == {"NoIssuesFound"}, online.results


# -- review fixes -----------------------------------------------------------------------------------------------


def test_loss_not_decreasing_judges_one_mode_online_and_offline_alike(tmp_path):
    rules = rule("LossNotDecreasing", num_steps=3)
    result = run(tmp_path, he_mlp(), blobs(), blobs(48, seed=7), rules, epochs=6, lr=0.01, optimizer="adam")
    offline = run_rules_offline(Trial(result.directory), rule("LossNotDecreasing", num_steps=3))
    assert offline["LossNotDecreasing"]["status"] == result.status("LossNotDecreasing")
    for finding in offline["LossNotDecreasing"]["findings"]:
        assert finding["evidence"]["mode"] == "eval"  # mode None: the validation losses only


def test_rules_without_a_validation_split(tmp_path):
    rules = make_rules(["Overfit", "Overtraining"], {"Overtraining": {"patience_train": 3}})
    result = run(tmp_path, mlp(), blobs(), None, rules, epochs=6, lr=0.0)
    assert result.status("Overfit") == "Error" and "no validation split" in result.results["Overfit"]["error"]
    finding = assert_fires(result, "Overtraining")  # judged on the training loss alone
    assert finding["tensor"] == "train_loss"


def test_debugger_config_refuses_stop_on_and_parameters_of_rules_not_run():
    with pytest.raises(ConfigError, match="stop_on names rule"):
        build_config({"data": {"path": "x"}, "debugger": {"stop_on": ["ExplodingTensor"]}})
    with pytest.raises(ConfigError, match="rule_parameters names rule"):
        build_config({"data": {"path": "x"}, "debugger": {"rule_parameters": {"Overfti": {"patience": 2}}}})


def test_a_module_called_twice_in_a_step_gets_one_record_per_call(tmp_path):
    class SharedRelu(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.relu, self.b = nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.relu(self.a(self.relu(x))))

    overrides = {"collections": ["losses", "activations"], "activations_regex": "relu:ReLU"}
    result = run(tmp_path, SharedRelu(), blobs(), None, [], debugger_overrides=overrides)
    names = result.trial.tensor_names(collection="activations")
    assert names == ["relu_call1_relu_input", "relu_call1_relu_output", "relu_relu_input", "relu_relu_output"]


class CountedParameters(nn.Sequential):
    """An MLP that counts who asks for its parameters by name (the debugger's per-parameter walk)."""

    walks = 0

    def named_parameters(self, *args, **kwargs):
        self.walks += 1
        return super().named_parameters(*args, **kwargs)


class ParameterWalksPerStep(Callback):
    """Records, for each training step, how many times the model's parameters were walked by name in it, and
    how many forward hooks its modules had."""

    order = 99

    def __init__(self) -> None:
        self.per_step: list[int] = []
        self.hooks_per_step: list[int] = []

    def on_batch_start(self, trainer) -> None:
        self._before = trainer.module.walks
        self.hooks_per_step.append(sum(len(m._forward_hooks) for m in trainer.module.modules()))

    def on_batch_end(self, trainer) -> None:
        if trainer.phase == "train":
            self.per_step.append(trainer.module.walks - self._before)


def test_between_saved_steps_the_debugger_never_touches_the_parameters(tmp_path):
    """Its per-step cost must not grow with the network: at a step neither saved (every 10th) nor in a rule's
    dense window (PoorWeightInitialization's first 3 here), it does not walk the parameters, and the activation
    hooks a rule's window asked for are gone once the window is past."""
    torch.manual_seed(0)
    model = CountedParameters(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    walks = ParameterWalksPerStep()
    result = run(tmp_path, model, blobs(320), None, rule("PoorWeightInitialization", steps=3), callbacks=[walks])
    assert len(walks.per_step) == 20
    touched = [step for step, n in enumerate(walks.per_step) if n]
    assert touched == [0, 1, 2, 10]  # the dense window and the saved steps, nothing else
    assert result.trial.tensor("gradient/0.weight").steps("train") == [0, 1, 2, 10]
    assert result.trial.tensor("3_relu_input").steps("train") == [0, 1, 2]
    assert walks.hooks_per_step[:3] == [2, 2, 2] and set(walks.hooks_per_step[3:]) == {0}  # gone while training
