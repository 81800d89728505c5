"""The tuning job report: `JOB/report.html` of a tuning job, self-contained like the training job's.

Objective per trial, parallel coordinates over the hyperparameters, the first two hyperparameters against
each other (learning rate vs batch size for the default space), the best trials' objective per epoch with
early-stopped and errored trials marked, and a table of every trial.

A job of 1,000 trials stays a light page, written in about a second: the per-epoch curves are the best
MAX_CURVES trials' (only their metrics are read; the page says so), the other figures hold one compact point
per trial, and the table shows the end of at most MAX_TRACEBACKS errored trials' tracebacks (the last line
of the others'; the whole of each is in `imgtune tune show JOB --json`).
"""

from __future__ import annotations

import json
from typing import Any

from imgtune.core.io import json_safe
from imgtune.report import Figures, plotly_js
from imgtune.storage.jobs import Job

STATUS_SYMBOLS = {"completed": "circle", "early-stopped": "x", "errored": "triangle-down"}
MAX_CURVES = 20  # per-epoch curves drawn: the best trials' (a thousand lines say nothing and make a slow page)
MAX_TRACEBACKS = 10  # errored trials whose traceback's end the table shows
TRACEBACK_CHARS = 3000  # of each: a traceback's end says what failed


def _numeric(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Plot positions for a hyperparameter's values: numbers as they are (to 6 significant digits: the page
    stays small), anything else as category indices."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(f"{v:.6g}") for v in values], None
    labels = sorted({str(v) for v in values})
    index = {label: i for i, label in enumerate(labels)}
    return [float(index[str(v)]) for v in values], labels


def _value(value: Any) -> str:
    """A hyperparameter's value as the page shows it: floats to 4 significant digits."""
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _rows(trials: list[dict[str, Any]], keys: list[str]) -> list[dict[str, Any]]:
    """The table's rows, every trial; the traceback's end of the first MAX_TRACEBACKS errored trials, the last
    line of the others' errors."""
    rows, tracebacks = [], 0
    for t in trials:
        error = (t.get("error") or "").strip()
        traceback = None
        if error and tracebacks < MAX_TRACEBACKS:
            tracebacks += 1
            traceback = error if len(error) <= TRACEBACK_CHARS else "…" + error[-TRACEBACK_CHARS:]
        rows.append(
            {
                "trial": t["trial"],
                "values": [_value(t.get("hyperparameters", {}).get(k)) for k in keys],
                "objective": t.get("objective"),
                "status": t.get("status"),
                "epochs": t.get("epochs"),
                "seconds": t.get("seconds"),
                "node": t.get("node"),
                "error_line": error.splitlines()[-1] if error else None,
                "traceback": traceback,
            }
        )
    return rows


def _curves(figures: Figures, job: Job, trials: list[dict[str, Any]], objective: str) -> tuple[list[str], str | None]:
    """The objective per epoch of the best MAX_CURVES trials that have a job (trials come best first), and a
    note saying which trials the figure shows when it is not all of them."""
    import plotly.graph_objects as go

    curves = go.Figure()
    with_jobs = [t for t in trials if t.get("job") and t.get("objective") is not None]  # the others drew no point
    read = 0
    for trial in with_jobs:
        if len(curves.data) >= MAX_CURVES:
            break
        read += 1
        trial_job = Job(job.path / trial["job"])
        if not trial_job.metrics_file.exists():  # a tuning job of a bucket, pulled without its trials
            trial_job.pull(shallow=True)
        metrics = trial_job.read_metrics()
        points = [(m["epoch"], m[objective]) for m in metrics if m.get(objective) is not None]
        if not points:
            continue
        symbol = STATUS_SYMBOLS.get(trial["status"], "circle")
        curves.add_trace(
            go.Scatter(
                x=[e for e, _ in points],
                y=[v for _, v in points],
                mode="lines+markers",
                name=f"{trial['trial']} ({trial['status']})",
                marker={"symbol": ["circle"] * (len(points) - 1) + [symbol], "size": [6] * (len(points) - 1) + [12]},
                line={"dash": "dot" if trial["status"] == "early-stopped" else "solid"},
            )
        )
    if not curves.data:
        return [], None
    shown, capped = len(curves.data), read < len(with_jobs)
    which = f", the best {shown} of {len(trials)} trials" if capped else ""
    curves.update_layout(
        title=f"{objective} per epoch{which} (dotted, x: stopped early by the scheduler)", xaxis_title="epoch"
    )
    note = None
    if capped:
        note = (
            f"Per-epoch curves of the best {shown} of the {len(trials)} trials (at most {MAX_CURVES} are drawn); "
            "every trial is in the table below."
        )
    return [figures.div(curves, 420)], note


def build_tuning_context(job: Job) -> dict[str, Any]:
    import plotly.graph_objects as go

    record = job.record()
    options = record.options or {}
    objective = options.get("objective", "valid_accuracy")
    trials = record.trials or []
    keys = list(options.get("space", {}))
    figures = Figures()
    plots = []
    finished = [t for t in trials if t.get("objective") is not None]
    if finished:
        values = [t["objective"] for t in finished]
        fig = go.Figure(
            go.Bar(
                x=[t["trial"] for t in finished],
                y=values,
                marker_color=["#d62728" if t["status"] == "early-stopped" else "#1f77b4" for t in finished],
                hovertext=[", ".join(f"{k}={_value(v)}" for k, v in t["hyperparameters"].items()) for t in finished],
            )
        )
        fig.update_layout(title=f"{objective} per trial (best first; red: stopped early)", yaxis_title=objective)
        if len(finished) > 50:  # a thousand names under the bars are a black smear: hover over a bar for its own
            fig.update_xaxes(showticklabels=False, title=f"{len(finished)} trials, best first")
        plots.append(figures.div(fig, 340))
        dimensions = []
        for key in keys:
            positions, labels = _numeric([t["hyperparameters"].get(key) for t in finished])
            dimension = {"label": key, "values": positions}
            if labels:
                dimension.update(tickvals=list(range(len(labels))), ticktext=labels)
            dimensions.append(dimension)
        dimensions.append({"label": objective, "values": values})
        fig = go.Figure(
            go.Parcoords(
                line={"color": values, "colorscale": "Viridis", "showscale": True},
                dimensions=dimensions,
            )
        )
        fig.update_layout(title="Parallel coordinates: hyperparameters and objective")
        plots.append(figures.div(fig, 420, top=110))  # room for the axis titles above the plot
        if len(keys) >= 2:
            x_key, y_key = keys[0], keys[1]
            xs, x_labels = _numeric([t["hyperparameters"].get(x_key) for t in finished])
            ys, y_labels = _numeric([t["hyperparameters"].get(y_key) for t in finished])
            fig = go.Figure(
                go.Scatter(
                    x=xs,
                    y=ys,
                    mode="markers",
                    marker={
                        "size": 14 if len(finished) <= 50 else 8,  # a thousand big markers hide each other
                        "color": values,
                        "colorscale": "Viridis",
                        "showscale": True,
                        "symbol": [STATUS_SYMBOLS.get(t["status"], "circle") for t in finished],
                    },
                    text=[f"{t['trial']}: {t['objective']:.4f}" for t in finished],
                )
            )
            log_x = x_labels is None and options.get("space", {}).get(x_key, {}).get("scale") == "log"
            fig.update_layout(title=f"{x_key} vs {y_key} (colour: {objective})", xaxis_title=x_key, yaxis_title=y_key)
            fig.update_xaxes(type="log" if log_x else None)
            if x_labels:
                fig.update_xaxes(tickvals=list(range(len(x_labels))), ticktext=x_labels)
            if y_labels:
                fig.update_yaxes(tickvals=list(range(len(y_labels))), ticktext=y_labels, type="category")
            plots.append(figures.div(fig, 380))
    curves, curves_note = _curves(figures, job, trials, objective)
    plots += curves
    return {
        "name": record.name or job.name,
        "status": job.status(),
        "record": record,
        "options": options,
        "options_json": json.dumps(json_safe({k: v for k, v in options.items() if k != "base"}), indent=2),
        "base_json": json.dumps(json_safe(options.get("base", {})), indent=2),
        "objective": objective,
        "keys": keys,
        "trials": trials,
        "rows": _rows(trials, keys),
        "errored": sum(1 for t in trials if t.get("error")),
        "max_tracebacks": MAX_TRACEBACKS,
        "best": record.best,
        "plots": plots,
        "curves_note": curves_note,
        "figure_count": figures.count,
        "plotly_js": plotly_js(),
    }


def render_tuning_report(job: Job) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("imgtune.report", "templates"), autoescape=select_autoescape(["j2"]))
    return env.get_template("tuning_report.html.j2").render(**build_tuning_context(job))


def write_tuning_report(job: Job) -> Any:
    from imgtune.report import write_report

    return write_report(job)
