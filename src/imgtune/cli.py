"""The `imgtune` command: thin wrappers that parse options, call the library and print with Rich."""

from __future__ import annotations

import functools
import json
import signal
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.table import Table

from imgtune.core.errors import ImgtuneError
from imgtune.core.version import __version__
from imgtune.data.check import MAX_IMAGE_PIXELS

app = typer.Typer(
    name="imgtune",
    help="Train, tune, debug, profile and serve image classifiers on your own machine.",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
data_app = typer.Typer(help="Check and download datasets.", no_args_is_help=True)
jobs_app = typer.Typer(help="List and inspect jobs.", invoke_without_command=True)
debug_app = typer.Typer(help="Debugger: rule results, offline rules, tensor plots.", no_args_is_help=True)
app.add_typer(data_app, name="data")
app.add_typer(jobs_app, name="jobs")
app.add_typer(debug_app, name="debug")
tune_app = typer.Typer(
    help="Tune hyperparameters on Ray Tune: each trial is a training job judged on the validation split (never "
    "test); with a frozen backbone all trials share one feature cache. `imgtune tune show JOB` lists the trials, "
    "`imgtune tune best JOB --train` trains the final model.",
    invoke_without_command=True,
)
app.add_typer(tune_app, name="tune")

out = Console()
err = Console(stderr=True, soft_wrap=True)

F = TypeVar("F", bound=Callable[..., Any])

ForceOption = Annotated[
    bool,
    typer.Option(
        "--force", help="With --resume: resume a job recorded as running on another machine (that machine is gone)."
    ),
]
WorkspaceOption = Annotated[
    str | None,
    typer.Option(
        "--workspace",
        envvar="IMGTUNE_WORKSPACE",
        help="Where jobs live: a folder, or s3://bucket/prefix to keep them in a bucket \\[default: ./imgtune-runs].",
    ),
]
JsonOption = Annotated[bool, typer.Option("--json", help="Print the result as JSON on stdout.")]


def friendly_errors(func: F) -> F:
    """Turn ImgtuneError into one clear line on stderr and exit code 2."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        # SIGTERM (a scheduler, `kill`) ends a job like Ctrl-C: recorded as stopped, resumable.
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
        try:
            return func(*args, **kwargs)
        except ImgtuneError as exc:
            err.print(f"[bold red]error:[/] {exc.message}", highlight=False)
            if exc.hint:
                err.print(f"[dim]hint:[/] {exc.hint}", highlight=False)
            raise typer.Exit(exc.exit_code) from None
        except KeyboardInterrupt:
            err.print("[yellow]interrupted[/]")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def _raise_keyboard_interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def print_json(data: Any) -> None:
    from imgtune.core.io import to_json

    sys.stdout.write(to_json(data, indent=2) + "\n")


def _version(value: bool) -> None:
    if value:
        out.print(f"imgtune {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Show the version and exit.")
    ] = False,
) -> None:
    """imgtune: a folder of photos and a pretrained CNN in, a tuned, debugged, profiled classifier out."""


# -- training ------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
def train(
    data: Annotated[str | None, typer.Option(help="Dataset folder or s3://bucket/prefix.")] = None,
    backbone: Annotated[str | None, typer.Option(help="torchvision or timm model \\[default: resnet50].")] = None,
    weights: Annotated[str | None, typer.Option(help="Local state dict for the backbone.")] = None,
    pretrained: Annotated[
        str | None, typer.Option(help="'default' (library ImageNet weights) or 'none' (random init).")
    ] = None,
    freeze: Annotated[str | None, typer.Option(help="backbone | all_but_last | none \\[default: backbone].")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs \\[default: 10].")] = None,
    lr: Annotated[float | None, typer.Option(help="Learning rate \\[default: 0.001].")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Batch size \\[default: 64].")] = None,
    image_size: Annotated[int | None, typer.Option(help="Input size in pixels \\[default: 224].")] = None,
    name: Annotated[str | None, typer.Option(help="Job name \\[default: BACKBONE-TIME].")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML config file (see `imgtune train --help`).")] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override any config key: --set train.optimizer=sgd.")
    ] = None,
    resume: Annotated[str | None, typer.Option(help="Continue a killed job (name or path).")] = None,
    force: ForceOption = False,
    no_debugger: Annotated[bool, typer.Option("--no-debugger", help="Turn tensor capture and rules off.")] = False,
    no_profiler: Annotated[
        bool, typer.Option("--no-profiler", help="Turn the system monitor, step timeline and trace off.")
    ] = False,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Train a classifier on a folder of labelled photos; the job directory holds everything it made.

    Config keys (YAML sections or --set a.b=value): data.{path,image_size,split_ratios,carve_missing,
    carve_fraction,split_seed,num_workers,max_image_pixels}, model.{backbone,pretrained,weights,head,
    head_hidden,dropout,freeze}, train.{epochs,batch_size,lr,optimizer,momentum,weight_decay,schedule,
    step_size,gamma,label_smoothing,mixed_precision,seed,deterministic,device,feature_cache,augment_views},
    train.early_stopping.{enabled,metric,patience,min_delta,restore_best}, debugger.{enabled,collections,
    activations_regex,train,eval,predict,histogram_bins,save_raw,rules,rule_parameters,stop_on,rule_files},
    profiler.{enabled,interval_ms,trace,trace_start_step,trace_steps,rules,rule_parameters,report}.
    """
    from imgtune.config import build_config
    from imgtune.runs.train import run_training_job

    if resume:
        given = {
            "--data": data,
            "--backbone": backbone,
            "--weights": weights,
            "--pretrained": pretrained,
            "--freeze": freeze,
            "--epochs": epochs,
            "--lr": lr,
            "--batch-size": batch_size,
            "--image-size": image_size,
            "--name": name,
            "--config": config,
            "--set": set_,
        }
        ignored = [flag for flag, value in given.items() if value]
        if ignored:
            err.print(f"[yellow]note:[/] --resume continues with the job's own config; ignored: {', '.join(ignored)}")
        job = run_training_job(resume=resume, workspace=workspace, progress=not as_json, force=force)
    else:
        flags = {
            "name": name,
            "data": {"path": data, "image_size": image_size},
            "model": {"backbone": backbone, "weights": weights, "pretrained": pretrained, "freeze": freeze},
            "train": {"epochs": epochs, "lr": lr, "batch_size": batch_size},
            "debugger": {"enabled": False} if no_debugger else {},
            "profiler": {"enabled": False} if no_profiler else {},
        }
        job = run_training_job(
            build_config(_raw_config(config, flags, set_)), workspace=workspace, progress=not as_json
        )
    _print_job_summary(job, as_json)


def _raw_config(config: Path | None, flags: dict[str, Any], overrides: list[str] | None) -> dict[str, Any]:
    """A raw job config: the --config file, then the flags, then --set overrides; a dataset is required."""
    from imgtune.config import apply_overrides, load_config_file, merge

    raw = load_config_file(config) if config else {}
    raw = apply_overrides(merge(raw, flags), overrides or [])
    if not raw.get("data", {}).get("path"):
        raise ImgtuneError("no dataset given", "pass --data PATH (or data.path in --config)")
    return raw


@app.command()
@friendly_errors
def demo(
    workspace: WorkspaceOption = None,
    epochs: Annotated[int, typer.Option(help="Epochs per trial and for the final model.")] = 8,
    max_trials: Annotated[int, typer.Option(help="Tuning trials.")] = 4,
    as_json: JsonOption = False,
) -> None:
    """The whole workflow on the built-in sample dataset (generated locally, no download): `imgtune pipeline`
    with a ResNet-18 trained from scratch on 64 px shapes; about two minutes on a 2-core CPU."""
    from imgtune.core.io import cache_dir
    from imgtune.data.sample import generate_sample_dataset

    dataset = generate_sample_dataset(cache_dir() / "sample-data")
    if not as_json:
        err.print(f"sample dataset: {dataset}")
    overrides = ["model.pretrained=none", "model.freeze=none", "data.image_size=64"]
    pipeline(
        data=str(dataset), backbone="resnet18", weights=None, epochs=epochs, max_trials=max_trials, max_parallel=2,
        port=0, keep_serving=False, name=None, set_=overrides, workspace=workspace, as_json=as_json,
    )  # fmt: skip


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _print_job_summary(job: Any, as_json: bool) -> None:
    record = job.read()
    summary = {
        "job": job.name,
        "path": str(job.path),
        "remote": job.remote,
        "status": record.get("status"),
        "epochs_run": record.get("epochs_run"),
        "stop_reason": record.get("stop_reason"),
        "best": record.get("best"),
        "test": {k: v for k, v in (record.get("test") or {}).items() if k not in ("confusion_matrix",)} or None,
        "excluded_files": record.get("dataset", {}).get("excluded_count", 0),
        "model": str(job.model_dir),
        "report": str(job.path / "report.html") if (job.path / "report.html").exists() else None,
        "profiler": record.get("profiler"),
        "timings": record.get("timings"),
    }
    if as_json:
        print_json(summary)
        return
    best = record.get("best") or {}
    test = record.get("test") or {}
    table = Table(title=f"job {job.name}: {record.get('status')}", show_header=False, title_justify="left")
    table.add_row("epochs run", _fmt(record.get("epochs_run")))
    if record.get("stop_reason"):
        table.add_row("stopped because", record["stop_reason"])
    if best:
        table.add_row(
            "best epoch",
            f"{best.get('epoch')} (valid accuracy {_fmt(best.get('valid_accuracy'))}, "
            f"valid loss {_fmt(best.get('valid_loss'))})",
        )
    if not test and record.get("status") == "completed":
        table.add_row("test accuracy", "- (no test split: see the dataset notes in `imgtune jobs show`)")
    if test:
        table.add_row(
            "test accuracy",
            f"{_fmt(test['accuracy'])} (top-5 {_fmt(test['top5_accuracy'])}, "
            f"loss {_fmt(test['loss'])}, {test['samples']} images)",
        )
    excluded = record.get("dataset", {}).get("excluded_count", 0)
    if excluded:
        table.add_row("excluded files", f"{excluded} (listed in {job.job_file} and logs.txt)")
    timings = record.get("timings", {})
    table.add_row("time", f"{_fmt(timings.get('total'), 1)} s (loop {_fmt(timings.get('training_loop'), 1)} s)")
    table.add_row("model bundle", str(job.model_dir))
    report = job.path / "report.html"
    if report.exists():
        table.add_row("report", str(report))
    issues = (record.get("profiler") or {}).get("issues") or []
    if issues:
        table.add_row("profiler issues", ", ".join(issues) + " (see the report)")
    table.add_row("job directory", str(job.path))
    if job.remote:
        table.add_row("kept in", job.remote)
    out.print(table)


# -- jobs ------------------------------------------------------------------------------------------------


@jobs_app.callback()
@friendly_errors
def jobs_list(ctx: typer.Context, workspace: WorkspaceOption = None, as_json: JsonOption = False) -> None:
    """List jobs with status and best metric (newest first). `imgtune jobs show JOB` for one job."""
    if ctx.invoked_subcommand is not None:
        ctx.obj = {"workspace": workspace}
        return
    from imgtune.storage.jobs import list_jobs, workspace_label

    rows = []
    for job in list_jobs(workspace):
        try:
            record = job.read()
        except ImgtuneError:
            continue
        best = record.get("best") or {}
        config = record.get("config") or record.get("options", {}).get("base", {})  # a tuning job's trials' base
        if record.get("kind") == "tuning" and best.get("objective_name") == "valid_accuracy":
            best = {"valid_accuracy": best.get("objective")}
        rows.append(
            {
                "name": job.name,
                "status": job.status(),
                "kind": record.get("kind", "training"),
                "backbone": config.get("model", {}).get("backbone"),
                "epochs_run": record.get("epochs_run"),
                "best_valid_accuracy": best.get("valid_accuracy"),
                "test_accuracy": (record.get("test") or {}).get("accuracy"),
                "created": record.get("created"),
                "path": str(job.path),
                "remote": job.remote,
            }
        )
    if as_json:
        print_json(rows)
        return
    if not rows:
        out.print(f"no jobs in {workspace_label(workspace)}")
        return
    table = Table(title=f"jobs in {workspace_label(workspace)}", title_justify="left")
    for column in ("name", "status", "backbone", "epochs", "best valid acc", "test acc", "created"):
        table.add_column(column)
    for r in rows:
        table.add_row(
            r["name"] + (" (tuning)" if r["kind"] == "tuning" else ""),
            r["status"],
            r["backbone"] or "-",
            _fmt(r["epochs_run"]),
            _fmt(r["best_valid_accuracy"]),
            _fmt(r["test_accuracy"]),
            r["created"] or "-",
        )
    out.print(table)


@jobs_app.command("show")
@friendly_errors
def jobs_show(
    ctx: typer.Context,
    job: Annotated[str, typer.Argument(help="Job name or path.")],
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show one job: status, config, timings, dataset, metrics per epoch, test results."""
    from imgtune.storage.jobs import Job

    workspace = workspace or (ctx.obj or {}).get("workspace")
    handle = Job.open(job, workspace)
    record = handle.read()
    record["status"] = handle.status()
    record["metrics"] = handle.read_metrics()
    if as_json:
        print_json(record)
        return
    _print_job_summary(handle, as_json=False)
    metrics = record["metrics"]
    if metrics:
        table = Table(title="epochs", title_justify="left")
        for column in ("epoch", "train loss", "train acc", "valid loss", "valid acc", "lr", "time s"):
            table.add_column(column, justify="right")
        for m in metrics:
            table.add_row(
                str(m["epoch"]),
                _fmt(m.get("train_loss")),
                _fmt(m.get("train_accuracy")),
                _fmt(m.get("valid_loss")),
                _fmt(m.get("valid_accuracy")),
                _fmt(m.get("lr"), 6),
                _fmt(m.get("epoch_time"), 2),
            )
        out.print(table)
    dataset = record.get("dataset", {})
    if dataset:
        out.print(
            f"dataset: {dataset.get('source')} images {dataset.get('images')}, "
            f"{len(dataset.get('classes', []))} classes, {dataset.get('excluded_count', 0)} excluded"
        )
        for note in dataset.get("notes", []):
            out.print(f"  note: {note}")
    if record.get("error"):
        out.print(f"[red]error:[/] {record['error']}")


# -- evaluation ------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
def report(
    job: Annotated[str, typer.Argument(help="Job name or path.")],
    out_file: Annotated[Path | None, typer.Option("--out", help="HTML file \\[default: JOB/report.html].")] = None,
    rules: Annotated[bool, typer.Option("--rules/--no-rules", help="Evaluate the profiler rules again first.")] = True,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Write a job's report: one self-contained HTML file (summary, curves, test results, debugger and profiler
    rules, system usage, step timeline, top operators, recommendations). Opens offline in any browser."""
    import time

    from imgtune.profiler import analyze_job
    from imgtune.report import write_report
    from imgtune.storage.jobs import Job

    handle = Job.open(job, workspace)
    started = time.perf_counter()
    if rules and (handle.path / "profiler").exists():
        handle.update(profiler=analyze_job(handle))
    path = write_report(handle, out_file)
    handle.push()  # a job of an s3:// workspace: its report goes to the bucket too
    seconds = time.perf_counter() - started
    if as_json:
        print_json({"job": handle.name, "report": str(path), "seconds": seconds})
    else:
        out.print(f"wrote {path} ({path.stat().st_size / 1e6:.1f} MB) in {seconds:.1f} s")


@app.command()
@friendly_errors
def evaluate(
    job: Annotated[str, typer.Argument(help="Job name or path.")],
    data: Annotated[str, typer.Option(help="Dataset folder or s3:// prefix.")],
    split: Annotated[str, typer.Option(help="train, valid, test, or all.")] = "test",
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Evaluate a job's model on a split of a dataset (top-1, top-5, per-class accuracy)."""
    from imgtune.runs.evaluate import evaluate_job

    result = evaluate_job(job, data, split=split, workspace=workspace, progress=not as_json)
    if as_json:
        print_json(result)
        return
    out.print(
        f"{split} accuracy {result['accuracy']:.4f}, top-5 {result['top5_accuracy']:.4f}, "
        f"loss {result['loss']:.4f} on {result['samples']} images"
    )
    if result["skipped_unknown_class"]:
        out.print(f"{result['skipped_unknown_class']} images of classes the model does not know were left out")
    worst = sorted((a, c) for c, a in result["per_class_accuracy"].items() if a is not None)[:5]
    if worst:
        out.print("lowest per-class accuracy: " + ", ".join(f"{c} {a:.2f}" for a, c in worst))


# -- data ------------------------------------------------------------------------------------------------


@data_app.command("check")
@friendly_errors
def data_check(
    path: Annotated[str, typer.Argument(help="Dataset folder or s3:// prefix.")],
    max_pixels: Annotated[int, typer.Option(help="Pixel count above which an image is refused.")] = MAX_IMAGE_PIXELS,
    as_json: JsonOption = False,
) -> None:
    """Check every image: counts per class and split, sizes, modes and each problem file with its reason.

    Exits 2 only when a problem stops training (no training images, fewer than two usable classes).
    """
    from imgtune.core.io import cache_dir
    from imgtune.data.check import check_layout
    from imgtune.data.folders import discover
    from imgtune.data.sources import resolve_source

    root = resolve_source(path, progress=not as_json)
    report = check_layout(discover(root), max_pixels=max_pixels, cache_dir=cache_dir(), progress=not as_json)
    if as_json:
        print_json(report.to_dict())
    else:
        _print_check(report)
    if report.fatal:
        raise typer.Exit(2)


def _print_check(report: Any) -> None:
    counts = report.counts()
    table = Table(title=f"{report.root} ({report.kind} layout)", title_justify="left")
    table.add_column("class")
    for split in counts:
        table.add_column(split, justify="right")
    for c in report.classes:
        label = c.id if c.name == c.id else f"{c.id} ({c.name})"
        table.add_row(label, *(str(counts[s].get(c.id, 0)) for s in counts))
    table.add_row("[bold]total", *(f"[bold]{sum(counts[s].values())}" for s in counts))
    out.print(table)
    sizes = report.size_summary()
    if sizes:
        out.print(
            f"sizes: width {sizes['min_width']}-{sizes['max_width']} (median {sizes['median_width']}), "
            f"height {sizes['min_height']}-{sizes['max_height']} (median {sizes['median_height']})"
        )
        out.print(
            "modes: "
            + ", ".join(f"{m} {n}" for m, n in sorted(report.modes().items()))
            + "; formats: "
            + ", ".join(f"{f} {n}" for f, n in sorted(report.formats().items()))
        )
    if report.problems:
        table = Table(title=f"{len(report.problems)} problem file(s), excluded from training", title_justify="left")
        table.add_column("file")
        table.add_column("reason")
        for p in report.problems:
            table.add_row(p.path, p.reason)
        out.print(table)
    for issue in report.issues:
        colour = "red" if issue.severity == "error" else "yellow"
        out.print(f"[{colour}]{issue.severity}:[/] {issue.message}", highlight=False)
    if not report.problems and not report.issues:
        out.print("[green]no problems found[/]")
    elif not report.fatal:
        out.print("[green]usable for training[/] (problem files are excluded and listed in the job)")


@data_app.command("download")
@friendly_errors
def data_download(
    name: Annotated[str, typer.Argument(help="Dataset name: dogimages.")],
    dest: Annotated[Path, typer.Option(help="Folder to download and unpack into.")] = Path("data"),
    url: Annotated[str | None, typer.Option(help="A mirror of the archive.")] = None,
    sha256: Annotated[str | None, typer.Option(help="Expected sha256 of the archive.")] = None,
    keep_archive: Annotated[bool, typer.Option(help="Keep the zip after unpacking.")] = False,
) -> None:
    """Download and unpack a dataset (resumable, size and checksum checked)."""
    from imgtune.data.download import download_dataset

    folder = download_dataset(name, dest, url=url, sha256=sha256, keep_archive=keep_archive)
    out.print(f"dataset ready: {folder}")
    out.print(f"next: imgtune data check {folder}  and  imgtune train --data {folder}")


# -- debugger ----------------------------------------------------------------------------------------------


def _parse_rule_params(params: list[str], rules: list[str]) -> dict[str, dict[str, str]]:
    """`Rule.key=value`, or `key=value` when a single rule is selected."""
    out: dict[str, dict[str, str]] = {}
    for item in params:
        key, sep, value = item.partition("=")
        rule, dot, name = key.rpartition(".")
        if not sep or not name:
            raise ImgtuneError(f"bad --param {item!r}", "write it as Rule.key=value, or key=value with one --rule")
        if not dot:
            if len(rules) != 1:
                raise ImgtuneError(f"--param {item!r} does not say which rule", "write it as Rule.key=value")
            rule = rules[0]
        if rule not in rules:
            raise ImgtuneError(f"--param {item!r} is for rule {rule}, which is not run", f"add --rule {rule}")
        out.setdefault(rule, {})[name] = value
    return out


def _print_rule_results(results: list[dict[str, Any]]) -> None:
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


@debug_app.command("rules")
@friendly_errors
def debug_rules(
    job: Annotated[str, typer.Argument(help="Job name or path.")],
    rule: Annotated[
        list[str] | None, typer.Option("--rule", help="Rule to run (repeatable) \\[default: the job's].")
    ] = None,
    param: Annotated[list[str] | None, typer.Option("--param", help="Rule parameter: Rule.key=value.")] = None,
    rule_file: Annotated[list[str] | None, typer.Option("--rule-file", help="Python file with Rule classes.")] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Run debugger rules offline over a stored job (also one still running) and print their results."""
    from imgtune.debugger.rules import make_rules
    from imgtune.debugger.runner import run_rules_offline
    from imgtune.debugger.store import open_trial
    from imgtune.storage.jobs import Job

    handle = Job.open(job, workspace)
    debug_config = handle.read().get("config", {}).get("debugger", {})
    names = list(rule or debug_config.get("rules") or [])
    params = {**debug_config.get("rule_parameters", {}), **_parse_rule_params(param or [], names)}
    rules = make_rules(names, params, [*debug_config.get("rule_files", []), *(rule_file or [])])
    results = list(run_rules_offline(open_trial(handle.path), rules).values())
    if as_json:
        print_json({"job": handle.name, "rules": results})
    else:
        _print_rule_results(results)


@debug_app.command("show")
@friendly_errors
def debug_show(
    job: Annotated[str, typer.Argument(help="Job name or path.")],
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Show the rule results recorded while the job trained, and what the debugger saved."""
    from imgtune.debugger.store import RULES_FILE, open_trial
    from imgtune.storage.jobs import Job

    handle = Job.open(job, workspace)
    trial = open_trial(handle.path)
    rules_file = handle.path / "debugger" / RULES_FILE
    results = json.loads(rules_file.read_text())["rules"] if rules_file.exists() else []
    saved = {c: len(names) for c, names in trial.collections().items()}
    if as_json:
        print_json(
            {
                "job": handle.name,
                "rules": results,
                "collections": trial.collections(),
                "steps": {m: len(trial.steps(m)) for m in trial.modes()},
            }
        )
        return
    _print_rule_results(results) if results else out.print("no rule results recorded")
    out.print(
        "saved: "
        + ", ".join(f"{c} ({n} tensors)" for c, n in saved.items())
        + "; steps: "
        + ", ".join(f"{m} {len(trial.steps(m))}" for m in trial.modes())
    )


@debug_app.command("plot")
@friendly_errors
def debug_plot(
    job: Annotated[str, typer.Argument(help="Job name or path.")],
    tensor: Annotated[str, typer.Option(help="Tensor name, e.g. loss (see `imgtune debug show JOB --json`).")],
    out_file: Annotated[Path, typer.Option("--out", help="PNG file to write.")],
    reduction: Annotated[str, typer.Option(help="min, max, mean, std, l1, l2, zeros.")] = "mean",
    workspace: WorkspaceOption = None,
) -> None:
    """Draw a tensor over steps: train and eval on their own step axes (the original notebook's loss plot)."""
    from imgtune.debugger.plots import plot_tensor
    from imgtune.debugger.store import open_trial

    trial = open_trial(job, workspace)
    plot_tensor(trial, tensor, out_file, reduction=reduction)
    out.print(f"wrote {out_file}")


# -- tune ------------------------------------------------------------------------------------------------


@tune_app.callback()
@friendly_errors
def tune(
    ctx: typer.Context,
    data: Annotated[str | None, typer.Option(help="Dataset folder or s3://bucket/prefix.")] = None,
    space: Annotated[
        Path | None, typer.Option(help="Search space YAML \\[default: lr 0.001-0.1 log, batch size].")
    ] = None,
    strategy: Annotated[
        str, typer.Option(help="bayesian (Optuna TPE) | random | grid | hyperband (ASHA).")
    ] = "bayesian",
    max_trials: Annotated[int, typer.Option(help="Trials to run (grid: every combination).")] = 8,
    max_parallel: Annotated[int, typer.Option(help="Trials running at once.")] = 2,
    objective: Annotated[
        str, typer.Option(help="valid_accuracy (maximised) or valid_loss (minimised).")
    ] = "valid_accuracy",
    early_stopping: Annotated[str, typer.Option(help="Stop poor trials early: none | median | asha.")] = "none",
    cpus_per_trial: Annotated[float, typer.Option(help="CPUs each trial reserves.")] = 1.0,
    gpus_per_trial: Annotated[float, typer.Option(help="GPUs each trial reserves.")] = 0.0,
    time_budget: Annotated[float | None, typer.Option(help="Stop starting trials after this many seconds.")] = None,
    stop_after: Annotated[
        int | None, typer.Option(help="Stop after this many finished trials without a better objective.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the searcher.")] = 0,
    ray_address: Annotated[
        str | None, typer.Option(help="An existing Ray cluster (e.g. 127.0.0.1:6379) \\[default: in-process Ray].")
    ] = None,
    warm_start: Annotated[
        list[str] | None, typer.Option(help="Earlier tuning job whose trials seed the searcher (repeatable).")
    ] = None,
    backbone: Annotated[str | None, typer.Option(help="torchvision or timm model \\[default: resnet50].")] = None,
    weights: Annotated[str | None, typer.Option(help="Local state dict for the backbone.")] = None,
    epochs: Annotated[int | None, typer.Option(help="Epochs per trial \\[default: 10].")] = None,
    name: Annotated[str | None, typer.Option(help="Tuning job name \\[default: tune-TIME].")] = None,
    config: Annotated[Path | None, typer.Option(help="YAML job config every trial starts from.")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key of the trials' config.")] = None,
    resume: Annotated[str | None, typer.Option(help="Continue a tuning job whose driver was killed.")] = None,
    force: ForceOption = False,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Tune hyperparameters: each trial is a training job inside the tuning job, judged on the validation split
    (never the test split). With a frozen backbone all trials share one feature cache, computed first.
    `imgtune tune show JOB` lists the trials; `imgtune tune best JOB --train` trains the final model."""
    if ctx.invoked_subcommand is not None:
        return
    from imgtune.tuning import use_ray_address

    if resume:
        from imgtune.storage.jobs import Job

        ray_address = Job.open(resume, workspace).read().get("options", {}).get("ray_address")
    use_ray_address(ray_address)  # before Ray is imported
    from imgtune.config import TuneOptions
    from imgtune.runs.tune import run_tuning_job
    from imgtune.tuning.space import load_space

    if resume:
        job = run_tuning_job(workspace=workspace, resume=resume, progress=not as_json, force=force)
    else:
        if data is None and config is None:
            raise ImgtuneError("no dataset given", "pass --data PATH")
        flags = {
            "data": {"path": data},
            "model": {"backbone": backbone, "weights": weights},
            "train": {"epochs": epochs},
            # Trials record what tuning needs; the final training (tune best --train) has debugger and profiler on.
            "debugger": {"enabled": False},
            "profiler": {"enabled": False, "report": False},
        }
        options = TuneOptions(
            base=_raw_config(config, flags, set_),
            space=load_space(space).to_dict(),
            strategy=strategy,
            max_trials=max_trials,
            max_parallel=max_parallel,
            objective=objective,
            early_stopping=early_stopping,
            cpus_per_trial=cpus_per_trial,
            gpus_per_trial=gpus_per_trial,
            time_budget_s=time_budget,
            stop_after_no_improvement=stop_after,
            seed=seed,
            ray_address=ray_address,
            warm_start=warm_start or [],
            name=name,
        )
        job = run_tuning_job(options, workspace=workspace, progress=not as_json)
    _print_tuning(job, as_json)


def _tuning_summary(job: Any) -> dict[str, Any]:
    record = job.read()
    return {
        "job": job.name,
        "path": str(job.path),
        "status": job.status(),
        "strategy": record.get("options", {}).get("strategy"),
        "objective": record.get("options", {}).get("objective"),
        "seconds": record.get("seconds"),
        "feature_cache_seconds": record.get("feature_cache_seconds"),
        "best": record.get("best"),
        "trials": record.get("trials", []),
    }


def _print_tuning(job: Any, as_json: bool) -> None:
    summary = _tuning_summary(job)
    if as_json:
        print_json(summary)
        return
    objective = summary["objective"]
    table = Table(title=f"tuning job {job.name}: {summary['status']} ({summary['strategy']})", title_justify="left")
    keys = sorted({k for t in summary["trials"] for k in t.get("hyperparameters", {})})
    short = [k.rsplit(".", 1)[-1] for k in keys]
    headers = short if len(set(short)) == len(short) else keys  # "lr" unless two sections share a name
    table.add_column("trial", no_wrap=True)
    for column in (*headers, objective.replace("valid_", "valid "), "status", "epochs", "seconds"):
        table.add_column(column, justify="left" if column == "status" else "right")
    for t in summary["trials"]:
        values = t.get("hyperparameters", {})
        table.add_row(
            t["trial"],
            *(_fmt(values.get(k), 4) if isinstance(values.get(k), float) else str(values.get(k)) for k in keys),
            _fmt(t.get("objective")),
            t["status"],
            str(t.get("epochs")),
            _fmt(t.get("seconds"), 1),
        )
    out.print(table)
    best = summary["best"]
    if best:
        out.print(
            f"best: {best['trial']} {objective} {_fmt(best['objective'])} with "
            + ", ".join(f"{k}={v!r}" for k, v in best["hyperparameters"].items())
        )
        out.print(f"train the final model with: imgtune tune best {job.name} --train")
    errored = [t for t in summary["trials"] if t["status"] == "errored"]
    for t in errored:
        last = (t.get("error") or "").strip().splitlines()[-1:] or ["?"]
        err.print(f"[red]{t['trial']} errored:[/] {last[0]} (traceback: imgtune tune show {job.name} --json)")


@tune_app.command("show")
@friendly_errors
def tune_show(
    job: Annotated[str, typer.Argument(help="Tuning job name or path.")],
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """The trials of a tuning job, best first: hyperparameters, objective, status, epochs, duration."""
    _print_tuning(_open_tuning_job(job, workspace), as_json)


def _open_tuning_job(name: str, workspace: str | None) -> Any:
    from imgtune.storage.jobs import Job

    handle = Job.open(name, workspace)
    if handle.read().get("kind") != "tuning":
        raise ImgtuneError(f"{handle.name} is not a tuning job", "`imgtune jobs` lists jobs and their kinds")
    return handle


@tune_app.command("best")
@friendly_errors
def tune_best(
    job: Annotated[str, typer.Argument(help="Tuning job name or path.")],
    train_final: Annotated[
        bool, typer.Option("--train", help="Train the final model with them (debugger and profiler on).")
    ] = False,
    name: Annotated[str | None, typer.Option(help="Name of the final training job.")] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """The best hyperparameters of a tuning job (with their real types); --train trains the final model."""
    handle = _open_tuning_job(job, workspace)
    record = handle.read()
    best = record.get("best")
    if not best:
        raise ImgtuneError(f"tuning job {handle.name} has no finished trial", "see `imgtune tune show`")
    if not train_final:
        if as_json:
            print_json(best)
        else:
            out.print(", ".join(f"{k}={v!r}" for k, v in best["hyperparameters"].items()))
        return
    from imgtune.runs.tune import train_best

    final = train_best(handle, name=name, progress=not as_json)
    _print_job_summary(final, as_json)


# -- serving ---------------------------------------------------------------------------------------------


@app.command()
@friendly_errors
def deploy(
    job: Annotated[str, typer.Argument(help="Job name or path (or a model bundle directory).")],
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 exposes it to the network.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8080,
    backend: Annotated[
        str,
        typer.Option(help="auto (the fastest path that agrees with fp32), torch, onnx, bf16, eager or compile."),
    ] = "auto",
    max_batch_size: Annotated[int, typer.Option(help="Most images per forward pass.")] = 32,
    max_batch_delay_ms: Annotated[float, typer.Option(help="Longest wait for a batch to fill.")] = 5.0,
    max_queue: Annotated[int, typer.Option(help="Most images waiting; beyond it requests get 503.")] = 256,
    max_payload_mb: Annotated[float, typer.Option(help="Largest request body (413 beyond it).")] = 6.0,
    api_key: Annotated[
        str | None, typer.Option(envvar="IMGTUNE_API_KEY", help="Require this key (X-API-Key or Bearer).")
    ] = None,
    allow_url_scheme: Annotated[
        list[str] | None,
        typer.Option("--allow-url-scheme", help='Also fetch {"url": ...} images with this scheme (s3 always).'),
    ] = None,
    endpoint_name: Annotated[
        str | None, typer.Option(help="Name in /endpoints/NAME/invocations \\[default: the job's name].")
    ] = None,
    threads: Annotated[int | None, typer.Option(help="Inference threads \\[default: the backend's choice].")] = None,
    workspace: WorkspaceOption = None,
) -> None:
    """Serve a job's model over HTTP (FastAPI on uvicorn), speaking the managed endpoint's protocol:
    POST /invocations (images, multipart, JSON with base64 or s3:// URLs; boto3's sagemaker-runtime client
    works), GET /ping, /health/live, /health/ready, /metrics (Prometheus) and a page at / to try a photo."""
    from imgtune.config import ServeOptions
    from imgtune.serving.server import serve

    schemes = tuple(dict.fromkeys(["s3", *(s.lower().removesuffix("://") for s in allow_url_scheme or [])]))
    options = ServeOptions(
        backend=backend,
        max_batch_size=max_batch_size,
        max_batch_delay_ms=max_batch_delay_ms,
        max_queue=max_queue,
        max_payload_bytes=int(max_payload_mb * 1024 * 1024),
        api_key=api_key,
        allowed_url_schemes=schemes,
        endpoint_name=endpoint_name,
        threads=threads,
    )
    err.print(f"serving {job} on http://{host}:{port} ({backend}); Ctrl-C stops it", highlight=False)
    serve(job, options, host=host, port=port, workspace=workspace)


def _print_predictions(results: list[dict[str, Any]], as_json: bool) -> None:
    if as_json:
        print_json(results)
        return
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


@app.command()
@friendly_errors
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files.")],
    job: Annotated[str | None, typer.Option(help="Predict in-process with this job's model.")] = None,
    endpoint: Annotated[str | None, typer.Option(help="Or ask a running endpoint (http://127.0.0.1:8080).")] = None,
    top_k: Annotated[int, typer.Option("--top-k", help="Classes to show per image.")] = 5,
    api_key: Annotated[str | None, typer.Option(envvar="IMGTUNE_API_KEY", help="The endpoint's API key.")] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """The top-k classes of each image, from a job's model (--job) or a running endpoint (--endpoint).
    A file that is not a usable image is reported, and the others are still classified (exit code 1)."""
    if (job is None) == (endpoint is None):
        raise ImgtuneError("say where the model is", "pass --job JOB or --endpoint URL (one of them)")
    if top_k < 1:
        raise ImgtuneError("--top-k must be at least 1")
    results: list[dict[str, Any]] = []
    if endpoint is not None:
        from imgtune.serving.client import EndpointClient

        client = EndpointClient(endpoint, api_key)
        for path in images:
            try:
                results.append({"file": str(path), "classes": client.predict_file(path, top_k)})
            except OSError as exc:
                results.append({"file": str(path), "error": f"unreadable: {exc.strerror or exc}"})
            except ImgtuneError as exc:
                if "answered 4" not in exc.message:
                    raise  # the endpoint is down or broken: no point going on
                results.append({"file": str(path), "error": exc.message})
    else:
        from imgtune.serving.predictor import Predictor

        predictor = Predictor.load(job, workspace=workspace)
        loaded = [(path, *predictor.tensor_from(path.read_bytes, path.suffix.lower())) for path in images]
        good = [tensor for _, tensor, _ in loaded if tensor is not None]
        rows = iter(predictor.logits(good) if good else [])  # one forward pass for all the usable images
        for path, tensor, error in loaded:
            if tensor is None:
                results.append({"file": str(path), "error": error})
            else:
                results.append({"file": str(path), "classes": predictor.classes(next(rows), top_k)})
    _print_predictions(results, as_json)
    if any("error" in result for result in results):
        raise typer.Exit(1)


@app.command("batch-transform")
@friendly_errors
def batch_transform_command(
    job: Annotated[str, typer.Argument(help="Job name or path (or a model bundle directory).")],
    source: Annotated[str, typer.Argument(help="Folder of images or s3:// prefix.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="FILE.csv or FILE.jsonl (appended to, resumable).")],
    top_k: Annotated[int, typer.Option("--top-k", help="Classes per image.")] = 5,
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 32,
    backend: Annotated[str, typer.Option(help="auto, torch, onnx, bf16, eager or compile.")] = "auto",
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """Classify every file under a folder or s3:// prefix into a CSV or JSON Lines file. Bad files become rows
    with the reason; a killed run, started again, skips what is already in the output."""
    from imgtune.serving.batch_transform import batch_transform, output_format
    from imgtune.serving.predictor import Predictor

    output_format(output)
    predictor = Predictor.load(job, backend=backend, workspace=workspace)
    summary = batch_transform(predictor, source, output, top_k=top_k, batch_size=batch_size, progress=not as_json)
    if as_json:
        print_json(summary.to_dict())
        return
    out.print(
        f"{summary.predicted} images classified, {summary.failed} unreadable (rows with the reason), "
        f"{summary.already_done} already done earlier; {summary.output} in {summary.seconds:.1f} s"
    )


# -- the whole workflow ----------------------------------------------------------------------------------


@app.command()
@friendly_errors
def pipeline(
    data: Annotated[str, typer.Option(help="Dataset folder or s3://bucket/prefix.")],
    backbone: Annotated[str, typer.Option(help="torchvision or timm model.")] = "resnet50",
    weights: Annotated[str | None, typer.Option(help="Local state dict for the backbone.")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs per trial and for the final model.")] = 10,
    max_trials: Annotated[int, typer.Option(help="Tuning trials.")] = 8,
    max_parallel: Annotated[int, typer.Option(help="Trials running at once.")] = 2,
    port: Annotated[int, typer.Option(help="Endpoint port on 127.0.0.1 \\[default: any free one].")] = 0,
    keep_serving: Annotated[
        bool, typer.Option("--keep-serving", help="Leave the endpoint up at the end until Ctrl-C.")
    ] = False,
    name: Annotated[str | None, typer.Option(help="Pipeline name \\[default: pipeline-TIME].")] = None,
    set_: Annotated[list[str] | None, typer.Option("--set", help="Override a key of every job's config.")] = None,
    workspace: WorkspaceOption = None,
    as_json: JsonOption = False,
) -> None:
    """The original notebook end to end: check the data, tune learning rate x batch size, train the final
    model with the best (debugger and profiler on), serve it, send one test photo per class through the
    endpoint, and summarise. The endpoint stops at the end unless --keep-serving."""
    import time

    from imgtune.config import PipelineOptions, apply_overrides
    from imgtune.runs.pipeline import run_pipeline

    def wait(url: str) -> None:
        err.print(f"the endpoint stays up on {url} (its page: {url}/); Ctrl-C stops it", highlight=False)
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            pass

    options = PipelineOptions(
        data=data, backbone=backbone, weights=weights, epochs=epochs, max_trials=max_trials,
        max_parallel=max_parallel, name=name, port=port, overrides=apply_overrides({}, set_ or []),
    )  # fmt: skip
    say = (lambda message: None) if as_json else (lambda message: err.print(f"[bold]{message}[/]"))
    job = run_pipeline(
        options, workspace=workspace, progress=not as_json, say=say, keep_serving=wait if keep_serving else None
    )
    record = job.read()
    summary = {
        "job": job.name,
        "status": record["status"],
        "seconds": record.get("seconds"),
        "test_accuracy": (record.get("test") or {}).get("accuracy"),
        "best_hyperparameters": (record.get("best_hyperparameters") or {}).get("hyperparameters"),
        "tuning_job": record.get("tuning_job"),
        "final_job": record.get("final_job"),
        "endpoint": record.get("endpoint"),
        "sample_predictions": record.get("sample_predictions", []),
        "artifacts": record.get("artifacts", {}),
        "step_seconds": record.get("step_seconds", {}),
    }
    if as_json:
        print_json(summary)
        return
    correct = sum(p["correct"] for p in summary["sample_predictions"])
    out.print(f"pipeline {job.name} completed in {summary['seconds']:.0f} s")
    accuracy = summary["test_accuracy"]
    shown = "no test split" if accuracy is None else f"test accuracy {accuracy:.4f}"
    out.print(f"  {shown} with {summary['best_hyperparameters']}")
    out.print(f"  endpoint {summary['endpoint']} (stopped): {correct} of {len(summary['sample_predictions'])} "
              "sample photos, one per class, classified correctly")  # fmt: skip
    for label, path in summary["artifacts"].items():
        out.print(f"  {label.replace('_', ' ')}: {path}")
