"""Running rules: online as a Trainer callback, offline over a stored job.

Each rule has a status (imgtune.rules.Status): InProgress while it runs, then NoIssuesFound, IssuesFound
(with the step and evidence of each finding) or Error (the rule itself failed, with the reason). Actions on a
finding: log it, call the user's callback, and stop training when the rule is in `stop_on`.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from imgtune.core.io import atomic_write_json, now_iso
from imgtune.debugger.rules.base import Finding, Rule
from imgtune.debugger.store import RULES_FILE, Trial
from imgtune.rules import RuleResult, Status
from imgtune.training.callbacks import Callback, StopTraining

if TYPE_CHECKING:
    from imgtune.training.trainer import Trainer

MAX_FINDINGS_KEPT = 50  # per rule; the count of all findings is kept too


class RuleRunner:
    """Evaluates rules over a Trial's steps as they appear, once per step and rule."""

    def __init__(
        self,
        rules: list[Rule],
        *,
        stop_on: list[str] | None = None,
        on_finding: Callable[[str, Finding], None] | None = None,
        log: Callable[[str], None] | None = None,
    ):
        self.rules = rules
        self.stop_on = set(stop_on or [])
        self.on_finding = on_finding
        self.log = log
        self._evaluated = -1
        self._written: list[tuple[str, int]] | None = None
        self.results: dict[str, RuleResult] = {
            rule.name: RuleResult(rule.name, Status.IN_PROGRESS, parameters=rule.params, findings=[], finding_count=0)
            for rule in rules
        }

    def _add(self, rule: Rule, finding: Finding) -> bool:
        result = self.results[rule.name]
        result.finding_count += 1
        if len(result.findings) < MAX_FINDINGS_KEPT:
            result.findings.append(finding)
        if result.finding_count == 1:
            result.message = finding.message
            if self.log:
                self.log(f"rule {rule.name} found an issue at step {finding.step}: {finding.message}")
        if self.on_finding:
            try:
                self.on_finding(rule.name, finding)
            except Exception as exc:  # the user's action must not switch the rules off
                if self.log:
                    self.log(f"on_finding action failed for rule {rule.name}: {type(exc).__name__}: {exc}")
        # a rule's own stop_training_on_fire parameter (as in SageMaker's StalledTraining) acts like stop_on
        return rule.name in self.stop_on or bool(rule.params.get("stop_training_on_fire"))

    def _guarded(self, rule: Rule, call: Callable[[], Any]) -> Any:
        result = self.results[rule.name]
        if result.status == Status.ERROR:
            return None
        try:
            return call()
        except Exception as exc:
            result.status, result.traceback = Status.ERROR, traceback.format_exc()
            result.error = result.message = f"{type(exc).__name__}: {exc}"
            if self.log:
                self.log(f"rule {rule.name} failed: {type(exc).__name__}: {exc}")
            return None

    def evaluate(self, trial: Trial, until_step: int | None = None) -> str | None:
        """Invoke every rule on the steps not yet seen (up to `until_step`); a stop reason if one must stop."""
        stop = None
        steps = [s for s in trial.steps_after(self._evaluated) if until_step is None or s <= until_step]
        for step in steps:
            for rule in self.rules:
                finding = self._guarded(rule, lambda rule=rule, step=step: rule.invoke_at_step(trial, step))
                if finding is not None and self._add(rule, finding) and stop is None:
                    stop = f"debugger rule {rule.name} found an issue at step {step}: {finding.message}"
            self._evaluated = step
        return stop

    def finish(self, trial: Trial) -> dict[str, dict[str, Any]]:
        """Run end-of-training checks and settle every status; every rule's result (RuleResult.to_dict()).

        A rule whose required data was never saved ends in Error with the reason, not in NoIssuesFound.
        """
        self.evaluate(trial)
        for rule in self.rules:
            result = self.results[rule.name]
            missing = rule.missing_data(trial)
            if missing and not result.finding_count:
                result.status, result.error, result.message = Status.ERROR, missing, missing
                continue
            for finding in self._guarded(rule, lambda rule=rule: rule.finish(trial)) or []:
                self._add(rule, finding)
            if result.status != Status.ERROR:
                result.status = Status.ISSUES if result.finding_count else Status.NO_ISSUES
        return self.dicts()

    def dicts(self) -> dict[str, dict[str, Any]]:
        """Every rule's result as it stands, as rules.json holds it (rule name -> RuleResult.to_dict())."""
        return {name: result.to_dict() for name, result in self.results.items()}

    def write(self, directory: Path, durable: bool = False) -> None:
        """Write rules.json when a status or finding count changed since the last write (or when durable)."""
        signature = [(r.status, r.finding_count) for r in self.results.values()]
        if signature == self._written and not durable:
            return
        self._written = signature
        data = {"updated": now_iso(), "rules": list(self.dicts().values())}
        atomic_write_json(directory / RULES_FILE, data, durable)


class RuleCallback(Callback):
    """Runs rules online after every batch, writes their status, and stops training on request.

    When a rule has an `idle_threshold()` (StalledTraining does), a watchdog thread also calls its `on_idle`
    while no step comes (a hung data loader never reaches the next step, so a per-step check alone would
    never see it).
    """

    order = 26

    def __init__(
        self, runner: RuleRunner, trial_source: Callable[[], Trial], directory: Path, evaluate_every: float = 0.5
    ):
        self.runner = runner
        self.trial_source = trial_source
        self.directory = directory
        self.evaluate_every = evaluate_every
        self._last_evaluation = 0.0
        self._lock = threading.Lock()
        self._last_step_time = time.monotonic()
        self._watchdog: threading.Thread | None = None
        self._stopped = threading.Event()

    def on_fit_start(self, trainer: Trainer) -> None:
        self.runner.write(self.directory)
        watched = [(rule, float(t)) for rule in self.runner.rules if (t := rule.idle_threshold()) is not None]
        if watched and self._watchdog is None:
            self._last_step_time = time.monotonic()
            self._watchdog = threading.Thread(target=self._watch, args=(trainer, watched), daemon=True)
            self._watchdog.start()

    def _watch(self, trainer: Trainer, watched: list[tuple[Rule, float]]) -> None:
        reported_for: dict[str, float] = {}  # rule -> the last step time whose pause it was told about
        pause = min(min(max(threshold / 4, 0.05), 5.0) for _, threshold in watched)
        while not self._stopped.wait(pause):
            with self._lock:
                idle = time.monotonic() - self._last_step_time
                for rule, threshold in watched:
                    if idle <= threshold or reported_for.get(rule.name) == self._last_step_time:
                        continue
                    reported_for[rule.name] = self._last_step_time
                    try:  # (also when the rule's per-step check failed: a hang must still be told)
                        finding = rule.on_idle(self.trial_source(), idle)
                    except Exception as exc:
                        if self.runner.log:
                            self.runner.log(f"rule {rule.name}'s stall check failed: {type(exc).__name__}: {exc}")
                        continue
                    if finding is not None and self.runner._add(rule, finding):
                        trainer.request_stop(f"debugger rule {rule.name}: {finding.message}")
                    self.runner.write(self.directory)

    def on_batch_end(self, trainer: Trainer) -> None:
        # Rules catch up at most every `evaluate_every` seconds (and at the end, in `finish`):
        # tiny steps (a head on cached features) should not pay for rules at every batch. Rules that may
        # stop training are evaluated at every batch, so training stops at the batch that fired them.
        now = time.monotonic()
        with self._lock:
            self._last_step_time = now
            if not self.runner.stop_on and now - self._last_evaluation < self.evaluate_every:
                return
            self._last_evaluation = now
            stop = self.runner.evaluate(self.trial_source())
            self.runner.write(self.directory)  # cheap: only when a status or count changed
        if stop:
            raise StopTraining(stop)

    def close(self) -> None:
        """Stop the watchdog (also when training failed)."""
        self._stopped.set()

    def on_fit_end(self, trainer: Trainer) -> None:
        self._stopped.set()

    def on_epoch_end(self, trainer: Trainer) -> None:
        # Epochs of a head on cached features last milliseconds: they share the same time-based pace.
        now = time.monotonic()
        with self._lock:
            if not self.runner.stop_on and now - self._last_evaluation < self.evaluate_every:
                return
            self._last_evaluation = now
            stop = self.runner.evaluate(self.trial_source())
            self.runner.write(self.directory)
        if stop:
            raise StopTraining(stop)

    def finish(self) -> dict[str, dict[str, Any]]:
        self._stopped.set()
        with self._lock:
            results = self.runner.finish(self.trial_source())
            self.runner.write(self.directory, durable=True)
        return results


def run_rules_offline(trial: Trial, rules: list[Rule]) -> dict[str, dict[str, Any]]:
    """Evaluate rules over everything a stored job saved."""
    return RuleRunner(rules).finish(trial)
