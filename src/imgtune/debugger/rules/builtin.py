"""The built-in rules, with SageMaker Debugger's names, parameters and defaults.

SageMaker's rule code is closed; these follow its documented definitions (parameter names and defaults as
documented), with the choices the documentation leaves open written down in each docstring. Steps are
global steps; a rule looks at what was saved at a step and before it.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterator
from typing import Any

from imgtune.core.errors import ConfigError
from imgtune.debugger.capture import Requirement
from imgtune.debugger.rules.base import REGISTRY, Finding, Rule, saved
from imgtune.debugger.store import Trial


def _names_at(
    trial: Trial, step: int, collections: str | list | None, regex: str | None, default_all: bool = False
) -> list[str]:
    """Tensors saved at `step` chosen by collection names (list or 'a,b') and/or a regex (their union)."""
    if isinstance(collections, str):
        collections = [c.strip() for c in collections.split(",") if c.strip()]
    chosen: set[str] = set()
    for collection in collections or []:
        chosen.update(trial.tensor_names(collection=collection))
    if regex:
        chosen.update(trial.tensor_names(regex=regex))
    if not collections and not regex and default_all:
        chosen.update(trial.tensor_names())
    return sorted(n for n in chosen if trial.tensor(n).has(step))


def _require_scope(rule: Rule) -> None:
    if not rule.collection_names and not rule.tensor_regex:
        raise ConfigError(
            f"rule {rule.name} needs collection_names or tensor_regex", "e.g. --param collection_names=weights"
        )


def _scalar_series(trial: Trial, name: str, mode: str, until: int) -> list[tuple[int, float]]:
    if not trial.has_tensor(name):
        return []
    return [(s, v) for s, v in trial.tensor(name).reductions("mean", mode).items() if s <= until]


class VanishingGradient(Rule):
    """Fires when a gradient's mean absolute value, mean(|g|), is below `threshold` at a step."""

    parameters = {"threshold": 0.0000001}
    description = "gradients too small to train"
    advice = (
        "Gradients are vanishing: use ReLU-family activations, normalisation layers, or a higher "
        "learning rate for the layers that stop learning."
    )

    def requirements(self) -> list[Requirement]:
        return [Requirement("gradients")]

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        for name in trial.tensor_names(collection="gradients"):
            series = trial.tensor(name)
            if not series.has(step, "train"):
                continue
            r = series._record(step, "train")["r"]
            mean_abs = r["l1"] / r["numel"] if r["numel"] else 0.0
            if mean_abs < self.threshold:
                return Finding(
                    step,
                    f"mean |gradient| of {name} is {mean_abs:.3g} < {self.threshold:g}",
                    name,
                    {"mean_abs": mean_abs, "threshold": self.threshold},
                )
        return None


class ExplodingTensor(Rule):
    """Fires when a tensor holds NaN (or, unless `only_nan`, infinite) values; all tensors by default."""

    parameters = {"collection_names": None, "tensor_regex": None, "only_nan": False}
    description = "NaN or infinite values"
    advice = "Values overflowed: lower the learning rate, clip gradients, or check the inputs for NaN."

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        for name in _names_at(trial, step, self.collection_names, self.tensor_regex, default_all=True):
            series = trial.tensor(name)
            for mode in series.by_mode:
                if step in series.by_mode[mode]:
                    r = series.by_mode[mode][step]["r"]
                    bad = r["nan"] + (0 if self.only_nan else r["inf"])
                    if bad:
                        return Finding(
                            step,
                            f"{name} has {int(r['nan'])} NaN and {int(r['inf'])} infinite values",
                            name,
                            {"nan": r["nan"], "inf": r["inf"], "mode": mode},
                        )
        return None


class PoorWeightInitialization(Rule):
    """Looks at the first `steps` training steps. Fires when, at a step, the variances of the activation
    inputs matching `activation_inputs_regex` differ across layers by more than `threshold` (max/min), when
    a weight gradient's spread (P95 - P5, from its histogram) is below `distribution_range`, or when the mean
    loss of the last `patience` steps of the window is not below that of its first `patience` steps.
    """

    parameters = {
        "activation_inputs_regex": ".*relu_input",
        "threshold": 10.0,
        "distribution_range": 0.001,
        "patience": 5,
        "steps": 10,
    }
    description = "a bad start: uneven activations, no gradient spread, or a loss that does not fall"
    advice = "The start was poor: check the head's initialisation and the input normalisation."

    def requirements(self) -> list[Requirement]:
        return [
            Requirement("activations", self.activation_inputs_regex, until_step=int(self.steps)),
            Requirement("gradients", r"gradient/.*weight", until_step=int(self.steps)),
        ]

    def _in_window(self, trial: Trial, step: int) -> int | None:
        if not trial.has_tensor("loss") or not trial.tensor("loss").has(step, "train"):
            return None
        mode_step = trial.tensor("loss").mode_step(step, "train")
        return mode_step if mode_step < self.steps else None

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        mode_step = self._in_window(trial, step)
        if mode_step is None:
            return None
        variances = {
            n: trial.tensor(n).reduction(step, "std", "train") ** 2
            for n in trial.tensor_names(regex=self.activation_inputs_regex)
            if trial.tensor(n).has(step, "train")
        }
        if len(variances) >= 2 and min(variances.values()) > 0:
            ratio = max(variances.values()) / min(variances.values())
            if ratio > self.threshold:
                return Finding(
                    step,
                    f"activation-input variances differ {ratio:.1f}x across layers (> {self.threshold:g})",
                    None,
                    {"variances": variances, "ratio": ratio},
                )
        for name in trial.tensor_names(collection="gradients"):
            series = trial.tensor(name)
            if series.has(step, "train") and series.reduction(step, "numel", "train") > 1 and "bias" not in name:
                spread = _percentile_spread(series.histogram(step, "train"))
                if spread is not None and spread < self.distribution_range:
                    return Finding(
                        step,
                        f"gradient {name} spans only {spread:.3g} between P5 and P95 (< {self.distribution_range:g})",
                        name,
                        {"p95_minus_p5": spread},
                    )
        if mode_step == self.steps - 1:
            return self._flat_loss(trial, step)
        return None

    def _flat_loss(self, trial: Trial, step: int) -> Finding | None:
        losses = [v for _, v in _scalar_series(trial, "loss", "train", step)][: int(self.steps)]
        k = int(self.patience)
        if len(losses) < 2 * k:
            return None
        first, last = statistics.fmean(losses[:k]), statistics.fmean(losses[-k:])
        if not last < first:
            return Finding(
                step,
                f"the loss did not fall in the first {len(losses)} steps ({first:.4f} -> {last:.4f})",
                "loss",
                {"first_mean": first, "last_mean": last},
            )
        return None

    def finish(self, trial: Trial) -> list[Finding]:
        steps = trial.tensor("loss").steps("train") if trial.has_tensor("loss") else []
        if 0 < len(steps) < self.steps:  # a run shorter than the window: judge the loss over what there is
            finding = self._flat_loss(trial, steps[-1])
            return [finding] if finding else []
        return []


def _percentile_spread(histogram: dict[str, Any] | None) -> float | None:
    if not histogram:
        return None
    counts, lo, hi = histogram["counts"], histogram["min"], histogram["max"]
    total = sum(counts)
    if total == 0:
        return None
    width = (hi - lo) / len(counts)

    def percentile(q: float) -> float:
        target, seen = q * total, 0
        for i, c in enumerate(counts):
            if seen + c >= target:
                return lo + width * (i + ((target - seen) / c if c else 0))
            seen += c
        return hi

    return percentile(0.95) - percentile(0.05)


class LossNotDecreasing(Rule):
    """Every `num_steps` saved losses of a mode, compares the mean of the last `num_steps` losses with the
    mean of the `num_steps` before them. Fires when it fell by less than `diff_percent` %, or rose by more
    than `increase_threshold_percent` %. `mode` None: the EVAL losses, or the TRAIN losses of a run that has
    no EVAL losses (judged when it ends).
    """

    parameters = {
        "collection_names": None,
        "tensor_regex": None,
        "use_losses_collection": True,
        "num_steps": 10,
        "diff_percent": 0.1,
        "increase_threshold_percent": 5.0,
        "mode": None,
    }
    description = "the loss stopped falling"
    advice = "The loss stopped falling: raise or schedule the learning rate, or check the labels."

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._windows: dict[tuple[str, str], tuple[int, list[float]]] = {}  # (loss, mode) -> (count, last 2n)

    def _losses(self, trial: Trial) -> list[str]:
        names = set(trial.tensor_names(collection="losses")) if self.use_losses_collection else set()
        for collection in [c for c in str(self.collection_names or "").split(",") if c]:
            names.update(trial.tensor_names(collection=collection))
        if self.tensor_regex:
            names.update(trial.tensor_names(regex=self.tensor_regex))
        return sorted(names)

    def _check(self, name: str, mode: str, step: int, value: float) -> Finding | None:
        n = int(self.num_steps)
        count, values = self._windows.get((name, mode), (0, []))
        values = [*values[-(2 * n - 1) :], value]
        count += 1
        self._windows[(name, mode)] = (count, values)
        if count < 2 * n or count % n:
            return None
        before, now = statistics.fmean(values[:n]), statistics.fmean(values[n:])
        change = (before - now) / abs(before) * 100 if before else 0.0
        evidence = {"before": before, "now": now, "decrease_percent": change, "mode": mode}
        if -change > self.increase_threshold_percent:
            message = f"{mode} {name} rose {-change:.1f}% over the last {n} steps ({before:.4f} -> {now:.4f})"
            return Finding(step, message, name, evidence)
        if change < self.diff_percent:
            message = f"{mode} {name} fell only {change:.2f}% over the last {n} steps ({before:.4f} -> {now:.4f})"
            return Finding(step, message, name, evidence)
        return None

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        mode = str(self.mode).lower() if self.mode else "eval"
        for name in self._losses(trial):
            record = trial.tensor(name).by_mode.get(mode, {}).get(step)
            if record is not None and (finding := self._check(name, mode, step, record["r"]["mean"])):
                return finding
        return None

    def finish(self, trial: Trial) -> list[Finding]:
        names = self._losses(trial)
        if self.mode or any(trial.tensor(n).by_mode.get("eval") for n in names):
            return []
        findings = []  # no EVAL losses at all: judge the TRAIN losses
        for name in names:
            for step, record in sorted(trial.tensor(name).by_mode.get("train", {}).items()):
                if finding := self._check(name, "train", step, record["r"]["mean"]):
                    findings.append(finding)
        return findings


def _epoch_metrics(trial: Trial, step: int) -> list[tuple[int, float, float]]:
    """(step, train_loss, valid_loss) of every finished epoch up to `step` (the metrics collection);
    empty unless `step` is an epoch end, so that rules do their work once per epoch."""
    if not (trial.has_tensor("train_loss") and trial.has_tensor("valid_loss")):
        return []
    if step not in trial.tensor("valid_loss").by_mode.get("train", {}):
        return []
    train = trial.tensor("train_loss").reductions("mean", "train")
    valid = trial.tensor("valid_loss").reductions("mean", "train")
    return [(s, train[s], valid[s]) for s in sorted(valid) if s in train and s <= step]


class Overfit(Rule):
    """At each epoch end from `start_step` on, r = (valid_loss - train_loss) / train_loss (epoch means,
    per sample). Fires when r > `ratio_threshold` for `patience` epochs in a row."""

    parameters = {"tensor_regex": None, "start_step": 0, "patience": 1, "ratio_threshold": 0.1}
    description = "validation loss well above training loss"
    advice = (
        "Validation loss departs from training loss: add augmentation (train.augment_views), dropout, "
        "weight decay, or stop earlier."
    )

    def missing_data(self, trial: Trial) -> str | None:
        if not trial.has_tensor("valid_loss"):
            return "the job has no validation split, so training and validation losses cannot be compared"
        return super().missing_data(trial)

    def requirements(self) -> list[Requirement]:
        return [Requirement("metrics")]

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        epochs = [e for e in _epoch_metrics(trial, step) if e[0] >= self.start_step]
        if not epochs or epochs[-1][0] != step:
            return None
        ratios = [(v - t) / t if t > 0 else math.inf for _, t, v in epochs]
        recent = ratios[-int(self.patience) :]
        if len(recent) == self.patience and all(r > self.ratio_threshold for r in recent):
            _, train, valid = epochs[-1]
            return Finding(
                step,
                f"valid loss {valid:.4f} is {ratios[-1]:.0%} above train loss {train:.4f}",
                "valid_loss",
                {"train_loss": train, "valid_loss": valid, "ratio": ratios[-1]},
            )
        return None


class Overtraining(Rule):
    """At each epoch end: fires when the training loss has not improved by more than `delta` for
    `patience_train` epochs, or the validation loss for `patience_validation` epochs."""

    parameters = {"patience_train": 5, "patience_validation": 10, "delta": 0.01}
    description = "training goes on without improving"
    advice = "Validation stopped improving: stop earlier (train.early_stopping) — the best epoch is kept."

    def requirements(self) -> list[Requirement]:
        return [Requirement("metrics")]

    @staticmethod
    def _epochs_since_best(values: list[float], delta: float) -> int:
        best, since = math.inf, 0
        for value in values:
            if value < best - delta:
                best, since = value, 0
            else:
                since += 1
        return since

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        if not trial.has_tensor("train_loss") or not trial.tensor("train_loss").has(step, "train"):
            return None  # judged once per epoch end; a job without a validation split is judged on train loss
        train = [v for s, v in trial.tensor("train_loss").reductions("mean", "train").items() if s <= step]
        valid = []
        if trial.has_tensor("valid_loss"):
            valid = [v for s, v in trial.tensor("valid_loss").reductions("mean", "train").items() if s <= step]
        train_since = self._epochs_since_best(train, self.delta)
        valid_since = self._epochs_since_best(valid, self.delta) if valid else 0
        evidence = {"epochs_without_train_improvement": train_since, "epochs_without_valid_improvement": valid_since}
        if valid and valid_since >= self.patience_validation:
            message = f"valid loss has not improved by {self.delta} for {valid_since} epochs"
            return Finding(step, message, "valid_loss", evidence)
        if train_since >= self.patience_train:
            message = f"train loss has not improved by {self.delta} for {train_since} epochs"
            return Finding(step, message, "train_loss", evidence)
        return None


class _JudgedOnceRule(Rule, register=False):
    """A rule that judges once, when enough samples were seen (or at the end with what there is)."""

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._done = False

    def _judge(self, trial: Trial, step: int, final: bool) -> Finding | None:
        raise NotImplementedError

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        return self._judge(trial, step, final=False)

    def finish(self, trial: Trial) -> list[Finding]:
        steps = trial.steps("train")
        finding = self._judge(trial, steps[-1], final=True) if steps else None
        return [finding] if finding else []


class ClassImbalance(_JudgedOnceRule):
    """Once `samples` training labels were seen: fires when the most frequent class is more than
    `threshold_imbalance` times as frequent as the rarest, or when a class is mispredicted more often than
    `threshold_misprediction`."""

    parameters = {
        "threshold_imbalance": 10,
        "threshold_misprediction": 0.7,
        "samples": 500,
        "argmax": False,
        "labels_regex": ".*labels",
        "predictions_regex": ".*predictions",
    }
    description = "some classes are rare or mostly mispredicted"
    advice = "Some classes dominate: balance the data or weight the loss."

    def requirements(self) -> list[Requirement]:
        return [Requirement("predictions", until_step=int(self.samples))]

    def _counts(self, trial: Trial, step: int) -> tuple[dict[int, int], dict[int, int]] | None:
        labels = trial.tensor_names(regex=self.labels_regex)
        predictions = trial.tensor_names(regex=self.predictions_regex)
        if not labels or not predictions:
            return None
        lab, pred = trial.tensor(labels[0]), trial.tensor(predictions[0])
        counts: dict[int, int] = {}
        wrong: dict[int, int] = {}
        for s in lab.steps("train"):
            if s > step or not pred.has(s, "train"):
                continue
            for y, p in zip(lab._record(s, "train")["values"], pred._record(s, "train")["values"], strict=True):
                counts[y] = counts.get(y, 0) + 1
                wrong[y] = wrong.get(y, 0) + (p != y)
        return counts, wrong

    def _judge(self, trial: Trial, step: int, final: bool) -> Finding | None:
        if self._done:
            return None
        result = self._counts(trial, step)
        if result is None:
            return None
        counts, wrong = result
        seen = sum(counts.values())
        if seen < self.samples and not final or not counts:
            return None
        self._done = True
        ratio = max(counts.values()) / min(counts.values())
        if ratio > self.threshold_imbalance:
            return Finding(
                step,
                f"class counts differ {ratio:.1f}x (> {self.threshold_imbalance}) in {seen} samples",
                None,
                {"counts": counts, "ratio": ratio},
            )
        rates = {c: wrong[c] / counts[c] for c in counts}
        worst = max(rates, key=rates.get)
        if rates[worst] > self.threshold_misprediction:
            return Finding(
                step,
                f"class {worst} is mispredicted {rates[worst]:.0%} of the time",
                None,
                {"misprediction_rates": rates},
            )
        return None


def _activity_finding(rule: Rule, trial: Trial, step: int, regex: str, what: str) -> Finding | None:
    """Fires when more than `threshold_layer` % of a layer's channels are active less than
    `threshold_inactivity` % of the time (from the capture's per-channel activity histogram)."""
    for name in trial.tensor_names(regex=regex):
        series = trial.tensor(name)
        if not series.has(step, "train"):
            continue
        activity = series._record(step, "train").get("activity")
        if not activity:
            continue
        hist = activity["hist"]
        channels = sum(hist)
        inactive = sum(c for pct, c in enumerate(hist) if pct < rule.threshold_inactivity)
        share = 100 * inactive / channels if channels else 0.0
        if share > rule.threshold_layer:
            return Finding(
                step,
                f"{share:.0f}% of the channels of {name} are {what}",
                name,
                {"channels": channels, "inactive_channels": inactive, "percent": share},
            )
    return None


class DeadRelu(Rule):
    """Per ReLU output: a channel is dead when it is positive less than `threshold_inactivity` % of the time
    in a saved batch; fires when more than `threshold_layer` % of a layer's channels are dead."""

    parameters = {"tensor_regex": ".*relu_output", "threshold_inactivity": 1.0, "threshold_layer": 50.0}
    description = "ReLU units that never fire"
    advice = "Many ReLUs never fire: lower the learning rate or use LeakyReLU."

    def requirements(self) -> list[Requirement]:
        return [Requirement("activations", self.tensor_regex, activity=(0.0, math.inf))]

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        return _activity_finding(self, trial, step, self.tensor_regex, "dead")


class SaturatedActivation(Rule):
    """Per tanh/sigmoid input: a channel is saturated when its values lie inside the non-flat range
    (threshold_*_min, threshold_*_max) less than `threshold_inactivity` % of the time; fires when more than
    `threshold_layer` % of a layer's channels are saturated."""

    parameters = {
        "collection_names": None,
        "tensor_regex": ".*tanh_input|.*sigmoid_input",
        "threshold_tanh_min": -9.4999,
        "threshold_tanh_max": 9.4999,
        "threshold_sigmoid_min": -23.0,
        "threshold_sigmoid_max": 16.99999,
        "threshold_inactivity": 1.0,
        "threshold_layer": 50.0,
    }
    description = "tanh/sigmoid units stuck in their flat ends"
    advice = "Activations saturate: normalise inputs or use non-saturating activations."

    def requirements(self) -> list[Requirement]:
        bounds = {
            "tanh": (self.threshold_tanh_min, self.threshold_tanh_max),
            "sigmoid": (self.threshold_sigmoid_min, self.threshold_sigmoid_max),
        }
        return [
            Requirement("activations", part, activity=bounds["tanh" if "tanh" in part else "sigmoid"])
            for part in self.tensor_regex.split("|")
        ]

    def missing_data(self, trial: Trial) -> str | None:
        if any(saved(trial, r) for r in self.requirements()):  # tanh or sigmoid inputs are enough
            return None
        return f"no activations matching {self.tensor_regex!r} were saved (does the model have tanh or sigmoid?)"

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        return _activity_finding(self, trial, step, self.tensor_regex, "saturated")


class WeightUpdateRatio(Rule):
    """At a saved training step: ratio = |w_after - w_before| / (|w_before| + epsilon) (L2 norms, one
    optimizer step); fires when ratio > `large_threshold` or < `small_threshold`. `num_steps`: check every
    num_steps-th saved step only (None: every one)."""

    parameters = {"num_steps": None, "large_threshold": 10.0, "small_threshold": 0.00000001, "epsilon": 0.000000001}
    description = "weight updates far too large or too small for their weights"
    advice = (
        "Updates are far out of scale with their weights: lower the learning rate when they are too "
        "large; when they are too small, raise it, or check that the layer is not frozen or starved of gradient."
    )

    def requirements(self) -> list[Requirement]:
        return [Requirement("weights"), Requirement("weight_updates")]

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        for name in trial.tensor_names(collection="weights"):
            series = trial.tensor(name)
            if not series.has(step, "train"):
                continue
            record = series._record(step, "train")
            if "update" not in record:
                continue
            if self.num_steps and record["mode_step"] % int(self.num_steps):
                continue
            ratio = record["update"]["l2"] / (record["update"]["prev_l2"] + self.epsilon)
            if ratio > self.large_threshold or ratio < self.small_threshold:
                size = "large" if ratio > self.large_threshold else "small"
                return Finding(
                    step,
                    f"update/weight ratio of {name} is {ratio:.3g} (too {size})",
                    name,
                    {"ratio": ratio, **record["update"]},
                )
        return None


class _ScopedRule(Rule, register=False):
    """A rule over tensors chosen by `collection_names` and/or `tensor_regex` (one of them is required)."""

    def __init__(self, **params: Any):
        super().__init__(**params)
        _require_scope(self)

    def records_at(self, trial: Trial, step: int) -> Iterator[tuple[str, str, dict[str, Any]]]:
        """(tensor name, mode, record) of every chosen tensor saved at `step`."""
        for name in _names_at(trial, step, self.collection_names, self.tensor_regex):
            for mode, records in trial.tensor(name).by_mode.items():
                if step in records:
                    yield name, mode, records[step]


class AllZero(_ScopedRule):
    """Fires when at least `threshold` % of a chosen tensor's values are zero."""

    parameters = {"collection_names": None, "tensor_regex": None, "threshold": 100.0}
    description = "tensors that are all zeros"
    advice = (
        "A tensor is all zeros: check that its layer gets input and gradient (not disconnected, frozen by "
        "mistake, initialised to zero, or behind dead ReLUs)."
    )

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        for name, mode, record in self.records_at(trial, step):
            zeros = 100 * record["r"]["zeros"]
            if zeros >= self.threshold:
                return Finding(step, f"{zeros:.0f}% of {name} is zero", name, {"zero_percent": zeros, "mode": mode})
        return None


class UnchangedTensor(_ScopedRule):
    """Fires when a chosen tensor's last `num_steps` saved values are equal within (rtol, atol), compared
    through their reductions (min, max, mean, std, l2)."""

    parameters = {
        "collection_names": None,
        "tensor_regex": None,
        "num_steps": 3,
        "rtol": 1e-05,
        "atol": 1e-08,
        "equal_nan": False,
    }
    description = "tensors that stop changing"
    advice = (
        "A tensor stopped changing: check that its parameters are given to the optimizer and not frozen "
        "by mistake, that the learning rate is not zero, and that gradients reach the layer."
    )

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._recent: dict[tuple[str, str], list[tuple[int, list[float]]]] = {}

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        n = int(self.num_steps)
        for name, mode, record in self.records_at(trial, step):
            recent = self._recent.setdefault((name, mode), [])
            recent.append((step, [record["r"][k] for k in ("min", "max", "mean", "std", "l2")]))
            del recent[:-n]
            if len(recent) == n and all(self._close(recent[0][1], v) for _, v in recent[1:]):
                message = f"{name} has not changed over its last {n} saved steps"
                return Finding(step, message, name, {"steps": [s for s, _ in recent], "mode": mode})
        return None

    def _close(self, a: list[float], b: list[float]) -> bool:
        for x, y in zip(a, b, strict=True):
            if math.isnan(x) or math.isnan(y):
                if not (self.equal_nan and math.isnan(x) and math.isnan(y)):
                    return False
            elif abs(x - y) > self.atol + self.rtol * abs(y):
                return False
        return True


class TensorVariance(_ScopedRule):
    """Fires when a chosen tensor's variance is above `max_threshold` or below `min_threshold` (a bound left
    as None is not checked)."""

    parameters = {"collection_names": None, "tensor_regex": None, "max_threshold": None, "min_threshold": None}
    description = "tensor variance out of bounds"
    advice = (
        "A variance out of bounds: too high points at exploding values (lower the learning rate, clip "
        "gradients, normalise inputs); too low at collapsed ones (check the initialisation and for dead units)."
    )

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        for name, mode, record in self.records_at(trial, step):
            variance = record["r"]["std"] ** 2
            too_high = self.max_threshold is not None and variance > float(self.max_threshold)
            too_low = self.min_threshold is not None and variance < float(self.min_threshold)
            if too_high or too_low:
                message = f"variance of {name} is {variance:.3g} (too {'high' if too_high else 'low'})"
                return Finding(step, message, name, {"variance": variance, "mode": mode})
        return None


class StalledTraining(Rule):
    """Fires when no step was saved for `threshold` seconds (wall clock; the loss records carry time).
    Online, a watchdog also reports a stall while it lasts; `stop_training_on_fire` stops the job."""

    parameters = {"threshold": 1800, "stop_training_on_fire": False, "training_job_name_prefix": None}
    description = "no progress for a long time"
    advice = "Training made no progress for a while: check the data loader and the machine."

    def __init__(self, **params: Any):
        super().__init__(**params)
        self._last_time: float | None = None
        self.stall_reported = False  # set by the online watchdog

    def idle_threshold(self) -> float | None:
        return float(self.threshold)

    def on_idle(self, trial: Trial, seconds: float) -> Finding | None:
        self.stall_reported = True  # the step that ends this stall need not report it again
        steps = trial.steps()
        return Finding(
            steps[-1] + 1 if steps else 0,  # the step being waited for
            f"no step for {seconds:.1f} s (> {float(self.threshold):g} s): training is stalled",
            "loss",
            {"seconds": seconds, "watchdog": True},
        )

    def invoke_at_step(self, trial: Trial, step: int) -> Finding | None:
        if not trial.has_tensor("loss"):
            return None
        record = next((r[step] for r in trial.tensor("loss").by_mode.values() if step in r), None)
        if record is None or "t" not in record:
            return None
        last, self._last_time = self._last_time, record["t"]
        if record.get("resumed"):  # the time a job lay killed before its resume is no stall
            return None
        if last is not None and record["t"] - last > self.threshold:
            if self.stall_reported:
                self.stall_reported = False
                return None
            gap = record["t"] - last
            return Finding(
                step, f"no step for {gap:.0f} s before step {step} (> {self.threshold} s)", "loss", {"seconds": gap}
            )
        return None


class CheckInputImages(_JudgedOnceRule):
    """Once `threshold_samples` input images were seen: fires when the mean of a channel (normalised input)
    is further than `threshold_mean` from 0, i.e. the images are not normalised. Reads the `inputs`
    collection's per-channel means; with the feature cache the inputs are features, not images."""

    parameters = {"threshold_mean": 0.2, "threshold_samples": 500, "regex": "inputs_channel.*_mean", "channel": 1}
    description = "input images not normalised"
    advice = (
        "Normalise the input images with the mean and standard deviation the backbone was pretrained "
        "with (the preprocessing of the model's weights), so each channel is centred near 0."
    )

    def requirements(self) -> list[Requirement]:
        return [Requirement("inputs", until_step=int(self.threshold_samples))]

    def missing_data(self, trial: Trial) -> str | None:
        if trial.tensor_names(regex=self.regex):
            return None
        return "no per-channel means of input images were saved (with the feature cache, inputs are features)"

    def _judge(self, trial: Trial, step: int, final: bool) -> Finding | None:
        names = trial.tensor_names(regex=self.regex)
        if self._done or not trial.has_tensor("inputs") or not names:
            return None
        series = trial.tensor("inputs")
        images = sum(series._record(s, "train").get("batch", 0) for s in series.steps("train") if s <= step)
        if images < self.threshold_samples and not final:
            return None
        self._done = True
        means = {n: statistics.fmean(trial.tensor(n).reductions("mean", "train").values()) for n in names}
        worst = max(means, key=lambda n: abs(means[n]))
        if abs(means[worst]) > self.threshold_mean:
            return Finding(
                step,
                f"input {worst} is {means[worst]:.3f} (|mean| > {self.threshold_mean}) over "
                f"{images} images: they are not normalised",
                worst,
                {"channel_means": means, "images": images},
            )
        return None


BUILTIN_RULES = [cls for name, cls in REGISTRY.items() if cls.__module__ == __name__]
