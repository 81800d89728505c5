"""The debugger as a job plugin: tensor capture and online rules on rank 0, their results in job.json."""

from __future__ import annotations

from typing import Any

from imgtune.config import DebuggerConfig, JobConfig
from imgtune.debugger.capture import DebuggerCallback
from imgtune.debugger.rules import make_rules
from imgtune.debugger.runner import RuleCallback, RuleRunner
from imgtune.training.callbacks import Callback
from imgtune.training.plugin import JobPlugin, TrainingRun

DEBUGGER_DIR = "debugger"


class DebuggerPlugin(JobPlugin):
    """Captures tensors into JOB/debugger and evaluates the configured rules as training goes (a rule in
    `stop_on` stops training); at the end, every rule's status goes to job.json's `debugger`."""

    name = "debugger"

    def __init__(self, config: DebuggerConfig):
        self.config = config
        self.capture: DebuggerCallback | None = None
        self.rule_callback: RuleCallback | None = None

    @classmethod
    def check(cls, config: JobConfig) -> None:
        debug = config.debugger
        make_rules(debug.rules, debug.rule_parameters, debug.rule_files)  # unknown rules or parameters: refused

    def callbacks(self, run: TrainingRun) -> list[Callback]:
        debug = self.config
        rules = make_rules(debug.rules, debug.rule_parameters, debug.rule_files)
        directory = run.job.path / DEBUGGER_DIR
        capture = DebuggerCallback(
            directory,
            debug,
            prefix="head." if run.setup.mode == "features" else "",
            requirements=[req for rule in rules for req in rule.requirements()],
        )
        runner = RuleRunner(rules, stop_on=debug.stop_on, on_finding=run.on_finding, log=run.log)
        self.capture, self.rule_callback = capture, RuleCallback(runner, lambda: capture.trial, directory)
        return [capture, self.rule_callback]

    def on_start_over(self, run: TrainingRun) -> None:
        if self.capture is not None:
            self.capture.writer.truncate_after(-1)

    def on_fit_abort(self, run: TrainingRun) -> None:
        """Stop the stall watchdog and release the store and hooks of a failed job."""
        if self.rule_callback is not None:
            self.rule_callback.close()
        if self.capture is not None:
            self.capture.close()

    def on_fit_end(self, run: TrainingRun, results: dict[str, Any]) -> None:
        if self.rule_callback is None or self.capture is None:
            return
        rule_results = self.rule_callback.finish()
        self.capture.close()
        results["debugger"] = {
            name: {"status": r["status"], "findings": r["finding_count"]} for name, r in rule_results.items()
        }
