"""The report as a job plugin: JOB/report.html written when a job ends (a training job whatever its outcome, a
tuning job when it completed); `imgtune report JOB` writes it again."""

from __future__ import annotations

import time

from imgtune.storage.jobs import Job
from imgtune.training.plugin import JobPlugin


class ReportPlugin(JobPlugin):
    name = "report"

    def on_job_end(self, job: Job, status: str) -> None:
        from imgtune.report import write_report

        started = time.perf_counter()
        path = write_report(job, status=status)  # (the job is marked so once its end hooks ran)
        seconds = time.perf_counter() - started
        job.update(timings={**job.record().timings, "report": seconds})
        job.log(f"report written to {path} in {seconds:.2f} s")


class TuningReportPlugin(JobPlugin):
    name = "tuning report"

    def on_job_end(self, job: Job, status: str) -> None:
        if status != "completed":
            return
        from imgtune.report.tuning import write_tuning_report

        job.log(f"report written to {write_tuning_report(job)}")
