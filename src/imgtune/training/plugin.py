"""Job plugins: what the debugger, profiler, report, model bundle and remote push add to a job.

A plugin has hooks at the job's start and end (on the process that owns the job) and, on each training
process, hooks that add Trainer callbacks and see training end. `imgtune.runs` picks the plugins from the job's
config and calls the hooks; the training loop knows only this contract, never a plugin.

Where a hook runs: on rank 0 only (the default: it writes into the job directory), or on every rank of a
data-parallel job when decorated with `@every_rank`. A plugin that is not `core` is optional: when one of its
hooks fails, the failure goes to the job's log and `plugin_failures`, the plugin is switched off (it still gets
`on_fit_abort` when training ends, instead of `on_fit_end`, and `on_job_end`, so it can release what it holds),
and the job goes on. A failing core plugin (the model bundle) fails the job.

Order of the hooks in one job::

    check(config)                  before the job directory exists (refuse bad settings early)
    on_job_start(job)              the job is running
      callbacks(run)               per training process: Trainer callbacks
      on_start_over(run)           a resumed job with no checkpoint starts from scratch: drop stale records
      ... training ...
      on_fit_end(run, results)     per training process, when training succeeded (after the test evaluation)
      on_fit_abort(run)            per training process, when training raised
    on_job_end(job, status)        whatever the outcome (completed, failed, stopped)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

if TYPE_CHECKING:
    import torch

    from imgtune.config import JobConfig
    from imgtune.data.dataset import PreparedData
    from imgtune.data.transforms import Preprocessing
    from imgtune.models.factory import ImageClassifier
    from imgtune.storage.jobs import Job
    from imgtune.training.callbacks import Callback
    from imgtune.training.setup import TrainingSetup

H = TypeVar("H", bound=Callable[..., Any])


def every_rank(hook: H) -> H:
    """Mark a plugin hook to run on every rank of a data-parallel job (hooks run on rank 0 only by default)."""
    hook.every_rank = True  # type: ignore[attr-defined]
    return hook


def runs_on(hook: Callable[..., Any], rank: int) -> bool:
    return rank == 0 or bool(getattr(hook, "every_rank", False))


@dataclass
class TrainingRun:
    """What one training process has built, for plugins to read: the job, its config, the data, the model and
    what the Trainer trains, and this process's rank."""

    job: Job
    config: JobConfig
    data: PreparedData
    model: ImageClassifier
    preprocessing: Preprocessing
    setup: TrainingSetup
    device: torch.device
    progress: bool = True
    rank: int = 0
    world_size: int = 1
    on_finding: Callable[[str, Any], None] | None = None
    extras: dict[str, Any] = field(default_factory=dict)  # what a plugin keeps between its hooks

    @property
    def class_ids(self) -> list[str]:
        return [c.id for c in self.data.classes]

    def log(self, message: str) -> None:
        self.job.log(message)


class JobPlugin:
    """Base class: override the hooks you need (see the module docstring)."""

    name: ClassVar[str] = "plugin"
    core: ClassVar[bool] = False

    @classmethod
    def check(cls, config: JobConfig) -> None:
        """Refuse bad settings before a job directory exists (raise a ConfigError)."""

    def on_job_start(self, job: Job) -> None:
        pass

    def callbacks(self, run: TrainingRun) -> list[Callback]:
        return []

    def on_start_over(self, run: TrainingRun) -> None:
        pass

    def on_fit_end(self, run: TrainingRun, results: dict[str, Any]) -> None:
        pass

    def on_fit_abort(self, run: TrainingRun) -> None:
        pass

    def on_job_end(self, job: Job, status: str) -> None:
        pass


# What a switched-off plugin still gets: the hooks that release what it holds (threads, files, hooks).
RELEASING = {"on_fit_end": "on_fit_abort", "on_fit_abort": "on_fit_abort", "on_job_end": "on_job_end"}


class PluginSet:
    """The plugins of one job, called hook by hook on this process's rank; isolates optional plugins' failures."""

    def __init__(self, plugins: list[JobPlugin], rank: int = 0, log: Callable[[str], None] | None = None):
        self.plugins = list(plugins)
        self.rank = rank
        self.log = log
        self.failures: list[dict[str, str]] = []
        self._off: set[int] = set()

    def call(self, hook: str, *args: Any) -> list[Any]:
        """Call `hook` on every plugin that is on and runs on this rank; returns their answers. A plugin switched
        off gets only the hooks that release what it holds (`on_fit_end` becomes `on_fit_abort`; `on_job_end`)."""
        answers = []
        for plugin in self.plugins:
            name = hook
            if id(plugin) in self._off:
                name = RELEASING.get(hook, "")
                if not name:
                    continue
            method = getattr(plugin, name)
            if not runs_on(method, self.rank):
                continue
            try:
                answers.append(method(*args) if name == hook else method(args[0]))  # on_fit_abort(run)
            except Exception as exc:
                if plugin.core:
                    raise
                error = f"{type(exc).__name__}: {exc}"
                if id(plugin) not in self._off:
                    self._off.add(id(plugin))
                    self.failures.append({"plugin": plugin.name, "hook": name, "error": error})
                if self.log is not None:
                    self.log(f"plugin {plugin.name} failed in {name} and was switched off: {error}")
        return answers

    def callbacks(self, run: TrainingRun) -> list[Callback]:
        return [callback for answer in self.call("callbacks", run) for callback in answer]
