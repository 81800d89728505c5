"""Rich output of the commands. Each function takes what the library returns (the dicts of `imgtune.job_summary`,
`imgtune.tuning_summary` ...), the same data `--json` prints."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from rich.table import Table

from imgtune.cli.common import err, out


def fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def job_summary(summary: dict[str, Any]) -> None:
    """A training job at a glance (`imgtune.job_summary`)."""
    best = summary.get("best") or {}
    test = summary.get("test") or {}
    table = Table(title=f"job {summary['job']}: {summary.get('status')}", show_header=False, title_justify="left")
    table.add_row("epochs run", fmt(summary.get("epochs_run")))
    if summary.get("stop_reason"):
        table.add_row("stopped because", summary["stop_reason"])
    if best:
        table.add_row(
            "best epoch",
            f"{best.get('epoch')} (valid accuracy {fmt(best.get('valid_accuracy'))}, "
            f"valid loss {fmt(best.get('valid_loss'))})",
        )
    if not test and summary.get("status") == "completed":
        table.add_row("test accuracy", "- (no test split: see the dataset notes in `imgtune jobs show`)")
    if test:
        table.add_row(
            "test accuracy",
            f"{fmt(test['accuracy'])} (top-5 {fmt(test['top5_accuracy'])}, "
            f"loss {fmt(test['loss'])}, {test['samples']} images)",
        )
    excluded = summary.get("excluded_files") or 0
    if excluded:
        table.add_row("excluded files", f"{excluded} (listed in {Path(summary['path']) / 'job.json'} and logs.txt)")
    timings = summary.get("timings") or {}
    table.add_row("time", f"{fmt(timings.get('total'), 1)} s (loop {fmt(timings.get('training_loop'), 1)} s)")
    table.add_row("model bundle", summary["model"])
    if summary.get("report"):
        table.add_row("report", summary["report"])
    issues = (summary.get("profiler") or {}).get("issues") or []
    if issues:
        table.add_row("profiler issues", ", ".join(issues) + " (see the report)")
    table.add_row("job directory", summary["path"])
    if summary.get("remote"):
        table.add_row("kept in", summary["remote"])
    out.print(table)


def job_details(details: dict[str, Any]) -> None:
    """What `imgtune jobs show` adds to the summary (`imgtune.job_details`): epochs, dataset, error."""
    metrics = details.get("metrics") or []
    if metrics:
        table = Table(title="epochs", title_justify="left")
        for column in ("epoch", "train loss", "train acc", "valid loss", "valid acc", "lr", "time s"):
            table.add_column(column, justify="right")
        for m in metrics:
            table.add_row(
                str(m["epoch"]),
                fmt(m.get("train_loss")),
                fmt(m.get("train_accuracy")),
                fmt(m.get("valid_loss")),
                fmt(m.get("valid_accuracy")),
                fmt(m.get("lr"), 6),
                fmt(m.get("epoch_time"), 2),
            )
        out.print(table)
    dataset = details.get("dataset") or {}
    if dataset:
        out.print(
            f"dataset: {dataset.get('source')} images {dataset.get('images')}, "
            f"{len(dataset.get('classes', []))} classes, {dataset.get('excluded_count', 0)} excluded"
        )
        for note in dataset.get("notes", []):
            out.print(f"  note: {note}")
    if details.get("error"):
        out.print(f"[red]error:[/] {details['error']}")


def jobs_table(rows: list[dict[str, Any]], workspace: str) -> None:
    """The workspace's jobs (`imgtune.jobs_overview`), newest first."""
    if not rows:
        out.print(f"no jobs in {workspace}")
        return
    table = Table(title=f"jobs in {workspace}", title_justify="left")
    for column in ("name", "status", "backbone", "epochs", "best valid acc", "test acc", "created"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["name"] + _kind(r),
            r["status"],
            r["backbone"] or "-",
            fmt(r["epochs_run"]),
            fmt(r["best_valid_accuracy"]),
            fmt(r["test_accuracy"]),
            r["created"] or "-",
        )
    out.print(table)


def _kind(row: dict[str, Any]) -> str:
    """What follows a job's name in the jobs table: " (tuning, 1000 trials)" for a tuning job."""
    if row["kind"] != "tuning":
        return ""
    return f" (tuning, {row['trials']} trials)" if row.get("trials") is not None else " (tuning)"


def evaluation(result: dict[str, Any], split: str) -> None:
    """One evaluation (`imgtune.evaluate`): accuracy, top-5, loss, the weakest classes."""
    out.print(
        f"{split} accuracy {result['accuracy']:.4f}, top-5 {result['top5_accuracy']:.4f}, "
        f"loss {result['loss']:.4f} on {result['samples']} images"
    )
    if result["skipped_unknown_class"]:
        out.print(f"{result['skipped_unknown_class']} images of classes the model does not know were left out")
    worst = sorted((a, c) for c, a in result["per_class_accuracy"].items() if a is not None)[:5]
    if worst:
        out.print("lowest per-class accuracy: " + ", ".join(f"{c} {a:.2f}" for a, c in worst))


def data_check(report: dict[str, Any]) -> None:
    """A data check (`imgtune.check_data(...).to_dict()`): images per class and split, sizes, problems."""
    counts = report["images_per_class"]
    table = Table(title=f"{report['root']} ({report['layout']} layout)", title_justify="left")
    table.add_column("class")
    for split in counts:
        table.add_column(split, justify="right")
    for c in report["classes"]:
        label = c["id"] if c["name"] == c["id"] else f"{c['id']} ({c['name']})"
        table.add_row(label, *(str(counts[s].get(c["id"], 0)) for s in counts))
    table.add_row("[bold]total", *(f"[bold]{sum(counts[s].values())}" for s in counts))
    out.print(table)
    sizes = report["sizes"]
    if sizes:
        out.print(
            f"sizes: width {sizes['min_width']}-{sizes['max_width']} (median {sizes['median_width']}), "
            f"height {sizes['min_height']}-{sizes['max_height']} (median {sizes['median_height']})"
        )
        out.print(
            "modes: "
            + ", ".join(f"{m} {n}" for m, n in sorted(report["modes"].items()))
            + "; formats: "
            + ", ".join(f"{f} {n}" for f, n in sorted(report["formats"].items()))
        )
    problems = report["problem_files"]
    if problems:
        table = Table(title=f"{len(problems)} problem file(s), excluded from training", title_justify="left")
        table.add_column("file")
        table.add_column("reason")
        for p in problems:
            table.add_row(p["path"], p["reason"])
        out.print(table)
    for issue in report["issues"]:
        colour = "red" if issue["severity"] == "error" else "yellow"
        out.print(f"[{colour}]{issue['severity']}:[/] {issue['message']}", highlight=False)
    if not problems and not report["issues"]:
        out.print("[green]no problems found[/]")
    elif not report["fatal"]:
        out.print("[green]usable for training[/] (problem files are excluded and listed in the job)")


def rule_results(results: list[dict[str, Any]]) -> None:
    """Debugger rule results (`imgtune.debug_rules`, or those recorded while the job trained)."""
    colours = {"IssuesFound": "red", "NoIssuesFound": "green", "Error": "yellow", "InProgress": "cyan"}
    table = Table(title="debugger rules", title_justify="left")
    for column in ("rule", "status", "findings", "first finding"):
        table.add_column(column)
    for r in results:
        first = r["findings"][0] if r["findings"] else None
        detail = f"step {first['step']}: {first['message']}" if first else (r.get("error") or "")
        colour = colours.get(r["status"], "white")
        table.add_row(r["rule"], f"[{colour}]{r['status']}[/]", str(r["finding_count"]), detail)
    out.print(table)


def debugger_saved(results: dict[str, Any]) -> None:
    """What `imgtune debug show` prints (`imgtune.debug_results`): recorded rule results, collections, steps."""
    if results["rules"]:
        rule_results(results["rules"])
    else:
        out.print("no rule results recorded")
    out.print(
        "saved: "
        + ", ".join(f"{c} ({len(names)} tensors)" for c, names in results["collections"].items())
        + "; steps: "
        + ", ".join(f"{m} {n}" for m, n in results["steps"].items())
    )


SHOWN_TRIALS = 20  # rows of a tuning job's table: the best trials (`--all` for every one, `--json` has them all)
SHOWN_ERRORS = 5  # errored trials named on stderr


def tuning_trials(summary: dict[str, Any], limit: int | None = SHOWN_TRIALS) -> None:
    """A tuning job's trials (`imgtune.tuning_summary`): the best `limit` of them (all with None), the counts
    per status, its best, and the first errored trials (on stderr). A thousand trials print a screenful."""
    objective = summary["objective"]
    trials = summary["trials"]
    shown = trials if not limit else trials[:limit]
    title = f"tuning job {summary['job']}: {summary['status']} ({summary['strategy']})"
    if len(shown) < len(trials):
        title += f", the best {len(shown)} of {len(trials)} trials"
    table = Table(title=title, title_justify="left")
    keys = sorted({k for t in trials for k in t.get("hyperparameters", {})})
    short = [k.rsplit(".", 1)[-1] for k in keys]
    headers = short if len(set(short)) == len(short) else keys  # "lr" unless two sections share a name
    table.add_column("trial", no_wrap=True)
    for column in (*headers, objective.replace("valid_", "valid "), "status", "epochs", "seconds"):
        table.add_column(column, justify="left" if column == "status" else "right")
    for t in shown:
        values = t.get("hyperparameters", {})
        table.add_row(
            t["trial"],
            *(fmt(values.get(k), 4) if isinstance(values.get(k), float) else str(values.get(k)) for k in keys),
            fmt(t.get("objective")),
            t["status"],
            str(t.get("epochs")),
            fmt(t.get("seconds"), 1),
        )
    out.print(table)
    statuses: dict[str, int] = {}
    for t in trials:
        statuses[t["status"]] = statuses.get(t["status"], 0) + 1
    counts = ", ".join(f"{n} {status}" for status, n in statuses.items())
    more = f"; all of them: imgtune tune show {summary['job']} --all (or --json)" if len(shown) < len(trials) else ""
    out.print(f"{len(trials)} trials: {counts}{more}")
    best = summary["best"]
    if best:
        out.print(f"best: {best['trial']} {objective} {fmt(best['objective'])} with {hyperparameters(best)}")
        out.print(f"train the final model with: imgtune tune best {summary['job']} --train")
    if summary.get("report"):
        out.print(f"report: {summary['report']}")
    errored = [t for t in trials if t["status"] == "errored"]
    for t in errored[:SHOWN_ERRORS]:
        last = (t.get("error") or "").strip().splitlines()[-1:] or ["?"]
        err.print(f"[red]{t['trial']} errored:[/] {last[0]} (traceback: imgtune tune show {summary['job']} --json)")
    if len(errored) > SHOWN_ERRORS:
        more_errors = len(errored) - SHOWN_ERRORS
        err.print(f"[red]{more_errors} more trials errored[/] (imgtune tune show {summary['job']} --json)")


def hyperparameters(best: dict[str, Any]) -> str:
    """`lr=0.01, batch_size=32`: a trial's hyperparameters with their real types."""
    return ", ".join(f"{k}={v!r}" for k, v in best["hyperparameters"].items())


def predictions(results: list[dict[str, Any]]) -> None:
    """The top-k classes of each image (`imgtune.predict`), or why a file could not be classified."""
    for result in results:
        if "error" in result:
            out.print(f"[bold]{result['file']}[/]: [red]{result['error']}[/]", highlight=False)
            continue
        table = Table(title=result["file"], title_justify="left", show_edge=False)
        for column in ("class", "probability"):
            table.add_column(column, justify="right" if column == "probability" else "left")
        for item in result["classes"]:
            table.add_row(item["label"], f"{item['probability']:.4f}")
        out.print(table)


def batch_transform(summary: dict[str, Any]) -> None:
    """A batch transform's summary (`imgtune.batch_transform(...).to_dict()`)."""
    out.print(
        f"{summary['predicted']} images classified, {summary['failed']} unreadable (rows with the reason), "
        f"{summary['already_done']} already done earlier; {summary['output']} in {summary['seconds']:.1f} s"
    )


def export_summary(result: dict[str, Any]) -> None:
    """An export (`imgtune.export(...).to_dict()`): the files written, their sizes, how to serve them."""
    kind = "a Triton model repository" if result["triton"] else "a folder"
    out.print(f"{result['name']} exported as {result['format']} into {kind}: {result['out']}", highlight=False)
    table = Table()
    table.add_column("file")
    table.add_column("size", justify="right")
    for file, size in result["files"].items():
        table.add_row(file, _size(size))
    table.add_row("[bold]total[/]", f"[bold]{_size(result['bytes'])}[/]")
    out.print(table)
    if result.get("calibration_images"):
        out.print(f"int8 calibrated on {result['calibration_images']} training photos")
    model_dir = Path(result["model_dir"])
    if result["triton"]:
        out.print(f"serve: tritonserver --model-repository {result['out']}", highlight=False)
    out.print(f"how to feed it: {model_dir / 'README.md'} and {model_dir / 'preprocessing.json'}", highlight=False)


def _size(count: int) -> str:
    for unit in ("B", "KB", "MB"):
        if count < 1024 or unit == "MB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return str(count)


def pipeline_summary(summary: dict[str, Any]) -> None:
    """A finished pipeline (`imgtune.pipeline_summary`): test accuracy, the endpoint's answers, the artifacts."""
    correct = sum(p["correct"] for p in summary["sample_predictions"])
    out.print(f"pipeline {summary['job']} completed in {summary['seconds']:.0f} s")
    accuracy = summary["test_accuracy"]
    shown = "no test split" if accuracy is None else f"test accuracy {accuracy:.4f}"
    out.print(f"  {shown} with {summary['best_hyperparameters']}")
    out.print(f"  endpoint {summary['endpoint']} (stopped): {correct} of {len(summary['sample_predictions'])} "
              "sample photos, one per class, classified correctly")  # fmt: skip
    for label, path in summary["artifacts"].items():
        out.print(f"  {label.replace('_', ' ')}: {path}")
