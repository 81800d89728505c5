"""The one job lifecycle: create or resume, lock, status changes, timings, plugins' job hooks, push, the end.

Every kind of job (training, tuning, the pipeline) lives through `JobLifecycle`; commands that add to a job
afterwards (an evaluation, a report, the final job of a tuning job) go through `amend_job`, which writes
amendments of their own, never the job's files. Nothing else moves a job between states or pushes it.

States: a job is created (or reopened to resume) and locked by this process, then `running` until it ends
`completed`, `failed` (an exception) or `stopped` (Ctrl-C, SIGTERM). A `running` job whose process died reads
as `interrupted` (imgtune.storage.jobs.Job.status) and can be resumed. In an s3:// workspace every status change
is pushed at once, and the end pushes the whole job (a failed push of a completed job raises when `must_push`).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import socket
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from imgtune.core.errors import JobError
from imgtune.core.io import now_iso
from imgtune.storage.jobs import Job, JobTakenOver, push_interval, remote_url, workspace_dir
from imgtune.storage.record import JobRecord
from imgtune.training.plugin import PluginSet

KIND_LABEL = {"training": "training job", "tuning": "tuning job", "pipeline": "pipeline"}
log = logging.getLogger("imgtune")
DISK_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EIO}  # said in a line, not a traceback


class JobLifecycle:
    """One job's life in this process. Make one with `create` or `resume` and use it as a context manager (it
    holds the job's lock until the block ends, whatever happens before `run`), then `run(body)`::

        with JobLifecycle.resume("my-job", workspace, "training") as life:
            life.use_plugins(...)
            life.run(body)
    """

    def __init__(self, job: Job, *, resumed: bool, must_push: bool = True, timings: dict[str, float] | None = None):
        self.job = job
        self.plugins = PluginSet([], log=job.log)
        self.resumed = resumed
        self.must_push = must_push
        self.timings: dict[str, float] = dict(timings or {})
        self._hold = contextlib.ExitStack()
        self._heartbeat: Heartbeat | None = None
        self.started = time.perf_counter()

    @classmethod
    def create(
        cls,
        workspace: str | Path | None,
        record: JobRecord,
        *,
        prefix: str,
        plugins: list[Any] = (),
        must_push: bool = True,
        durable: bool = True,
    ) -> JobLifecycle:
        """A new job directory named `record.name` (or PREFIX-TIME), locked, with `record` as its job.json;
        `durable`: see Job.durable."""
        if remote_url(workspace_dir(workspace)) is not None:
            push_interval()  # a bad IMGTUNE_PUSH_INTERVAL: refuse before a job directory exists
        claim = record.model_dump(mode="json", exclude_none=True)  # what the bucket holds until the first push
        job = Job.create(workspace, record.name or None, prefix=prefix, record=claim)
        job.durable = durable
        life = cls(job, resumed=False, must_push=must_push)
        with life._releasing_on_error():
            life._hold.enter_context(job.lock())
            job.write(record.model_copy(update={"name": job.name, "created": now_iso()}))
            life.use_plugins(list(plugins))
        return life

    @classmethod
    def resume(
        cls,
        reference: str | Path,
        workspace: str | Path | None,
        kind: str,
        *,
        force: bool = False,
        must_push: bool = True,
    ) -> JobLifecycle:
        """Reopen a job that did not complete, to continue it; refused while it runs elsewhere (see
        `check_resumable`). Set its plugins with `use_plugins` before `run`."""
        job = Job.open(reference, workspace)
        record = job.record()
        label = KIND_LABEL[kind]
        if record.kind != kind:
            raise JobError(f"{job.name} is not a {label}", "`imgtune jobs` lists jobs and their kinds")
        life = cls(job, resumed=True, must_push=must_push, timings=record.timings)
        with life._releasing_on_error():
            life._hold.enter_context(job.lock())
            if job.status() == "completed":
                raise JobError(f"{label} {job.name} has already completed", "start a new one instead")
            check_resumable(job, force)
            job.log("resuming")
        return life

    @contextlib.contextmanager
    def _releasing_on_error(self) -> Iterator[None]:
        try:
            yield
        except BaseException:
            self._hold.close()
            raise

    def __enter__(self) -> JobLifecycle:
        return self

    def __exit__(self, *exc: object) -> None:
        self._hold.close()

    def use_plugins(self, plugins: list[Any]) -> None:
        self.plugins = PluginSet(list(plugins), log=self.job.log)

    def run(self, body: Callable[[JobLifecycle], dict[str, Any]], **running_fields: Any) -> Job:
        """Mark the job running, call its plugins' `on_job_start`, run `body(self)` (which returns the job's
        results for job.json), and end the job whatever happens; exceptions from `body` are re-raised after the
        job recorded them."""
        job = self.job
        try:
            self.begin(**running_fields)
            try:
                results = body(self)
            except OSError as exc:
                if exc.errno not in DISK_ERRORS:
                    self.fail(exc, traceback.format_exc())
                    raise
                # a full disk, a read-only or lost mount: said in a line, with what to do
                self.fail(exc, traceback.format_exc())
                raise JobError(
                    f"job {job.name} failed: {exc}",
                    f"fix the disk ({job.path.parent}) and continue the job with --resume {job.name}",
                ) from exc
            except Exception as exc:
                self.fail(exc, traceback.format_exc())
                raise
            except BaseException as exc:  # Ctrl-C, SIGTERM (the CLI raises KeyboardInterrupt), SystemExit
                reason = "interrupted by the user" if isinstance(exc, KeyboardInterrupt) else type(exc).__name__
                self._end("stopped", {"error": reason}, f"stopped: {reason}")
                raise
            self._end("completed", results, "completed")
        finally:
            self._hold.close()
        return job

    # `run` in steps, for a process that runs many jobs side by side (tuning trials trained as one batch):
    # `begin`, then `complete` or `fail`; each of these two ends the job and releases its lock.

    def begin(self, **running_fields: Any) -> None:
        """Mark the job running (with `running_fields`) and call its plugins' `on_job_start`. A job of a remote
        workspace (not a tuning trial: its tuning job's own heartbeat speaks for it) then beats: see Heartbeat."""
        self.started = time.perf_counter()
        self.job.mark_running(started=now_iso(), error=None, plugin_failures=None, **running_fields)
        if self.job.remote is not None and self.must_push:
            self._heartbeat = Heartbeat(self.job).start()
            self._hold.callback(self._heartbeat.stop)
        self.plugins.call("on_job_start", self.job)

    def complete(self, results: dict[str, Any]) -> None:
        try:
            self._end("completed", results, "completed")
        finally:
            self._hold.close()

    def fail(self, exc: BaseException, trace: str) -> None:
        """End the job `failed` with `exc`; `trace` (its traceback text) goes to the job's log. When even that
        cannot be written (the disk that failed the job is still full), it is said on stderr instead: the job
        then reads as interrupted (its process is gone) and can be resumed."""
        error = f"{type(exc).__name__}: {exc}"
        try:
            self._end("failed", {"error": error}, f"failed: {error}\n{trace}")
        except OSError as unrecorded:
            log.error("job %s failed (%s), and that could not be recorded in it: %s", self.job.name, error, unrecorded)
        finally:
            self._hold.close()

    def _end(self, status: str, fields: dict[str, Any], message: str) -> None:
        job = self.job
        if self._heartbeat is not None:
            self._heartbeat.stop()
        fields = {**fields, "heartbeat": None}  # no more beats: the status says what became of it
        ended: dict[str, Any] = {"timings": self.timings, **fields}
        if status == "completed":
            ended.update(finished=now_iso(), seconds=time.perf_counter() - self.started)
        # A completed job is marked so only once its end hooks (report, trials push, trackers) ran: one killed
        # during them reads as interrupted, and its resume does the end again (its training or trials are done).
        completed = status == "completed"
        taken_over: list[JobTakenOver] = []

        def attempt(action: Callable[[], Any]) -> None:
            try:
                action()
            except JobTakenOver as exc:  # another machine runs the job now: its end is recorded here only
                taken_over.append(exc)

        attempt(lambda: job.update(**ended) if completed else job.update(**ended, status=status))
        attempt(lambda: self._call_end_hooks(status))
        attempt(lambda: job.update(status=status) if completed else None)
        job.log(message)
        # A job that failed or stopped is pushed as well as it can be; only a completed job's push must work.
        attempt(lambda: job.push(strict=self.must_push and completed))
        if taken_over and completed:
            raise taken_over[0]

    def _call_end_hooks(self, status: str) -> None:
        self.plugins.call("on_job_end", self.job, status)
        if self.plugins.failures:
            self.job.update(plugin_failures=self.plugins.failures)


class Heartbeat:
    """A running job's sign of life in its bucket: every push interval (at least HEARTBEAT_MIN_INTERVAL s) a
    thread writes the time into job.json, which the update pushes. Another machine takes the job as dead once
    its heartbeat is older than `heartbeat_limit()` (check_resumable)."""

    def __init__(self, job: Job):
        self.job = job
        self.interval = max(push_interval(), HEARTBEAT_MIN_INTERVAL)
        self.stopped = threading.Event()
        self.thread = threading.Thread(target=self._beat, name=f"imgtune-heartbeat-{job.name}", daemon=True)

    def start(self) -> Heartbeat:
        self.job.update(heartbeat=now_iso(), heartbeat_every=self.interval)  # readers judge by this machine's pace
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopped.set()
        self.thread.join(timeout=10)

    def _beat(self) -> None:
        while not self.stopped.wait(self.interval):
            try:
                self.job.update(heartbeat=now_iso())
            except JobTakenOver:  # (said in the job's log; the job's own next push stops it)
                return
            except Exception as exc:  # a full disk, a bucket away: the job itself says what matters
                with contextlib.suppress(Exception):
                    self.job.log(f"heartbeat not written: {exc}")


HEARTBEAT_MIN_INTERVAL = 5.0  # seconds between heartbeats, whatever the push interval
HEARTBEAT_MIN_LIMIT = 120.0  # a job is dead elsewhere when its heartbeat is older than this, at least


def heartbeat_limit(record: JobRecord | None = None) -> float:
    """Seconds after its last heartbeat that a job running elsewhere is taken as dead: 3 of the running
    machine's heartbeat intervals (as its job.json records them; else this machine's push interval), at least
    2 minutes."""
    every = record.heartbeat_every if record is not None and record.heartbeat_every else None
    return max(3 * (every or max(push_interval(), HEARTBEAT_MIN_INTERVAL)), HEARTBEAT_MIN_LIMIT)


def heartbeat_age(record: JobRecord) -> float | None:
    """Seconds since the job's recorded heartbeat (by this machine's clock), or None without one."""
    if not record.heartbeat:
        return None
    try:
        beat = datetime.fromisoformat(record.heartbeat)
    except ValueError:
        return None
    if beat.tzinfo is None:
        beat = beat.astimezone()
    return (datetime.now(UTC) - beat).total_seconds()


def check_resumable(job: Job, force: bool = False) -> None:
    """Refuse to resume a job that is still running. A job recorded as running on another machine (the
    bucket says so, and no process of this one can tell) is resumed only with `force`; so is one recorded as
    running here under a pid that is alive (another program may have that pid now: the job's lock, which this
    process holds, says its own runner is gone)."""
    record = job.record()
    if job.status() != "running":
        return
    host = record.host
    if host and host != socket.gethostname():
        if force:
            job.log(f"resumed with --force: it was recorded as running on {host}")
            return
        age, limit = heartbeat_age(record), heartbeat_limit(record)
        if age is not None and age > limit:
            job.log(f"resumed: its heartbeat from {host} is {age:.0f} s old (over {limit:.0f} s), so it died there")
            return
        beat = f"its last heartbeat {age:.0f} s ago" if age is not None else "no heartbeat recorded"
        raise JobError(
            f"job {job.name} is recorded as running on {host} (pid {record.pid}, {beat})",
            f"it is taken as dead {limit:.0f} s after its last heartbeat; if {host} is gone or the job died "
            "there, resume it now with --force",
        )
    if force:  # this process holds the job's lock, so the recorded pid is not running it (a reused pid)
        job.log(f"resumed with --force: pid {record.pid} on this machine was recorded as running it")
        return
    raise JobError(
        f"job {job.name} is still running (pid {record.pid})",
        "wait for it or stop it first; if that pid is another program now, resume with --force",
    )


def amend_job(
    job: Job,
    fields: dict[str, Any] | None = None,
    appended: dict[str, list[Any]] | None = None,
    files: list[Path] = (),
) -> None:
    """A later command's addition to a job (an evaluation, a report's rule results, a tuning job's final job):
    `fields` and `appended` go into an amendment of their own (Job.amend), and the command's own `files` in the
    job (its report) are sent to the job's bucket, each only over the object this machine last saw there."""
    if fields or appended:
        job.amend(fields, appended)
    if files and job.remote is not None:
        job.push_files(files)
