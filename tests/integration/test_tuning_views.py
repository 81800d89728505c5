"""Views of a tuning job of 1,000 trials: `imgtune tune show`, `tune best`, `jobs`, `jobs show`, the summary and
the report stay bounded: the summary and `--json` hold every trial, the terminal table the best, the report
the best trials' curves; none of them reads a trial it does not show, here or from a bucket.

The tuning job is written from records (what a finished tuning job's job.json holds, and the trial directories
of the best trials): these are views of job directories, not of Ray.
"""

from __future__ import annotations

import html
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from imgtune.cli import app
from imgtune.cli.render import SHOWN_ERRORS, SHOWN_TRIALS
from imgtune.report import plotly_js
from imgtune.report.tuning import MAX_CURVES, MAX_TRACEBACKS, TRACEBACK_CHARS, render_tuning_report
from imgtune.runs.inspect import jobs_overview, tuning_summary
from imgtune.storage.jobs import Job
from imgtune.storage.record import JobRecord

TRIALS = 1000
ERRORED = 30  # the last trials (no objective), each with a long traceback
WITH_DIRS = MAX_CURVES + 10  # the best trials have their directories; the rest of the job lives in job.json only
EPOCHS = 8
SPACE = {
    "train.lr": {"type": "float", "low": 0.001, "high": 0.1, "scale": "log"},
    "train.batch_size": {"type": "categorical", "values": [16, 32, 64, 128, 256]},
}
runner = CliRunner()


def trial_entry(i: int) -> dict[str, Any]:
    errored = i >= TRIALS - ERRORED
    stopped = not errored and i % 4 == 3
    return {
        "trial": f"trial-a1b2c_{i:05d}",
        "hyperparameters": {"train.lr": 0.001 * 100 ** ((i * 0.618) % 1), "train.batch_size": [16, 32, 64][i % 3]},
        "objective": None if errored else round(0.9 - i * 0.0008, 4),  # best first, as job.json holds them
        "objective_name": "valid_accuracy",
        "status": "errored" if errored else ("early-stopped" if stopped else "completed"),
        "epochs": 0 if errored else (2 if stopped else EPOCHS),
        "stop_reason": None,
        "seconds": 1.5,
        "job": f"trials/trial-a1b2c_{i:05d}",
        "node": "127.0.0.1",
        "error": "Traceback (most recent call last):\n"
        + '  File "trainer.py", line 1, in step\n' * 400
        + f"RuntimeError: trial {i} ran out of memory"
        if errored
        else None,
    }


def write_tuning_job(path: Path, trials: int = TRIALS) -> Job:
    """A finished tuning job of `trials` trials; the best WITH_DIRS have a trial directory (job.json, metrics,
    a checkpoint); the trials drawn after MAX_CURVES have an unreadable metrics file (a folder), so a view that
    read one would fail."""
    entries = [trial_entry(i) for i in range(trials)]
    job = Job(path)
    path.mkdir(parents=True)
    options = {"base": {"model": {"backbone": "mobilenet_v2"}}, "space": SPACE, "strategy": "random",
               "objective": "valid_accuracy", "max_trials": trials}  # fmt: skip
    best = {k: entries[0][k] for k in ("trial", "hyperparameters", "objective", "objective_name", "job")}
    job.write(
        JobRecord(
            name=path.name,
            kind="tuning",
            status="completed",
            options=options,
            trials=entries,
            trials_count=len(entries),
            best=best,
            seconds=100.0,
        )  # fmt: skip
    )
    for rank, entry in enumerate(entries[:WITH_DIRS]):
        trial = Job(path / entry["job"])
        trial.path.mkdir(parents=True)
        trial.write(JobRecord(name=entry["trial"], status="completed", epochs_run=entry["epochs"]))
        (trial.path / "checkpoints").mkdir()
        (trial.path / "checkpoints" / "last.pt").write_bytes(b"\0" * 1000)
        if rank >= MAX_CURVES:
            trial.metrics_file.mkdir()  # not a file: reading it raises
            continue
        for epoch in range(1, entry["epochs"] + 1):
            value = entry["objective"] * (1 - math.exp(-epoch))
            trial.append_metrics({"epoch": epoch, "valid_accuracy": value, "valid_loss": 1 - value})
    return job


@pytest.fixture(scope="module")
def many(tmp_path_factory: pytest.TempPathFactory) -> Job:
    return write_tuning_job(tmp_path_factory.mktemp("workspace") / "many")


def figure_traces(page: str, figure: int) -> list[dict[str, Any]]:
    """The traces of the page's figure `figure` (1-based), as Plotly is given them."""
    start = re.search(rf'Plotly\.newPlot\(\s*"figure-{figure}",\s*', page).end()
    return json.JSONDecoder().raw_decode(page, start)[0]


def test_the_summary_holds_every_trial_from_job_json_alone(many: Job):
    summary = tuning_summary(many)
    assert len(summary["trials"]) == TRIALS  # 970 of them have no directory: the summary needs none
    assert summary["best"]["trial"] == "trial-a1b2c_00000" and summary["objective"] == "valid_accuracy"
    assert [t["trial"] for t in summary["trials"]] == [f"trial-a1b2c_{i:05d}" for i in range(TRIALS)]
    rows = jobs_overview(many.path.parent)
    assert [(r["name"], r["kind"], r["trials"], r["best_valid_accuracy"]) for r in rows] == [
        ("many", "tuning", TRIALS, 0.9)
    ]


def test_the_report_draws_the_best_trials_curves_and_lists_every_trial(many: Job):
    page = render_tuning_report(many)  # reads the drawn trials' metrics only: the next ones would raise
    assert "4 interactive figures" in page  # objective per trial, parallel coordinates, lr vs batch size, curves
    curves = figure_traces(page, 4)
    assert [t["name"].split(" ")[0] for t in curves] == [f"trial-a1b2c_{i:05d}" for i in range(MAX_CURVES)]
    assert all(len(t["x"]) == (2 if i % 4 == 3 else EPOCHS) for i, t in enumerate(curves))
    assert f"per epoch, the best {MAX_CURVES} of {TRIALS} trials" in page
    assert f"Per-epoch curves of the best {MAX_CURVES} of the {TRIALS} trials" in page
    # one point per finished trial in the other figures, every trial in the table
    assert len(figure_traces(page, 1)[0]["x"]) == TRIALS - ERRORED
    assert len(figure_traces(page, 2)[0]["dimensions"][0]["values"]) == TRIALS - ERRORED
    assert len(re.findall(r"<tr><td>trial-a1b2c_\d{5}</td>", page)) == TRIALS
    # the end of a few tracebacks, the last line of the others: the page stays light
    tracebacks = re.findall(r"<summary>traceback</summary><pre>(.*?)</pre>", page, re.S)
    tracebacks = [html.unescape(t) for t in tracebacks]
    assert len(tracebacks) == MAX_TRACEBACKS and all(len(t) <= TRACEBACK_CHARS + 1 for t in tracebacks)
    assert tracebacks[0].endswith(f"RuntimeError: trial {TRIALS - ERRORED} ran out of memory")
    assert page.count("ran out of memory") == ERRORED  # each errored trial's last line, once
    assert f"{ERRORED} trials errored" in page and "imgtune tune show many --json" in page
    assert len(page) - len(plotly_js()) < 600_000  # 1,000 trials: well under a megabyte besides Plotly itself


def test_a_small_tuning_job_draws_every_trial(tmp_path: Path):
    job = write_tuning_job(tmp_path / "few", trials=3)
    page = render_tuning_report(job)
    assert [t["name"].split(" ")[0] for t in figure_traces(page, 4)] == [f"trial-a1b2c_{i:05d}" for i in range(3)]
    assert "Per-epoch curves of the best" not in page and "valid_accuracy per epoch (dotted" in page


def test_cli_shows_the_best_trials_and_says_how_to_see_all(many: Job):
    workspace = ["--workspace", str(many.path.parent)]
    shown = runner.invoke(app, ["tune", "show", "many", *workspace])
    assert shown.exit_code == 0, shown.output
    rows = re.findall(r"trial-a1b2c_\d{5}", shown.stdout.split("\n1000 trials")[0])
    assert rows == [f"trial-a1b2c_{i:05d}" for i in range(SHOWN_TRIALS)]
    flat = " ".join(shown.stdout.split())  # as printed on 80 columns, lines wrapped
    assert f"the best {SHOWN_TRIALS} of {TRIALS} trials" in flat
    assert f"{TRIALS} trials: " in flat and "imgtune tune show many --all" in flat
    errors = shown.stderr.strip().splitlines()
    assert len(errors) == SHOWN_ERRORS + 1 and errors[-1].startswith(f"{ERRORED - SHOWN_ERRORS} more trials errored")
    every = runner.invoke(app, ["tune", "show", "many", "--all", *workspace])
    assert len(set(re.findall(r"trial-a1b2c_\d{5}", every.stdout))) == TRIALS
    as_json = json.loads(runner.invoke(app, ["tune", "show", "many", "--json", *workspace]).stdout)
    assert len(as_json["trials"]) == TRIALS and as_json["trials"][-1]["error"].endswith("ran out of memory")
    best = json.loads(runner.invoke(app, ["tune", "best", "many", "--json", *workspace]).stdout)
    assert best["trial"] == "trial-a1b2c_00000"
    # `imgtune jobs show` of a tuning job shows its trials (a training job's epochs and model would be empty)
    job_view = runner.invoke(app, ["jobs", "show", "many", *workspace])
    assert job_view.exit_code == 0 and f"the best {SHOWN_TRIALS} of {TRIALS} trials" in " ".join(
        job_view.stdout.split()
    )
    assert "model bundle" not in job_view.stdout
    listed = json.loads(runner.invoke(app, ["jobs", *workspace, "--json"]).stdout)
    assert [(r["name"], r["trials"]) for r in listed] == [("many", TRIALS)]


def test_views_of_a_tuning_job_in_a_bucket_pull_only_what_they_show(
    s3_client: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """Another machine (an empty cache) shows a bucket's tuning job: `tune show`, `tune best` and `jobs show`
    pull its job.json, not its trials; its report pulls the drawn trials' records and metrics, no checkpoint."""
    bucket, prefix = "imgtune-views", "team/many"
    s3_client.create_bucket(Bucket=bucket)
    source = write_tuning_job(tmp_path / "made-here" / "many", trials=60)
    for path in source.path.rglob("*"):
        if path.is_file():
            s3_client.put_object(Bucket=bucket, Key=f"{prefix}/{path.relative_to(source.path)}", Body=path.read_bytes())
    monkeypatch.setenv("IMGTUNE_CACHE", str(tmp_path / "machine-b"))
    workspace = ["--workspace", f"s3://{bucket}/team"]
    for command in (["tune", "show", "many"], ["tune", "best", "many"], ["jobs", "show", "many"]):
        result = runner.invoke(app, [*command, *workspace, "--json"])
        assert result.exit_code == 0, result.output
    mirror = tmp_path / "machine-b" / "workspaces" / "s3" / bucket / "team" / "many"
    assert (mirror / "job.json").is_file() and not (mirror / "trials").exists()
    assert len(json.loads(result.stdout)["trials"]) == 60
    # the drawn trials' metrics are pulled (the others' would raise if read), their checkpoints never are
    result = runner.invoke(app, ["report", "many", *workspace, "--json"])
    assert result.exit_code == 0, result.output
    pulled = sorted(p.relative_to(mirror / "trials").as_posix() for p in (mirror / "trials").rglob("*") if p.is_file())
    assert {p.split("/")[1] for p in pulled if not p.split("/")[1].startswith(".imgtune-")} == {
        "job.json",
        "metrics.jsonl",
    }
    assert len({p.split("/")[0] for p in pulled}) == MAX_CURVES
    report = s3_client.get_object(Bucket=bucket, Key=f"{prefix}/report.html")["Body"].read().decode()
    assert [t["name"].split(" ")[0] for t in figure_traces(report, 4)] == [f"trial-a1b2c_{i:05d}" for i in range(20)]
