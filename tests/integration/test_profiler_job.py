"""The profiler on real training jobs: system samples, step timeline, trace, rules, report, CLI."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from imgtune.cli import app
from imgtune.config import PROFILER_RULES, build_config
from imgtune.core.io import read_jsonl
from imgtune.profiler.data import ProfileData
from imgtune.profiler.monitor import SystemMonitor
from imgtune.profiler.timeline import SEGMENTS
from imgtune.runs.train import run_training_job
from imgtune.storage.jobs import Job

runner = CliRunner()


def image_training_config(data: Path, weights: Path, **profiler) -> dict:
    """Training on images (all but the last stage frozen, no feature cache): real data waits and steps."""
    return {
        "data": {"path": str(data), "image_size": 64, "num_workers": 1},
        "model": {"backbone": "mobilenet_v2", "weights": str(weights), "freeze": "all_but_last"},
        "train": {"epochs": 2, "batch_size": 32, "feature_cache": False},
        "debugger": {"enabled": False},
        "profiler": {"interval_ms": 100, "trace_start_step": 2, "trace_steps": 3, "trace_max_share": 1, **profiler},
    }


@pytest.fixture(scope="module")
def profiled_job(tmp_path_factory, dogs_mini, mobilenet_weights) -> Job:
    config = build_config(image_training_config(dogs_mini, mobilenet_weights))
    return run_training_job(config, workspace=tmp_path_factory.mktemp("ws"), progress=False)


def test_system_monitor_samples_the_job(profiled_job: Job):
    samples = list(read_jsonl(profiled_job.path / "profiler/system.jsonl"))
    timings = profiled_job.read()["timings"]
    assert len(samples) >= 0.5 * timings["total"] / 0.1  # every 100 ms while the job ran, give or take a load
    first = samples[0]
    assert {"t", "cpu", "cpu_total", "iowait", "proc_rss", "mem_used", "disk_read", "net_recv"} <= set(first)
    assert len(first["cpu"]) >= 1 and all(0 <= c <= 100 for c in first["cpu"])
    assert max(s["proc_rss"] for s in samples) > 100e6  # torch and a model are resident
    assert max(s["proc_cpu"] for s in samples) > 10  # the job did work
    assert "gpus" not in first  # no NVIDIA GPU on this machine


def test_step_timeline_times_every_batch(profiled_job: Job):
    steps = list(read_jsonl(profiled_job.path / "profiler/steps.jsonl"))
    record = profiled_job.read()
    train = [s for s in steps if s["phase"] == "train"]
    assert len(train) == 2 * 10  # 300 images / 32 per batch, 2 epochs
    assert {s["phase"] for s in steps} == {"train", "valid", "test"}
    for s in steps:
        parts = sum(s[k] for k in SEGMENTS)
        assert 0 < parts <= s["total"] + 1e-6
    assert all(s["backward"] > 0 and s["optimizer"] > 0 for s in train)
    assert all(s["backward"] == 0 for s in steps if s["phase"] != "train")
    loop = sum(s["total"] for s in steps if s["phase"] in ("train", "valid"))
    assert loop <= record["timings"]["training_loop"] + 0.05


def test_trace_window_is_a_chrome_trace_with_top_operators(profiled_job: Job):
    trace = json.loads((profiled_job.path / "profiler/trace.json").read_text())
    names = {e.get("name", "") for e in trace["traceEvents"]}
    assert any("conv" in n for n in names)  # the backbone's last stage ran inside the window
    operators = json.loads((profiled_job.path / "profiler/operators.json").read_text())
    assert operators["steps"] == 3
    selfs = [op["self_cpu_us"] for op in operators["operators"]]
    assert selfs == sorted(selfs, reverse=True) and selfs[0] > 0


def test_rules_and_summary_recorded(profiled_job: Job):
    record = profiled_job.read()
    rules = json.loads((profiled_job.path / "profiler/rules.json").read_text())
    assert list(rules) == PROFILER_RULES
    assert rules["LowGPUUtilization"]["status"] == "NotApplicable"  # no GPU: says so instead of firing
    assert rules["Dataloader"]["status"] in ("IssuesFound", "NoIssuesFound")  # images: the loader is judged
    assert rules["OverallSystemUsage"]["status"] == "NoIssuesFound"
    assert record["profiler"]["samples"] > 0 and record["profiler"]["trace"] == "profiler/trace.json"


def test_report_is_self_contained(profiled_job: Job):
    html = (profiled_job.path / "report.html").read_text()
    assert not re.findall(r"<(?:script|link)[^>]+(?:src|href)=", html)  # nothing fetched: works offline
    assert "Plotly.newPlot" in html and html.count('class="plotly-graph-div"') >= 6
    for section in ("Training curves", "Confusion matrix", "Profiler rules", "System usage", "Top operators"):
        assert section in html
    assert "profiler/trace.json" in html


def test_short_rules_can_be_tuned_and_rerun_from_the_cli(profiled_job: Job):
    job_config = profiled_job.read()["config"]
    job_config["profiler"]["rule_parameters"] = {"CPUBottleneck": {"patience": 0}, "BatchSize": {"patience": 0}}
    profiled_job.update(config=job_config)
    before = (profiled_job.path / "report.html").stat().st_mtime_ns
    result = runner.invoke(app, ["report", str(profiled_job.path), "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["report"] == str(profiled_job.path / "report.html")
    assert (profiled_job.path / "report.html").stat().st_mtime_ns > before
    rules = json.loads((profiled_job.path / "profiler/rules.json").read_text())
    assert rules["CPUBottleneck"]["status"] in ("IssuesFound", "NoIssuesFound")  # evaluated now, not waiting
    assert "data_wait_percent" in rules["CPUBottleneck"]["details"]


def test_no_profiler_flag(tmp_path, dogs_mini, mobilenet_weights):
    result = runner.invoke(
        app,
        ["train", "--data", str(dogs_mini), "--backbone", "mobilenet_v2", "--weights", str(mobilenet_weights),
         "--epochs", "1", "--image-size", "64", "--no-profiler", "--no-debugger", "--workspace", str(tmp_path),
         "--name", "plain", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    job = Job.open("plain", tmp_path)
    assert not (job.path / "profiler").exists()
    assert (job.path / "report.html").exists()  # the report still has the training results
    assert json.loads(result.stdout)["report"] == str(job.path / "report.html")


def test_report_of_a_failed_job(tmp_path, dogs_mini, mobilenet_weights):
    raw = image_training_config(dogs_mini, mobilenet_weights)
    raw["train"]["device"] = "cpu"
    raw["model"]["weights"] = str(tmp_path / "missing.pth")
    with pytest.raises(Exception):  # noqa: B017 - whichever error: the job must record it and keep a report
        run_training_job(build_config(raw), workspace=tmp_path, progress=False)
    (job_path,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    job = Job.open(job_path)
    assert job.read()["status"] == "failed"
    html = (job.path / "report.html").read_text()
    assert "failed" in html and "Error:" in html


def test_monitor_stops_and_keeps_its_samples(tmp_path):
    with SystemMonitor(tmp_path, interval=0.1) as monitor:
        time.sleep(0.65)
    count = monitor.samples
    assert count >= 3
    time.sleep(0.3)
    assert len(list(read_jsonl(tmp_path / "system.jsonl"))) == count  # stopped: nothing more written
    data = ProfileData(samples=list(read_jsonl(tmp_path / "system.jsonl")))
    assert data.core_matrix().shape == (count, len(data.samples[0]["cpu"]))


def test_operator_table_from_the_trace_matches_torch(tmp_path):
    import torch
    from torch.profiler import profile

    from imgtune.profiler.operators import top_operators

    model = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.LazyLinear(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(8, 3, 16, 16)
    model(x)
    with profile() as prof:
        for _ in range(3):
            loss = model(x).square().mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    prof.export_chrome_trace(str(tmp_path / "trace.json"))
    ours = {row["name"]: row for row in top_operators(tmp_path / "trace.json", limit=1000)["operators"]}
    theirs = {e.key: e for e in prof.key_averages()}
    for name in ("aten::convolution", "aten::relu", "aten::addmm", "aten::mean"):
        assert ours[name]["self_cpu_us"] == pytest.approx(theirs[name].self_cpu_time_total, rel=1e-3, abs=0.5)
        assert ours[name]["calls"] == theirs[name].count


def test_a_job_shorter_than_one_interval_still_has_a_sample(tmp_path):
    with SystemMonitor(tmp_path, interval=0.5):
        time.sleep(0.2)
    (sample,) = read_jsonl(tmp_path / "system.jsonl")
    assert sample["cpu"] and sample["proc_rss"] > 0


def test_a_short_job_pays_no_trace_and_says_why(tmp_path, dogs_mini, mobilenet_weights):
    """At the default trace_max_share (4 %), 20 training steps are too few to trace one: no trace, the reason in
    meta.json and the report, the timeline and rules as always."""
    raw = image_training_config(dogs_mini, mobilenet_weights)
    del raw["profiler"]["trace_max_share"]
    job = run_training_job(build_config(raw), workspace=tmp_path, progress=False)
    profiler = job.path / "profiler"
    assert not (profiler / "trace.json").exists() and not (profiler / "operators.json").exists()
    window = json.loads((profiler / "meta.json").read_text())["trace"]
    assert window["planned_steps"] == 20 and window["steps"] == 0 and "20 planned training steps" in window["reason"]
    assert job.read()["profiler"]["trace"] is None
    assert len([s for s in read_jsonl(profiler / "steps.jsonl") if s["phase"] == "train"]) == 20
    assert window["reason"] in (job.path / "report.html").read_text()
