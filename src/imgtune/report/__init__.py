"""The job report: one self-contained HTML file per job (`JOB/report.html`), interactive and offline.

Plotly's JavaScript is bundled inline once; every figure is a div drawn by it, so the file needs no network
and no CDN. The page is rendered from a Jinja2 template (`templates/job_report.html.j2`) and prints to PDF
from a browser (print styles keep figures whole on a page).

Long jobs stay fast: series longer than MAX_POINTS are reduced to MAX_POINTS buckets (mean, and the
maximum where peaks matter), so an hour of samples and tens of thousands of steps render in seconds.
"""

from __future__ import annotations

import html
import json
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from imgtune.core.io import atomic_write_text, json_safe
from imgtune.rules import advice_for
from imgtune.storage.jobs import Job

if TYPE_CHECKING:
    from imgtune.profiler.data import ProfileData

# The profiler (and torch with it) is imported where a training job's report reads it: a tuning job's report
# (`imgtune report TUNING_JOB`) needs neither, and torch takes seconds to load.

REPORT_FILE = "report.html"
MAX_POINTS = 2000
MIN_STEPS_PLOTTED = 10
PLOT_CONFIG = {"displaylogo": False, "responsive": True}
SEGMENT_COLORS = ("#636efa", "#ef553b", "#00cc96", "#ab63fa", "#ffa15a", "#b0bec5")
COLORS = {"train": "#1f77b4", "valid": "#ff7f0e", "test": "#2ca02c", "eval": "#ff7f0e", "predict": "#2ca02c"}


@cache
def plotly_js() -> str:
    from plotly.offline import get_plotlyjs

    return get_plotlyjs()


def reduce_series(x: np.ndarray, y: np.ndarray, peaks: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_POINTS points: bucket means (or maxima with `peaks`) of a long series."""
    if len(x) <= MAX_POINTS:
        return x, y
    edges = np.linspace(0, len(x), MAX_POINTS + 1).astype(int)
    xs = np.array([x[a:b].mean() for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a])
    reduce = np.nanmax if peaks else np.nanmean
    ys = np.array([reduce(y[a:b]) for a, b in zip(edges[:-1], edges[1:], strict=True) if b > a])
    return xs, ys


class Figures:
    """Builds Plotly figures as HTML divs, numbered in page order."""

    def __init__(self) -> None:
        self.count = 0

    def div(self, fig: Any, height: int = 360, top: int = 48) -> str:
        self.count += 1
        fig.update_layout(
            height=height,
            margin={"l": 60, "r": 20, "t": top, "b": 48},
            template="plotly_white",
            legend={"orientation": "h", "y": -0.2},
        )
        return fig.to_html(full_html=False, include_plotlyjs=False, div_id=f"figure-{self.count}", config=PLOT_CONFIG)


def _training_curves(figures: Figures, metrics: list[dict[str, Any]]) -> list[str]:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    if not metrics:
        return []
    fig = make_subplots(rows=1, cols=2, subplot_titles=("loss", "accuracy"))
    epochs = [m["epoch"] for m in metrics]
    for column, kind in ((1, "loss"), (2, "accuracy")):
        for split in ("train", "valid"):
            key = f"{split}_{kind}"
            if any(key in m for m in metrics):
                fig.add_trace(
                    go.Scatter(
                        x=epochs,
                        y=[m.get(key) for m in metrics],
                        name=f"{split} {kind}",
                        mode="lines+markers",
                        line={"color": COLORS[split], "dash": "solid" if kind == "loss" else "dot"},
                    ),
                    row=1,
                    col=column,
                )
        fig.update_xaxes(title_text="epoch", row=1, col=column)
    fig.update_layout(title="Training curves: train vs valid")
    return [figures.div(fig)]


def _test_figures(figures: Figures, test: dict[str, Any], classes: dict[str, str]) -> list[str]:
    import plotly.graph_objects as go

    out = []
    per_class = test.get("per_class_accuracy") or {}
    if per_class:
        ids = list(per_class)
        names = [classes.get(i, i) for i in ids]
        fig = go.Figure(go.Bar(x=names, y=[per_class[i] for i in ids], marker_color=COLORS["test"]))
        fig.update_layout(title="Test accuracy per class", yaxis={"range": [0, 1], "title": "accuracy"})
        out.append(figures.div(fig, 360))
    matrix = test.get("confusion_matrix")
    if matrix:
        names = [classes.get(i, i) for i in per_class] or [str(i) for i in range(len(matrix))]
        fig = go.Figure(
            go.Heatmap(
                z=matrix,
                x=names,
                y=names,
                colorscale="Blues",
                hovertemplate="true %{y}<br>predicted %{x}<br>%{z} images<extra></extra>",
            )
        )
        fig.update_layout(
            title="Confusion matrix (test)",
            xaxis={"title": "predicted"},
            yaxis={"title": "true", "autorange": "reversed"},
        )
        out.append(figures.div(fig, max(360, min(900, 22 * len(names) + 160))))
    return out


def _debugger_section(figures: Figures, job: Job) -> dict[str, Any] | None:
    import plotly.graph_objects as go

    directory = job.path / "debugger"
    rules_path = directory / "rules.json"
    if not directory.exists():
        return None
    rules = {r["rule"]: r for r in json.loads(rules_path.read_text())["rules"]} if rules_path.exists() else {}
    plots = []
    try:
        from imgtune.debugger.store import Trial

        trial = Trial(directory)
    except Exception:
        trial = None
    if trial is not None and trial.has_tensor("loss"):
        series = trial.tensor("loss")
        fig = go.Figure()
        for mode in ("train", "eval"):
            records = series.by_mode.get(mode, {})
            if not records:
                continue
            steps = sorted(records)
            x = np.array([records[s]["mode_step"] for s in steps], dtype=float)
            y = np.array([records[s]["r"]["mean"] for s in steps], dtype=float)
            x, y = reduce_series(x, y)
            fig.add_trace(go.Scatter(x=x, y=y, name=f"{mode} loss", mode="lines", line={"color": COLORS[mode]}))
        fig.update_layout(title="Loss per step (train and eval, each on its own step axis)", xaxis_title="mode step")
        plots.append(figures.div(fig, 340))
    shown: set[str] = set()
    for result in rules.values():
        for finding in result.get("findings", [])[:3]:
            name = finding.get("tensor")
            if trial is None or not name or name in shown or not trial.has_tensor(name) or len(shown) >= 4:
                continue
            shown.add(name)
            series = trial.tensor(name)
            fig = go.Figure()
            for mode, records in series.by_mode.items():
                steps = sorted(records)
                x = np.array([records[s]["mode_step"] for s in steps], dtype=float)
                y = np.array([records[s]["r"]["mean"] for s in steps], dtype=float)
                x, y = reduce_series(x, y)
                fig.add_trace(go.Scatter(x=x, y=y, name=f"{mode}", mode="lines+markers" if len(x) < 60 else "lines"))
            fig.update_layout(title=f"{name} (mean) — evidence for {result['rule']}", xaxis_title="mode step")
            plots.append(figures.div(fig, 300))
    return {"rules": list(rules.values()), "plots": plots}


def _profiler_section(figures: Figures, job: Job, timings: dict[str, float]) -> dict[str, Any] | None:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from imgtune.profiler import read_rule_results
    from imgtune.profiler.data import PROFILER_DIR, ProfileData
    from imgtune.profiler.rules import system_usage_table
    from imgtune.profiler.timeline import SEGMENTS

    if not (job.path / PROFILER_DIR).exists():
        return None
    data = ProfileData.load(job.path, timings)
    rules = read_rule_results(job.path)
    plots = []
    if data.samples:
        t = data.times
        t = t - t[0]
        rows = 3 if data.gpu_count else 2
        titles = ["CPU utilisation (%)", "memory"] + (["GPU (%)"] if data.gpu_count else [])
        fig = make_subplots(rows=rows, cols=1, shared_xaxes=True, subplot_titles=titles, vertical_spacing=0.08)
        cores = data.core_matrix()
        for core in range(cores.shape[1]):
            x, y = reduce_series(t, cores[:, core])
            fig.add_trace(go.Scatter(x=x, y=y, name=f"core {core}", mode="lines", line={"width": 1}), row=1, col=1)
        x, y = reduce_series(t, data.series("cpu_total"))
        fig.add_trace(go.Scatter(x=x, y=y, name="all cores", mode="lines", line={"width": 2.5}), row=1, col=1)
        x, y = reduce_series(t, data.series("proc_rss") / 1e6, peaks=True)
        fig.add_trace(go.Scatter(x=x, y=y, name="job memory (MB)", mode="lines"), row=2, col=1)
        for i in range(data.gpu_count):
            x, y = reduce_series(t, data.gpu_series(i, "util"))
            fig.add_trace(go.Scatter(x=x, y=y, name=f"GPU {i} util", mode="lines"), row=3, col=1)
            memory = data.gpu_memory_percent(i)
            x, y = reduce_series(t, memory, peaks=True)
            fig.add_trace(go.Scatter(x=x, y=y, name=f"GPU {i} memory %", mode="lines"), row=3, col=1)
        fig.update_xaxes(title_text="seconds since the job started", row=rows, col=1)
        fig.update_layout(title="Utilisation over time")
        plots.append(figures.div(fig, 220 * rows + 80))
    outliers = rules.get("StepOutlier", {}).get("details", {})
    step_plots = []
    for phase in data.phases():
        durations = data.step_array("total", phase) * 1000
        if durations.size < MIN_STEPS_PLOTTED:  # a distribution of two test batches says nothing
            continue
        index = np.arange(durations.size, dtype=float)
        x, y = reduce_series(index, durations, peaks=True)
        fig = make_subplots(rows=1, cols=2, column_widths=[0.62, 0.38], subplot_titles=("over steps", "distribution"))
        fig.add_trace(go.Scatter(x=x, y=y, name=f"{phase} step (ms)", mode="lines", line={"width": 1}), row=1, col=1)
        limit = outliers.get(phase, {}).get("limit_s")
        if limit is None and durations.size > 2:
            limit = (durations.mean() + 3 * durations.std()) / 1000
        if limit is not None:
            fig.add_hline(y=limit * 1000, line_dash="dash", line_color="#d62728", row=1, col=1)
            slow = np.flatnonzero(durations > limit * 1000)[:MAX_POINTS]
            if slow.size:
                fig.add_trace(
                    go.Scatter(x=slow, y=durations[slow], mode="markers", name="outliers", marker={"color": "#d62728"}),
                    row=1,
                    col=1,
                )
        fig.add_trace(go.Histogram(x=durations, nbinsx=60, name="count", showlegend=False), row=1, col=2)
        fig.update_xaxes(title_text=f"{phase} batch", row=1, col=1)
        fig.update_xaxes(title_text="ms", row=1, col=2)
        fig.update_layout(title=f"Step durations: {phase} ({durations.size} batches)")
        step_plots.append(figures.div(fig, 320))
    plots += step_plots
    job_parts = {
        k: timings[k] for k in ("initialization", "feature_cache", "training_loop", "finalization") if k in timings
    }
    if job_parts:
        fig = go.Figure()
        for part, seconds in job_parts.items():
            if part == "initialization":  # it includes building the feature cache, shown on its own
                seconds -= job_parts.get("feature_cache", 0.0)
            fig.add_trace(go.Bar(y=["job"], x=[seconds], name=part.replace("_", " "), orientation="h"))
        fig.update_layout(barmode="stack", title="Job time: initialisation, training loop, finalisation (s)")
        plots.append(figures.div(fig, 200))
    breakdown = {phase: data.segment_totals(phase) for phase in data.phases()}
    if breakdown:
        fig = make_subplots(rows=1, cols=2, subplot_titles=("per phase", "training, per epoch"))
        epochs = data.epochs()
        per_epoch = {e: data.segment_totals("train", e) for e in epochs}
        for i, segment in enumerate((*SEGMENTS, "other")):
            color = SEGMENT_COLORS[i]
            fig.add_trace(
                go.Bar(y=list(breakdown), x=[breakdown[p][segment] for p in breakdown], name=segment,
                       orientation="h", marker_color=color, legendgroup=segment),
                row=1, col=1,
            )  # fmt: skip
            fig.add_trace(
                go.Bar(x=epochs, y=[per_epoch[e][segment] for e in epochs], name=segment, marker_color=color,
                       legendgroup=segment, showlegend=False),
                row=1, col=2,
            )  # fmt: skip
        fig.update_layout(barmode="stack", title="Step time breakdown (seconds)")
        fig.update_xaxes(title_text="seconds", row=1, col=1)
        fig.update_xaxes(title_text="epoch", row=1, col=2)
        plots.append(figures.div(fig, 320))
    ranks = _ranks_section(figures, job, data, rules) if len(data.rank_steps) > 1 else None
    return {
        "rules": list(rules.values()),
        "usage": system_usage_table(data) if data.samples else [],
        "ranks": ranks,
        "plots": plots,
        "operators": data.operators,
        "trace": data.trace.relative_to(job.path).as_posix() if data.trace else None,
        "meta": data.meta,
        "samples": len(data.samples),
        "steps": len(data.steps),
    }


def _ranks_section(figures: Figures, job: Job, data: ProfileData, rules: dict[str, Any]) -> dict[str, Any]:
    """A data-parallel job's ranks side by side: per rank, where it ran and its median training step by segment
    (a table and a figure, over the steps StragglerRank judges), its step times over the steps, and each node's
    system usage."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from imgtune.profiler.data import ProfileData, percentiles
    from imgtune.profiler.rules import RULES, rank_step_table
    from imgtune.profiler.timeline import SEGMENTS

    nodes = {w.get("rank"): w.get("node") for w in job.record().workers or []}
    default = RULES["StragglerRank"].parameters["patience"]
    patience = int(rules.get("StragglerRank", {}).get("parameters", {}).get("patience", default))
    rows = rank_step_table(data, patience)
    if not rows:  # a job shorter than the warm-up: every step
        patience, rows = 0, rank_step_table(data)
    for row in rows:
        row["node"] = nodes.get(row["rank"]) or row["host"]
    plots = []
    if rows:
        labels = [f"rank {row['rank']}" for row in rows]
        fig = make_subplots(
            rows=1, cols=2, column_widths=[0.45, 0.55], subplot_titles=("median training step", "training steps")
        )
        for i, segment in enumerate((*SEGMENTS, "other")):
            values = [row[f"{segment}_ms"] for row in rows]
            fig.add_trace(
                go.Bar(y=labels, x=values, name=segment, orientation="h", marker_color=SEGMENT_COLORS[i]), row=1, col=1
            )
        for rank, records in sorted(data.rank_steps.items()):
            durations = ProfileData(steps=records).step_array("total", "train") * 1000
            x, y = reduce_series(np.arange(durations.size, dtype=float), durations, peaks=True)
            fig.add_trace(go.Scatter(x=x, y=y, name=f"rank {rank}", mode="lines", line={"width": 1}), row=1, col=2)
        fig.update_yaxes(autorange="reversed", row=1, col=1)  # rank 0 on top, as in the table
        fig.update_xaxes(title_text="ms", row=1, col=1)
        fig.update_xaxes(title_text="training batch", row=1, col=2)
        fig.update_yaxes(title_text="ms", row=1, col=2)
        fig.update_layout(barmode="stack", title=f"Ranks side by side ({len(rows)} ranks, milliseconds)")
        plots.append(figures.div(fig, max(320, 40 * len(rows) + 200)))
    usage = []
    for rank, samples in sorted(data.node_samples.items()):
        node = ProfileData(samples=samples)
        gpus = [node.gpu_series(i, "util") for i in range(node.gpu_count)]
        usage.append(
            {
                "host": next((s.get("host") for s in samples if s.get("host")), None),
                "node": nodes.get(rank),
                "rank": rank,
                "samples": len(samples),
                "cpu": percentiles(node.series("cpu_total")),
                "memory_p95": percentiles(node.series("mem_used"))["p95"],
                "rss_max_mb": percentiles(node.series("proc_rss") / 1e6)["max"],
                "gpu_p50": percentiles(np.concatenate(gpus))["p50"] if gpus else None,
            }
        )
    return {"rows": rows, "plots": plots, "nodes": usage, "world_size": data.world_size, "warmup": patience}


def _recommendations(profiler: dict[str, Any] | None, debugger: dict[str, Any] | None) -> list[dict[str, str]]:
    import imgtune.debugger.rules  # noqa: F401  (registers the debugger's built-in rules: their advice is read here)
    from imgtune.profiler.rules import ISSUES

    out = []
    for rule in (profiler or {}).get("rules", []):
        if rule.get("status") == ISSUES:
            do = rule.get("recommendation") or advice_for("profiler", rule["rule"])
            out.append({"rule": rule["rule"], "what": rule["message"], "do": do})
    for rule in (debugger or {}).get("rules", []):
        if rule.get("status") == ISSUES:
            first = (rule.get("findings") or [{}])[0]
            out.append(
                {"rule": rule["rule"], "what": first.get("message", ""), "do": advice_for("debugger", rule["rule"])}
            )
    return out


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        if not np.isfinite(value):
            return "–"
        return f"{value:.{digits}g}"
    return html.escape(str(value))


def build_context(job: Job, status: str | None = None) -> dict[str, Any]:
    record = job.record()
    metrics = job.read_metrics()
    figures = Figures()
    dataset = record.dataset or {}
    classes = {c["id"]: c.get("name") or c["id"] for c in dataset.get("classes", [])}
    timings = record.timings
    debugger = _debugger_section(figures, job)
    profiler = _profiler_section(figures, job, timings)
    config = record.config or {}
    return {
        "job": record,
        "name": record.name or job.name,
        "status": status or job.status(),
        "timings": timings,
        "config": config,
        "config_json": json.dumps(json_safe(config), indent=2),
        "hyperparameters": {
            "backbone": config.get("model", {}).get("backbone"),
            "head": config.get("model", {}).get("head"),
            "freeze": config.get("model", {}).get("freeze"),
            **{k: config.get("train", {}).get(k) for k in ("epochs", "batch_size", "lr", "optimizer", "weight_decay")},
            "image_size": config.get("data", {}).get("image_size"),
        },
        "dataset": dataset,
        "curves": _training_curves(figures, metrics),
        "test": record.test,
        "test_plots": _test_figures(figures, record.test, classes) if record.test else [],
        "debugger": debugger,
        "profiler": profiler,
        "recommendations": _recommendations(profiler, debugger),
        "figure_count": figures.count,
        "plotly_js": plotly_js(),
        "fmt": _fmt,
    }


def render_report(job: Job, status: str | None = None) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("imgtune.report", "templates"), autoescape=select_autoescape(["j2"]))
    return env.get_template("job_report.html.j2").render(**build_context(job, status))


def write_report(job: Job, out: Path | None = None, status: str | None = None) -> Path:
    """Render the job's report (a training or a tuning job's) to `out` (default JOB/report.html); `status`: the
    job's, when its job.json does not say it yet (a job's own end writes its report before it is marked)."""
    path = out or job.path / REPORT_FILE
    if job.record().kind == "tuning":
        from imgtune.report.tuning import render_tuning_report

        html_text = render_tuning_report(job)
    else:
        html_text = render_report(job, status)
    atomic_write_text(path, html_text, durable=False)
    return path
