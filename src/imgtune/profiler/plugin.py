"""The profiler as a job plugin: the system monitor for the job's whole life, the step timeline while it trains,
and the profiler rules at its end (their summary goes to job.json's `profiler`)."""

from __future__ import annotations

from imgtune.config import ProfilerConfig
from imgtune.profiler import ProfilerSession
from imgtune.storage.jobs import Job
from imgtune.training.callbacks import Callback
from imgtune.training.plugin import JobPlugin, TrainingRun


class ProfilerPlugin(JobPlugin):
    name = "profiler"

    def __init__(self, config: ProfilerConfig):
        self.config = config
        self.session: ProfilerSession | None = None

    def on_job_start(self, job: Job) -> None:
        self.session = ProfilerSession(job, self.config).start()  # from the start: initialisation is sampled

    def callbacks(self, run: TrainingRun) -> list[Callback]:
        if self.session is None:
            return []
        loader = run.setup.loaders["train"]
        meta = {
            "training_mode": run.setup.mode,
            "batch_size": run.config.train.batch_size,
            "num_workers": getattr(loader, "num_workers", 0),
            "pin_memory": bool(getattr(loader, "pin_memory", False)),
        }
        return [self.session.callback(meta)]

    def on_job_end(self, job: Job, status: str) -> None:
        if self.session is not None:
            job.update(profiler=self.session.finish())
