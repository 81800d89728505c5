"""The tuning job report: `JOB/report.html` of a tuning job, self-contained like the training job's.

Objective per trial, parallel coordinates over the hyperparameters, the first two hyperparameters against
each other (learning rate vs batch size for the default space), and every trial's objective per epoch with
early-stopped and errored trials marked.
"""

from __future__ import annotations

import json
from typing import Any

from imgtune.core.io import json_safe
from imgtune.report import Figures, plotly_js
from imgtune.storage.jobs import Job

STATUS_SYMBOLS = {"completed": "circle", "early-stopped": "x", "errored": "triangle-down"}


def _numeric(values: list[Any]) -> tuple[list[float], list[str] | None]:
    """Plot positions for a hyperparameter's values: numbers as they are, anything else as category indices."""
    if all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        return [float(v) for v in values], None
    labels = sorted({str(v) for v in values})
    return [float(labels.index(str(v))) for v in values], labels


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
        fig = go.Figure(
            go.Bar(
                x=[t["trial"] for t in finished],
                y=[t["objective"] for t in finished],
                marker_color=["#d62728" if t["status"] == "early-stopped" else "#1f77b4" for t in finished],
                hovertext=[", ".join(f"{k}={v}" for k, v in t["hyperparameters"].items()) for t in finished],
            )
        )
        fig.update_layout(title=f"{objective} per trial (best first; red: stopped early)", yaxis_title=objective)
        plots.append(figures.div(fig, 340))
        dimensions = []
        for key in keys:
            positions, labels = _numeric([t["hyperparameters"].get(key) for t in finished])
            dimension = {"label": key, "values": positions}
            if labels:
                dimension.update(tickvals=list(range(len(labels))), ticktext=labels)
            dimensions.append(dimension)
        dimensions.append({"label": objective, "values": [t["objective"] for t in finished]})
        fig = go.Figure(
            go.Parcoords(
                line={"color": [t["objective"] for t in finished], "colorscale": "Viridis", "showscale": True},
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
                        "size": 14,
                        "color": [t["objective"] for t in finished],
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
    curves = go.Figure()
    for trial in trials:
        if not trial.get("job"):
            continue
        metrics = Job(job.path / trial["job"]).read_metrics()
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
    if curves.data:
        curves.update_layout(
            title=f"{objective} per epoch (dotted, x: stopped early by the scheduler)", xaxis_title="epoch"
        )
        plots.append(figures.div(curves, 420))
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
        "best": record.best,
        "plots": plots,
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
