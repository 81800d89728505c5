"""Job directories: the contract between training, tuning, reports and serving.

A job is a directory in a workspace (``./imgtune-runs`` by default)::

    JOB/
      job.json          status, resolved config, versions, timings, dataset summary, excluded files, results
      metrics.jsonl     one JSON object per epoch (train and valid loss/accuracy, lr, time)
      checkpoints/      last.pt (resume) and best.pt (early stopping), loaded with weights_only=True
      model/            the model bundle: model.safetensors + manifest.json
      logs.txt          the job's log
      amendments/       later commands' additions (an evaluation, a report's rule results, a final job), one
                        file each; reading job.json overlays them, and the job's next run folds them in

Every file is written atomically (temp file + rename), so a killed job leaves whole files behind.

A workspace may be remote (`s3://bucket/prefix`): jobs then run in a local mirror,
IMGTUNE_CACHE/workspaces/s3/bucket/prefix/JOB, and are pushed to the bucket on every status change, every
$IMGTUNE_PUSH_INTERVAL seconds (30) of training and at their end; opening or listing jobs pulls what changed. So the
bucket holds every job, and any machine with access can list, report, serve, evaluate or resume it. A tuning job's
Ray state (JOB/ray, pickles) stays on the machine that wrote it (LOCAL_ONLY_DIRS); another machine resuming the job
rebuilds it from the trials' own job records (imgtune.tuning.tuner).

One writer per object: a job's files are written by the machine running it, and its job.json says which (the
guard of imgtune.storage.remote: conditional writes, so a machine that finds job.json written by another since
its own last push has been taken over, `JobTakenOver`, and sends nothing more). Other commands never write a
job's files: they add their own objects under amendments/ (created, never replaced) and their own report.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from imgtune.core.errors import JobError
from imgtune.core.io import append_jsonl, atomic_write_json, atomic_write_text, cache_dir, now_iso, read_jsonl, to_json
from imgtune.storage.record import KNOWN_FIELDS, JobRecord

WORKSPACE_ENV = "IMGTUNE_WORKSPACE"
DEFAULT_WORKSPACE = "imgtune-runs"
JOB_FILE = "job.json"
METRICS_FILE = "metrics.jsonl"

MIRRORS_DIR = "workspaces"  # in the cache: local mirrors of remote workspaces
LOCK_FILE = ".imgtune-lock"  # in a job: held by the process running it (Job.lock)
UPDATE_LOCK_FILE = ".imgtune-update-lock"  # in a job: held while job.json is read, changed and written
SYNC_RECORD = ".imgtune-sync.json"  # in a mirrored job: what was pushed or pulled (see imgtune.remote)
AMENDMENTS_DIR = "amendments"  # in a job: later commands' additions, one JSON file each (Job.amend)
# What a later command may add to a job: fields it sets, and list fields it appends to. An amendment file with
# anything else (written into a bucket by hand) is ignored: the job's config and the rest are its runner's only.
AMENDED_FIELDS = frozenset({"profiler", "final_job"})
APPENDED_FIELDS = frozenset({"evaluations"})
PUSH_INTERVAL_ENV = "IMGTUNE_PUSH_INTERVAL"
PUSH_INTERVAL = 30.0  # default seconds between pushes of a running job's files (status changes push at once)
# What a shallow pull of a job takes: the files at its top and its amendments, no other folder (glob: * stops at /)
SHALLOW_FILES = ("*", "amendments/*")
# In a tuning job: Ray Tune's experiment state. It is pickles, which run code when loaded (Tuner.restore), so it is
# the machine's that wrote it and never crosses a bucket: anyone who can write to the bucket could put code there.
RAY_STATE_DIR = "ray"
LOCAL_ONLY_DIRS = (RAY_STATE_DIR,)  # a job's top-level folders never pushed or pulled (remote.SyncedFolder)
NESTED_JOB_DIRS = ("trials",)  # a job's top-level folders whose subfolders are jobs of their own (tuning trials)


class JobTakenOver(JobError):
    """Another machine wrote the job's job.json in its bucket since this one last did: it runs the job now (it
    resumed it, taking this one for dead), and this machine's files of it are no longer sent."""


def push_interval() -> float:
    """Seconds between pushes of a running job to its remote workspace: $IMGTUNE_PUSH_INTERVAL or 30."""
    value = os.environ.get(PUSH_INTERVAL_ENV, "")
    try:
        seconds = float(value) if value else PUSH_INTERVAL
    except ValueError:
        seconds = -1.0
    if not seconds >= 0:
        raise JobError(f"{PUSH_INTERVAL_ENV}={value!r} is not a number of seconds", "give 0 or more, or unset it")
    return seconds


def _workspace_spec(workspace: str | Path | None) -> str:
    return str(workspace or os.environ.get(WORKSPACE_ENV) or DEFAULT_WORKSPACE)


def workspace_dir(workspace: str | Path | None = None) -> Path:
    """The workspace (absolute): the argument, else $IMGTUNE_WORKSPACE, else ./imgtune-runs; for a remote
    workspace (s3://...), its local mirror."""
    from imgtune.storage.remote import is_remote

    spec = _workspace_spec(workspace)
    if is_remote(spec):
        protocol, _, rest = spec.partition("://")
        parts = [part for part in rest.split("/") if part]
        if not parts or any(part in (".", "..") for part in parts):
            raise JobError(f"bad workspace address {spec!r}", "give it as s3://bucket or s3://bucket/prefix")
        if protocol not in ("s3", "s3a"):  # (one writer per job needs S3's ETags and conditional writes)
            raise JobError(f"a workspace cannot be kept in {protocol}:// ({spec})", "use a local folder or s3://")
        return cache_dir().joinpath(MIRRORS_DIR, protocol, *parts)
    return Path(spec).expanduser().absolute()


def remote_url(path: Path) -> str | None:
    """The remote address a local path mirrors (a path in a remote workspace's mirror), else None."""
    mirrors = (cache_dir() / MIRRORS_DIR).resolve()  # both resolved: a cache reached through a symlink
    path = path.resolve()
    if not path.is_relative_to(mirrors) or len(path.relative_to(mirrors).parts) < 2:
        return None
    protocol, *rest = path.relative_to(mirrors).parts
    return f"{protocol}://{'/'.join(rest)}"


def workspace_label(workspace: str | Path | None = None) -> str:
    """How to show the workspace to a user: its remote address, or its path."""
    root = workspace_dir(workspace)
    return remote_url(root) or str(root)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "job"


def process_started(pid: int) -> float | None:
    """When process `pid` started (seconds since the epoch), or None when there is none."""
    import psutil

    try:
        return psutil.Process(pid).create_time()
    except (psutil.Error, OSError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed process nobody has reaped yet is a zombie: dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


@dataclass
class Job:
    """A handle on a job directory. Reading is cheap: every call reads the files again.

    Its job.json and metrics are synced to disk as they are written (they survive a power cut), unless
    `durable` is off: a job that is cheaper to run again than to sync (a tuning trial trained in a batch).
    With `pushes` off, this handle never pushes to a remote workspace (another process owns the job)."""

    path: Path
    durable: bool = True
    pushes: bool = True  # off on a data-parallel worker's handle: the job's own process pushes it

    @property
    def name(self) -> str:
        return self.path.name

    @property
    def job_file(self) -> Path:
        return self.path / JOB_FILE

    @property
    def metrics_file(self) -> Path:
        return self.path / METRICS_FILE

    @property
    def model_dir(self) -> Path:
        return self.path / "model"

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / "checkpoints"

    @property
    def log_file(self) -> Path:
        return self.path / "logs.txt"

    @property
    def remote(self) -> str | None:
        """Where the job is kept remotely (a job of an s3:// workspace), else None."""
        return remote_url(self.path)

    # -- remote workspaces ---------------------------------------------------------------------------

    def _synced(self) -> Any:
        from imgtune.storage.remote import SyncedFolder

        return SyncedFolder(
            self.remote or "", self.path, SYNC_RECORD, keep_local_changes=True, local_only_dirs=LOCAL_ONLY_DIRS,
            guard=JOB_FILE, writer_lock=LOCK_FILE, nested_dirs=NESTED_JOB_DIRS, kept_unsent=_is_amendment,
        )  # fmt: skip

    def push(self, min_interval: float = 0.0, strict: bool = True) -> None:
        """Upload what changed in the job to its remote workspace (nothing for a local job): the push of the
        machine that runs (or ran) the job, its one writer.

        The job's subfolders that are jobs themselves (a tuning job's trials) push themselves. With
        `min_interval`, skip the push if the last try was more recent. A failure raises a JobError when
        `strict`, else it goes to the job's log and a later push tries again. When another machine wrote the
        job's job.json in the bucket since this one last did, nothing is sent and `JobTakenOver` is raised,
        strict or not: that machine runs the job now.
        """
        if not self.pushes or self.remote is None:
            return
        if time.monotonic() - _last_push.get(self.path, -math.inf) < min_interval:
            return
        from imgtune.storage.remote import Conflict, RemoteError

        _last_push[self.path] = time.monotonic()  # a failed try counts too: no retry storm while S3 is away
        try:
            self._synced().push()  # (the trials in trials/NAME push themselves)
        except Conflict as exc:
            raise self._taken_over(exc.found) from None
        except (RemoteError, OSError) as exc:
            if strict:
                raise JobError(
                    f"job {self.name} could not be saved to {self.remote}: {exc}",
                    f"it is whole in {self.path}; any later command on it with this workspace pushes it again",
                ) from None
            self.log(f"push to {self.remote} failed (tried again later): {exc}")

    def push_files(self, files: list[Path]) -> None:
        """Send a later command's own `files` in the job (its report) to the job's bucket, each only over the
        object this machine last synced (or where there is none); a JobError when another writer changed one
        since (the file stays here)."""
        if self.remote is None:
            return
        from imgtune.storage.remote import Conflict, RemoteError

        rels = [Path(f).resolve().relative_to(self.path.resolve()).as_posix() for f in files]
        try:
            self._synced().push_files(rels)
        except Conflict:
            raise JobError(
                f"{', '.join(rels)} of job {self.name} changed in {self.remote} since this machine last saw it: "
                "not sent over it",
                f"this machine's copy is in {self.path}; see the job again (`imgtune jobs show {self.name}`) and "
                "run the command again",
            ) from None
        except (RemoteError, OSError) as exc:
            raise JobError(str(exc), "check the workspace address, credentials and AWS_ENDPOINT_URL") from None

    def _taken_over(self, found: dict[str, Any] | None) -> JobTakenOver:
        """The error for a push refused because another writer's job.json is in the bucket (`found`)."""
        from imgtune.storage.remote import _filesystem

        who = "another machine"
        if found is not None:
            with contextlib.suppress(Exception):
                fs, path = _filesystem(f"{self.remote}/{JOB_FILE}")
                theirs = json.loads(fs.cat_file(path))
                who = f"{theirs.get('host') or 'another machine'} (status {theirs.get('status')!r})"
        where = "it is gone from the bucket" if found is None else f"its job.json there was written by {who}"
        message = f"job {self.name} is no longer this machine's to write in {self.remote}: {where}"
        with contextlib.suppress(OSError):
            self.log(message + "; nothing more is sent from here")
        return JobTakenOver(message, "see it with `imgtune jobs show`; this machine's copy is left as it was")

    def pull(self, shallow: bool = False) -> None:
        """Download what changed in the job's remote copy (files this machine changed since are kept, unless
        another machine wrote the job since); when `shallow`, only the files at its top (job.json, metrics, log,
        report) and its amendments: what a view of the job reads, and a tuning job's 1,000 trials (checkpoints and
        all) stay in the bucket."""
        if self.remote is None:
            return
        from imgtune.storage.remote import list_remote

        with _bucket_errors():
            if shallow:
                listing = {rel: info for glob in SHALLOW_FILES for rel, info in list_remote(self.remote, glob).items()}
                self._synced().pull(listing=listing, complete=_in_a_shallow_listing)
            else:
                self._synced().pull()
        self._send_unsent()

    def _send_unsent(self) -> None:
        """Send what this machine made of the job that its bucket lacks, unless the job runs here (its own
        pushes do): the end of a push cut short, when this machine is still the job's writer (a job that
        completed here but could not be pushed), and amendments whose sending failed. Another writer's job is
        left alone; a bucket away is said in the job's log."""
        from imgtune.storage.remote import Conflict, RemoteError

        synced = self._synced()
        if not self.pushes or synced._writer_here():
            return
        folder = self.path / AMENDMENTS_DIR
        record = synced._read_record()
        unsent = [
            f"{AMENDMENTS_DIR}/{p.name}" for p in (folder.glob("*.json") if folder.is_dir() else [])
            if f"{AMENDMENTS_DIR}/{p.name}" not in record
        ]  # fmt: skip
        try:
            if unsent:
                synced.push_files(unsent)
            synced.push()
        except Conflict:
            pass  # another machine writes the job: nothing of this one's is to be sent
        except (RemoteError, OSError) as exc:
            with contextlib.suppress(OSError):
                self.log(f"could not send this machine's unsent work on the job to {self.remote}: {exc}")

    # -- creation and lookup -------------------------------------------------------------------------

    @classmethod
    def create(
        cls, workspace: str | Path | None, name: str | None, prefix: str = "job", record: dict | None = None
    ) -> Job:
        """Create a new job directory holding its first job.json (`record`, with the name and time filled in); a
        generated name is `PREFIX-YYYYmmdd-HHMMSS[-n]`.

        The directory is made under a hidden name and renamed into place (atomically, and over nothing but an
        empty directory a killed older create left), so a job directory without its job.json never blocks a
        name. In a remote workspace the name is claimed in the bucket first: its job.json is written only if no
        object is there (a conditional write), so of two machines that create the same name at once exactly one
        gets it; the other is refused (or, for a generated name, takes the next)."""
        root = workspace_dir(workspace)
        root.mkdir(parents=True, exist_ok=True)
        if name:
            path = root / _slug(name)
            taken = JobError(
                f"a job named {path.name!r} already exists in {workspace_label(workspace)}",
                "pick another --name, or continue it with --resume",
            )
            if (path / JOB_FILE).exists() or _in_remote_workspace(root, path.name):
                raise taken
            if not _created(root, path, record):
                raise taken
        else:
            stamp = time.strftime("%Y%m%d-%H%M%S")
            base = f"{_slug(prefix)}-{stamp}"
            for n in range(1000):
                path = root / (base if n == 0 else f"{base}-{n}")
                if (path / JOB_FILE).exists() or _in_remote_workspace(root, path.name):  # (another machine's)
                    continue
                if _created(root, path, record):
                    break
        return cls(path)

    @classmethod
    def open(cls, job: str | Path, workspace: str | Path | None = None, *, shallow: bool = False) -> Job:
        """Find a job by path or by name in the workspace (a job of a remote workspace is pulled first: only
        its top files when `shallow`, see `pull`)."""
        candidates = [Path(job).expanduser()]
        pulled = None
        if not Path(job).is_absolute():
            root = workspace_dir(workspace)
            candidates += [root / str(job), root / _slug(str(job))]
            if remote_url(root) is not None and _in_remote_workspace(root, _slug(str(job))):
                pulled = cls(root / _slug(str(job)))
                pulled.pull(shallow)  # a job this machine never saw, or saw before it changed
                candidates.insert(0, pulled.path)
        for path in candidates:
            if (path / JOB_FILE).is_file():
                found = cls(path.resolve())
                if found.remote is not None and pulled is None:  # a path into a mirror, given directly
                    found.pull(shallow)
                return found
        raise JobError(
            f"no job {str(job)!r} (looked in {', '.join(str(c) for c in candidates)})",
            "list jobs with `imgtune jobs`, or pass the job's directory",
        )

    # -- job.json ------------------------------------------------------------------------------------

    def read(self) -> dict[str, Any]:
        """job.json as it is on disk (a dict), with later commands' amendments laid over it (see `amend`);
        `record()` is the typed view commands and reports use."""
        data = self._read_own()
        for _, amendment in self._amendments():
            _apply_amendment(data, amendment)
        return data

    def _read_own(self) -> dict[str, Any]:
        """job.json alone: what its runner wrote."""
        try:
            return json.loads(self.job_file.read_text())
        except FileNotFoundError:
            raise JobError(f"{self.path} has no {JOB_FILE}") from None
        except json.JSONDecodeError as exc:
            raise JobError(f"{self.job_file} is not valid JSON: {exc}") from None

    def record(self) -> JobRecord:
        """job.json, validated into its typed model."""
        try:
            return JobRecord.model_validate(self.read())
        except ValidationError as exc:
            raise JobError(f"{self.job_file} does not hold a job record: {exc.errors()[0]['msg']}") from None

    def write(self, data: dict[str, Any] | JobRecord) -> None:
        if isinstance(data, JobRecord):
            data = data.model_dump(mode="json", exclude_none=True)
        atomic_write_json(self.job_file, data, self.durable)

    def update(self, **fields: Any) -> dict[str, Any]:
        """Merge `fields` (fields of JobRecord) into job.json; a status change is pushed at once to a remote
        workspace."""
        unknown = sorted(set(fields) - KNOWN_FIELDS)
        if unknown:
            raise ValueError(f"job.json has no field(s) {unknown}; add them to imgtune.storage.record.JobRecord")
        with self._updating():  # another thread (the heartbeat) or process must not write between read and write
            data = self._read_own() if self.job_file.exists() else {}
            data.update(fields)
            data["updated"] = now_iso()
            self.write(data)
        if self.remote is not None:
            self.push(min_interval=0.0 if "status" in fields else push_interval(), strict=False)
        return data

    def amend(self, fields: dict[str, Any] | None = None, appended: dict[str, list[Any]] | None = None) -> Path:
        """A later command's addition to the job (AMENDED_FIELDS set, APPENDED_FIELDS extended). In a remote
        workspace it is a file of its own under amendments/, created in the bucket beside the job's files (never
        over them, so it races with nobody: not the job's runner, not another command); returns the file. A
        local job's job.json takes it at once (under the job's update lock); returns job.json."""
        fields, appended = dict(fields or {}), dict(appended or {})
        wrong = sorted((set(fields) - AMENDED_FIELDS) | (set(appended) - APPENDED_FIELDS))
        if wrong:
            raise ValueError(f"a later command cannot change {wrong} of a job (see AMENDED_FIELDS, APPENDED_FIELDS)")
        if self.remote is None:
            with self._updating():
                data = self._read_own()
                _apply_amendment(data, {"set": fields, "append": appended})
                self.write(data)
            return self.job_file
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime()) + f"{time.time() % 1:.6f}"[1:]
        path = self.path / AMENDMENTS_DIR / f"{stamp}-{_slug(socket.gethostname())}-{os.getpid()}.json"
        path.parent.mkdir(exist_ok=True)
        atomic_write_json(path, {"set": fields, "append": appended, "by": socket.gethostname()}, self.durable)
        from imgtune.storage.remote import RemoteError

        try:
            self._synced().push_files([path.relative_to(self.path).as_posix()])
        except (RemoteError, OSError) as exc:
            raise JobError(
                f"could not save the change to job {self.name} in {self.remote}: {exc}",
                f"it is kept in {path} and counts here; any later run of the job here sends it",
            ) from None
        return path

    def _amendments(self) -> list[tuple[Path, dict[str, Any]]]:
        """The amendment files, oldest first, with what they hold (an unreadable one is skipped, and logged)."""
        folder = self.path / AMENDMENTS_DIR
        found = []
        for path in sorted(folder.glob("*.json")) if folder.is_dir() else []:
            try:
                amendment = json.loads(path.read_text())
                if not isinstance(amendment, dict):
                    raise ValueError("not a JSON object")
            except (OSError, ValueError) as exc:
                with contextlib.suppress(OSError):
                    self.log(f"amendment {path.name} ignored: {exc}")
                continue
            found.append((path, amendment))
        return found

    def fold_amendments(self) -> None:
        """Write the amendments into job.json itself and remove their files (the job's runner does, as it
        starts: what it writes later is newer than any of them)."""
        amendments = self._amendments()
        if not amendments:
            return
        with self._updating():
            data = self._read_own()
            for _, amendment in amendments:
                _apply_amendment(data, amendment)
            self.write(data)
        for path, _ in amendments:
            path.unlink(missing_ok=True)

    @contextlib.contextmanager
    def _updating(self) -> Iterator[None]:
        """Hold job.json for one read-modify-write: a lock between this process's threads and a file lock
        between processes (where the file system has locks)."""
        import fcntl

        with _UPDATES, open(self.path / UPDATE_LOCK_FILE, "a") as handle:
            with contextlib.suppress(OSError):  # no locks here (NFS without lockd): the thread lock must do
                fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def mark_running(self, **fields: Any) -> None:
        """Record this process as the job's runner (with `fields`, in the same write): its pid, the pid's start
        time and its host. Amendments made since its last run are folded into job.json first. In a remote
        workspace this machine becomes the job's writer: its push of this change wins only over the job.json it
        read (another machine resuming the same job at once loses, see imgtune.storage.remote)."""
        if self.remote is not None and self.pushes:
            self._synced().become_writer()
        self.fold_amendments()
        pid = os.getpid()
        self.update(
            status="running", pid=pid, pid_started=process_started(pid), host=socket.gethostname(),
            heartbeat=now_iso(), **fields,
        )  # fmt: skip

    def status(self) -> str:
        """The recorded status, or 'interrupted' for a 'running' job of this host whose process is gone (or
        whose pid is alive but started at another time: another program has it now)."""
        data = self.read()
        status = data.get("status", "unknown")
        if status == "running" and data.get("host") == socket.gethostname():
            pid, started = data.get("pid"), data.get("pid_started")
            if isinstance(pid, int) and not _pid_alive(pid):
                return "interrupted"
            if isinstance(pid, int) and isinstance(started, int | float):
                now_started = process_started(pid)
                if now_started is None or abs(now_started - started) > 1.0:
                    return "interrupted"
        return status

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the job for this process (an exclusive lock on a file in the job; the system releases it when
        the process dies). A second process that wants to run or resume the job at the same time is refused."""
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        with open(self.path / LOCK_FILE, "a") as handle:
            locked = True
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise JobError(
                    f"job {self.name} is being run by another process on this machine", "wait for it or stop it first"
                ) from None
            except OSError as exc:  # a file system without locks (NFS without lockd): the status check must do
                self.log(f"could not lock the job ({exc.strerror or exc}); running it unlocked")
                locked = False
            try:
                yield
            finally:
                if locked:
                    fcntl.flock(handle, fcntl.LOCK_UN)

    # -- metrics.jsonl -------------------------------------------------------------------------------

    def append_metrics(self, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_file, record, self.durable)

    def read_metrics(self) -> list[dict[str, Any]]:
        return list(read_jsonl(self.metrics_file))

    def truncate_metrics(self, last_epoch: int) -> None:
        """Drop records of epochs after `last_epoch` (work a resumed job will redo)."""
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= last_epoch]
        atomic_write_text(self.metrics_file, "".join(to_json(r) + "\n" for r in kept))

    def log(self, message: str) -> None:
        with self.log_file.open("a") as f:
            f.write(f"{now_iso()} {message}\n")


@contextlib.contextmanager
def _bucket_errors() -> Iterator[None]:
    """A remote workspace that cannot be read: one JobError with what to check."""
    from imgtune.storage.remote import RemoteError

    try:
        yield
    except (RemoteError, OSError) as exc:
        raise JobError(str(exc), "check the workspace address, credentials and AWS_ENDPOINT_URL") from None


_UPDATES = threading.RLock()  # job.json read-modify-writes of this process (see Job._updating)
_last_push: dict[Path, float] = {}  # job directory -> time.monotonic() of its last push, in this process


def _is_amendment(rel: str) -> bool:
    return rel.startswith(AMENDMENTS_DIR + "/") and rel.count("/") == 1


def _in_a_shallow_listing(rel: str) -> bool:
    """Is `rel` (relative to a job) one of the files a shallow pull lists (SHALLOW_FILES)?"""
    return "/" not in rel or _is_amendment(rel)


def _apply_amendment(data: dict[str, Any], amendment: dict[str, Any]) -> None:
    """Lay one amendment over job.json's `data`: only the fields later commands may change (a hand-written
    amendment's other keys, a wrong type, are ignored)."""
    fields, appended = amendment.get("set"), amendment.get("append")
    for field, value in fields.items() if isinstance(fields, dict) else ():
        if field in AMENDED_FIELDS:
            data[field] = value
    for field, items in appended.items() if isinstance(appended, dict) else ():
        if field in APPENDED_FIELDS and isinstance(items, list):
            data[field] = [*(data.get(field) or []), *items]


def _remote_job_files(root: Path, name: str = "*") -> dict[str, dict[str, Any]]:
    """For a remote workspace's mirror `root`: the job.json object (as remote.list_remote gives it) of each
    job, or of the job `name`, by job name; empty for a local workspace. One listing."""
    url = remote_url(root)
    if url is None:
        return {}
    from imgtune.storage.remote import list_remote

    with _bucket_errors():
        listed = list_remote(url, f"{name}/{JOB_FILE}")
    return {rel.split("/")[0]: info for rel, info in listed.items()}


def _created(root: Path, path: Path, record: dict | None) -> bool:
    """Make the job directory `path` with its first job.json, claiming its name in the bucket of a remote
    workspace (`_claim`): True when this call made it, False when the name is taken. Built as a hidden
    directory and renamed into place, so nothing is left behind under the name when this fails or is killed."""
    first = {**(record or {}), "name": path.name, "created": (record or {}).get("created") or now_iso()}
    first.setdefault("host", socket.gethostname())
    staging = root / f".{path.name}.creating-{os.getpid()}-{threading.get_ident()}"
    staging.mkdir()
    try:
        atomic_write_json(staging / JOB_FILE, first)
        if not _claim(root, path.name, staging, first):
            return False
        try:
            staging.rename(path)  # fails where a directory with anything in it is there already
        except OSError:
            return False
        return True
    finally:
        if staging.exists():
            import shutil

            shutil.rmtree(staging, ignore_errors=True)


def _claim(root: Path, name: str, staging: Path, first: dict[str, Any]) -> bool:
    """For a remote workspace's mirror `root`: write the job's first job.json into the bucket if the name is
    free there (True, recorded in the `staging` directory's sync record), or find it taken (False); always True
    for a local workspace (the rename into place is the claim)."""
    url = remote_url(root)
    if url is None:
        return True
    from imgtune.storage.remote import SyncedFolder, create_exclusively

    with _bucket_errors():
        created = create_exclusively(f"{url}/{name}/{JOB_FILE}", (staging / JOB_FILE).read_bytes())
        if created is None:
            return False
        mirror = SyncedFolder(f"{url}/{name}", staging, SYNC_RECORD, guard=JOB_FILE)
        mirror.adopt(JOB_FILE, created)  # the object is the local job.json: in step until the job writes more
    return True


def _in_remote_workspace(root: Path, name: str) -> bool:
    return bool(_remote_job_files(root, name))


def list_jobs(workspace: str | Path | None = None) -> Iterator[Job]:
    """Jobs in the workspace, newest first (a remote workspace's job.json files are pulled first)."""
    root = workspace_dir(workspace)
    for name, info in _remote_job_files(root).items():
        with _bucket_errors():
            Job(root / name)._synced().pull(listing={JOB_FILE: info})
    if not root.is_dir():
        return iter(())
    jobs = [Job(p) for p in root.iterdir() if (p / JOB_FILE).is_file() and not p.name.startswith(".")]  # (staging)
    return iter(sorted(jobs, key=lambda j: j.job_file.stat().st_mtime, reverse=True))
