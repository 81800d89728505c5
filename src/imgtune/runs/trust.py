"""The bucket is a trust boundary: what a job read from an s3:// workspace may not make this machine do.

Anyone who can write to a workspace's bucket can change its jobs' files. A job.json may name Python files (the
debugger's rule files, which `imgtune debug rules` and a training job import and run) and a Ray cluster to join
(a tuning job's `ray_address`). For a job read from a bucket, this machine runs no file and joins no cluster
because its job.json says so: those come from the command line of the user who runs the command, and what was
refused is said (on stderr and in the job's log). Ray Tune's own state (pickles) never crosses the bucket at all
(imgtune.storage.remote). A job in a local workspace was written by this machine's users, as the rest of its
files: its own settings stand.
"""

from __future__ import annotations

import logging
from typing import Any

from imgtune.storage.jobs import Job

log = logging.getLogger("imgtune")


def from_bucket(job: Job) -> bool:
    """True for a job of a remote (s3://) workspace, whose files anyone with write access to the bucket set."""
    return job.remote is not None


def refuse(job: Job, what: str, hint: str) -> None:
    """Say (on stderr and in the job's log) that `what`, named by the job's job.json, is not used here."""
    message = (
        f"job {job.name} comes from {job.remote}: its job.json names {what}, which is not used here (anyone who "
        f"can write to the bucket could have put it there); {hint}"
    )
    log.warning(message)
    job.log(message)


def trusted_rule_files(job: Job, recorded: list[str], given: list[str]) -> list[str]:
    """The debugger rule files to run for `job`: the job's `recorded` ones and the `given` ones (the command
    line's), or for a job from a bucket only the given ones."""
    if not from_bucket(job):
        return [*recorded, *(f for f in given if f not in recorded)]
    refused = [f for f in recorded if f not in given]
    if refused:
        refuse(job, f"debugger rule file(s) {', '.join(refused)}", "pass the ones you trust with --rule-file")
    return list(given)


def trusted_debugger(job: Job, debugger: dict[str, Any], given_rule_files: list[str] | None = None) -> dict[str, Any]:
    """A job's debugger settings (a dict, as in job.json) with the rule files to run: its own and
    `given_rule_files` (the command line's), or for a job from a bucket only the given ones, the rules and rule
    parameters that only a refused file defined dropped with it."""
    recorded, given = list(debugger.get("rule_files") or []), list(given_rule_files or [])
    if not recorded and not given:
        return debugger
    files = trusted_rule_files(job, recorded, given)
    if not set(recorded) - set(files):
        return {**debugger, "rule_files": files}
    from imgtune.debugger.rules.base import KIND, load_rule_files
    from imgtune.rules.base import rules_of

    load_rule_files(files)  # the built-in rules and the given files' (the user's own choice)
    known = rules_of(KIND)
    rules = [name for name in debugger.get("rules") or [] if name in known]
    parameters = {name: values for name, values in (debugger.get("rule_parameters") or {}).items() if name in known}
    return {**debugger, "rule_files": files, "rules": rules, "rule_parameters": parameters}


# Tracking settings a bucket may not choose: where this machine sends its MLflow credentials, and which
# registered model (and alias) in the user's registry it moves.
UNTRUSTED_TRACKING = ("mlflow_uri", "registered_model", "alias", "parent_run_id")


def trusted_config(job: Job, config: dict[str, Any], given_rule_files: list[str] | None = None) -> dict[str, Any]:
    """A job config (a dict, as in job.json) with what a bucket may not decide taken out: its debugger rule
    files (`trusted_debugger`: `given_rule_files`, the command line's, are trusted) and, for a job from a bucket,
    its MLflow server and registry settings (the environment's MLFLOW_TRACKING_URI, or MLflow's default, serves
    instead)."""
    debugger = config.get("debugger")
    if isinstance(debugger, dict):
        config = {**config, "debugger": trusted_debugger(job, debugger, given_rule_files)}
    tracking = config.get("tracking")
    if from_bucket(job) and isinstance(tracking, dict):
        named = {key: tracking[key] for key in UNTRUSTED_TRACKING if tracking.get(key)}
        if named:
            settings = ", ".join(f"{key} {value}" for key, value in named.items())
            refuse(job, f"MLflow settings ({settings})", "set MLFLOW_TRACKING_URI to track it on your own server")
            config = {**config, "tracking": {**tracking, **dict.fromkeys(named)}}
    return config


def forget_untrusted_run(job: Job) -> None:
    """For a job from a bucket that recorded an MLflow run: forget it (a resumed job would continue it on the
    server job.json names, with this machine's credentials); the resumed job makes a new run where the user's
    own settings say."""
    known = job.record().mlflow or {}
    if from_bucket(job) and known.get("tracking_uri"):
        refuse(job, f"the MLflow run {known.get('run_id')} at {known['tracking_uri']}", "a new run is made instead")
        job.update(mlflow=None)


def trusted_ray_address(job: Job, recorded: str | None, given: str | None, say: bool = True) -> str | None:
    """The Ray cluster a resumed job joins: the one `given` on the command line; without one, the `recorded`
    one for a local job, none (an in-process Ray) for a job from a bucket (said when `say`)."""
    if given or not from_bucket(job):
        return given or recorded
    if recorded and say:
        refuse(job, f"the Ray cluster {recorded}", "resume with --ray-address to run it on a cluster")
    return None
