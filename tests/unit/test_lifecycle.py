"""The one job lifecycle (imgtune.runs.lifecycle) and the plugin contract, on jobs whose body is a function:
statuses, timings, hooks in order, optional and core plugins failing, the lock, resume checks, the typed record."""

from __future__ import annotations

import sys

import pytest

from imgtune.core.errors import JobError
from imgtune.runs.lifecycle import JobLifecycle, amend_job
from imgtune.storage.jobs import Job
from imgtune.storage.record import JobRecord
from imgtune.training.plugin import JobPlugin, PluginSet, every_rank


class Recording(JobPlugin):
    name = "recording"

    def __init__(self):
        self.calls: list[tuple[str, str | None]] = []

    def on_job_start(self, job):
        self.calls.append(("start", job.record().status))

    def on_job_end(self, job, status):
        self.calls.append(("end", status))


class Failing(JobPlugin):
    name = "failing"

    def __init__(self, hook: str, core: bool = False):
        self.hook = hook
        self.core = core  # an instance attribute shadows the class's
        self.ended = False

    def on_job_start(self, job):
        if self.hook == "on_job_start":
            raise RuntimeError("monitor broke")

    def on_job_end(self, job, status):
        if self.hook == "on_job_end":
            raise RuntimeError("could not push the trials")
        self.ended = True


def new_job(tmp_path, plugins=(), name="j", kind="training") -> JobLifecycle:
    return JobLifecycle.create(tmp_path, JobRecord(name=name, kind=kind), prefix=kind, plugins=list(plugins))


def test_a_job_that_succeeds_is_completed_with_its_results_and_timings(tmp_path):
    plugin = Recording()
    life = new_job(tmp_path, [plugin])

    def body(life):
        life.timings["work"] = 1.5
        return {"epochs_run": 3}

    job = life.run(body)
    record = job.record()
    assert (record.status, record.epochs_run, record.timings["work"]) == ("completed", 3, 1.5)
    assert record.started and record.finished and record.seconds >= 0 and record.kind == "training"
    assert plugin.calls == [("start", "running"), ("end", "completed")]
    assert "completed" in job.log_file.read_text()
    with job.lock():  # released at the end
        pass


def test_a_failing_job_records_why_and_the_exception_goes_on(tmp_path):
    plugin = Recording()
    life = new_job(tmp_path, [plugin])

    def body(life):
        raise ValueError("the data went away")

    with pytest.raises(ValueError, match="went away"):
        life.run(body)
    record = Job.open("j", tmp_path).record()
    assert record.status == "failed" and record.error == "ValueError: the data went away"
    assert plugin.calls[-1] == ("end", "failed")
    assert "Traceback" in (tmp_path / "j" / "logs.txt").read_text()


def test_ctrl_c_stops_a_job_resumably(tmp_path):
    life = new_job(tmp_path)

    def body(life):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        life.run(body)
    job = Job.open("j", tmp_path)
    assert job.status() == "stopped"
    resumed = JobLifecycle.resume("j", tmp_path, "training")
    assert resumed.resumed and resumed.job.path == job.path
    assert resumed.run(lambda life: {}).record().status == "completed"


def test_an_optional_plugin_that_fails_is_switched_off_and_reported(tmp_path):
    failing, recording = Failing("on_job_start"), Recording()
    job = new_job(tmp_path, [failing, recording]).run(lambda life: {})
    record = job.record()
    assert record.status == "completed"
    assert record.plugin_failures == [
        {"plugin": "failing", "hook": "on_job_start", "error": "RuntimeError: monitor broke"}
    ]
    assert failing.ended  # switched off, it still gets on_job_end, to release what it holds
    assert recording.calls[-1] == ("end", "completed")


def test_a_core_plugin_that_fails_fails_the_command(tmp_path):
    with pytest.raises(RuntimeError, match="could not push"):
        new_job(tmp_path, [Failing("on_job_end", core=True)]).run(lambda life: {})


def test_hooks_run_on_rank_zero_unless_marked_for_every_rank():
    class Ranked(JobPlugin):
        seen: list[str] = []

        def on_job_start(self, job):
            self.seen.append("rank-zero hook")

        @every_rank
        def on_fit_abort(self, run):
            self.seen.append("every-rank hook")

    plugin = Ranked()
    PluginSet([plugin], rank=1).call("on_job_start", None)
    PluginSet([plugin], rank=1).call("on_fit_abort", None)
    PluginSet([plugin], rank=0).call("on_job_start", None)
    assert plugin.seen == ["every-rank hook", "rank-zero hook"]


def test_a_job_runs_in_one_process_at_a_time(tmp_path):
    life = new_job(tmp_path)

    def body(life):
        with pytest.raises(JobError, match="being run by another process"), Job.open("j", tmp_path).lock():
            pass
        return {}

    life.run(body)


def test_resume_refuses_a_completed_job_and_another_kind(tmp_path):
    new_job(tmp_path).run(lambda life: {})
    with pytest.raises(JobError, match="already completed"):
        JobLifecycle.resume("j", tmp_path, "training")
    with pytest.raises(JobError, match="is not a tuning job"):
        JobLifecycle.resume("j", tmp_path, "tuning")


def test_job_json_fields_are_typed_and_a_misspelt_field_is_refused(tmp_path):
    job = new_job(tmp_path).run(lambda life: {"stop_reason": "early stopping"})
    amend_job(job, appended={"evaluations": [{"split": "test", "accuracy": 0.9}]})
    amend_job(job, appended={"evaluations": [{"split": "valid", "accuracy": 0.8}]})
    record = job.record()
    assert [e["accuracy"] for e in record.evaluations] == [0.9, 0.8] and record.stop_reason == "early stopping"
    with pytest.raises(ValueError, match="no field"):
        job.update(stop_raeson="typo")
    with pytest.raises(ValueError, match="cannot change"):  # a later command adds results; the config is the job's
        amend_job(job, {"config": {}})


def test_the_lock_is_released_when_a_command_fails_before_the_job_runs(tmp_path):
    def failing(life):
        raise ValueError("first run failed")

    with pytest.raises(ValueError):
        new_job(tmp_path).run(failing)
    with pytest.raises(RuntimeError, match="bad stored config"), JobLifecycle.resume("j", tmp_path, "training"):
        raise RuntimeError("bad stored config")  # e.g. the job's config no longer validates
    with Job.open("j", tmp_path).lock():  # not held by the failed command
        pass


def test_system_exit_stops_the_job(tmp_path):
    with pytest.raises(SystemExit):
        new_job(tmp_path).run(lambda life: sys.exit(3))
    record = Job.open("j", tmp_path).record()
    assert record.status == "stopped" and record.error == "SystemExit"


def test_a_plugin_switched_off_still_releases_what_it_holds():
    class Holding(JobPlugin):
        name = "holding"
        released = False

        def on_start_over(self, run):
            raise OSError("disk full")

        def on_fit_end(self, run, results):
            results["holding"] = "finished"  # never reached: it was switched off

        def on_fit_abort(self, run):
            self.released = True  # a watchdog stopped, a store closed

    plugin, results = Holding(), {}
    plugins = PluginSet([plugin])
    plugins.call("on_start_over", None)
    plugins.call("on_fit_end", None, results)
    assert plugin.released and results == {}
    assert plugins.failures == [{"plugin": "holding", "hook": "on_start_over", "error": "OSError: disk full"}]
