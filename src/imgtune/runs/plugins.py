"""Which plugins a job gets, from its config, in the order their hooks run; and the two plugins that belong
to no feature package: the model bundle (core: a job without its model failed) and the remote push."""

from __future__ import annotations

from typing import Any

from imgtune.config import JobConfig
from imgtune.debugger.plugin import DebuggerPlugin
from imgtune.models.bundle import save_bundle
from imgtune.profiler.plugin import ProfilerPlugin
from imgtune.report.plugin import ReportPlugin
from imgtune.training.callbacks import Callback
from imgtune.training.plugin import JobPlugin, TrainingRun
from imgtune.training.standard_callbacks import RemotePush


class BundlePlugin(JobPlugin):
    """Writes the model bundle (JOB/model) when training succeeded."""

    name = "model bundle"
    core = True

    def on_fit_end(self, run: TrainingRun, results: dict[str, Any]) -> None:
        save_bundle(
            run.model.cpu(),
            run.data.classes,
            run.preprocessing,
            run.job.model_dir,
            extra={
                "job": run.job.name,
                "metrics": {"test": results.get("test", {}).get("accuracy"), "best": results["best"]},
            },
        )


class RemotePushPlugin(JobPlugin):
    """In an s3:// workspace, pushes the job after epochs (the lifecycle pushes it at every status change and at
    its end)."""

    name = "remote push"

    def callbacks(self, run: TrainingRun) -> list[Callback]:
        return [RemotePush(run.job)] if run.job.remote is not None else []


def training_plugins(config: JobConfig) -> list[JobPlugin]:
    """A training job's plugins: the profiler first (its monitor samples the whole job, and the report reads its
    results), the debugger, the bundle, the remote push, and the report last."""
    plugins: list[JobPlugin] = []
    if config.profiler.enabled:
        plugins.append(ProfilerPlugin(config.profiler))
    if config.debugger.enabled:
        plugins.append(DebuggerPlugin(config.debugger))
    plugins += [BundlePlugin(), RemotePushPlugin()]
    if config.profiler.report:
        plugins.append(ReportPlugin())
    return plugins + tracking_plugins(config)


def tracking_plugins(config: JobConfig) -> list[JobPlugin]:
    """The trackers a training job reports to, last: they send on what the other plugins wrote. Tuning trials
    trained as batches of heads get these alone (they have no debugger, profiler or report)."""
    plugins: list[JobPlugin] = []
    if config.tracking.mlflow:
        from imgtune.tracking.mlflow_run import MlflowPlugin

        plugins.append(MlflowPlugin(config))
    if config.tracking.tensorboard:
        from imgtune.tracking.tensorboard import TensorBoardPlugin

        plugins.append(TensorBoardPlugin())
    return plugins


def check_plugins(config: JobConfig) -> None:
    """Every plugin's settings checked before a job directory exists."""
    for plugin in training_plugins(config):
        plugin.check(config)
