"""The profiler as a job plugin: the system monitor for the job's whole life, the step timeline while it trains,
and the profiler rules at its end (their summary goes to job.json's `profiler`).

In a data-parallel job the training hooks run on every rank, each in its own process: each rank records its own
step timeline (and the first rank of each node its node's samples), and closes them when its training ends,
before the job's process evaluates the rules over all of them.
"""

from __future__ import annotations

from typing import Any

from imgtune.config import ProfilerConfig
from imgtune.profiler import ProfilerSession, RankSession
from imgtune.storage.jobs import Job
from imgtune.training.callbacks import Callback
from imgtune.training.plugin import JobPlugin, TrainingRun, every_rank


class ProfilerPlugin(JobPlugin):
    name = "profiler"

    def __init__(self, config: ProfilerConfig):
        self.config = config
        self.session: ProfilerSession | None = None
        self.rank_session: RankSession | None = None

    def on_job_start(self, job: Job) -> None:
        self.session = ProfilerSession(job, self.config).start()  # from the start: initialisation is sampled

    @every_rank
    def callbacks(self, run: TrainingRun) -> list[Callback]:
        loader = run.setup.loaders["train"]
        meta = {
            "training_mode": run.setup.mode,
            "batch_size": run.config.train.batch_size,
            "num_workers": getattr(loader, "num_workers", 0),
            "pin_memory": bool(getattr(loader, "pin_memory", False)),
        }
        steps_per_epoch = len(loader) if hasattr(loader, "__len__") else None
        if self.session is None:  # a Ray Train worker: the job's process (which has the session) is another
            self._close_rank()  # (a plugin object reused for a second training in one process)
            self.rank_session = RankSession(run.job, self.config, run.rank, run.world_size).start()
            return [self.rank_session.callback(meta, steps_per_epoch)]
        return [self.session.callback(meta, steps_per_epoch)]

    @every_rank
    def on_fit_end(self, run: TrainingRun, results: dict[str, Any]) -> None:
        self._close_rank()

    @every_rank
    def on_fit_abort(self, run: TrainingRun) -> None:
        self._close_rank()

    def _close_rank(self) -> None:
        if self.rank_session is not None:
            session, self.rank_session = self.rank_session, None
            session.close()

    def on_job_end(self, job: Job, status: str) -> None:
        if self.session is not None:
            job.update(profiler=self.session.finish())
