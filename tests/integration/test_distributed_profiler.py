"""The profiler on a data-parallel job (two Ray Train workers, gloo, an in-process Ray on loopback): every rank
records its own step timeline, the first rank on the node samples the node, the rules compare the ranks, and the
report shows them side by side."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from imgtune.config import build_config
from imgtune.core.io import read_jsonl
from imgtune.profiler.data import rank_files
from imgtune.profiler.timeline import SEGMENTS
from imgtune.runs.train import run_training_job
from imgtune.storage.jobs import Job

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def pair(tmp_path_factory, dogs_mini: Path, mobilenet_weights: Path) -> Job:
    config = build_config(
        {
            "data": {"path": str(dogs_mini), "image_size": 64, "num_workers": 0},
            "model": {"backbone": "mobilenet_v2", "weights": str(mobilenet_weights)},
            "train": {"epochs": 2, "batch_size": 32, "feature_cache": False, "workers": 2},
            "profiler": {"interval_ms": 200, "trace_start_step": 2, "trace_steps": 3, "trace_max_share": 1},
        }
    )
    return run_training_job(config, workspace=tmp_path_factory.mktemp("ws"), progress=False)


def test_every_rank_records_its_step_timeline(pair: Job):
    profiler = pair.path / "profiler"
    assert pair.read()["status"] == "completed" and pair.read()["world_size"] == 2
    assert set(rank_files(profiler, "steps.jsonl")) == {0, 1}
    assert not (profiler / "steps.jsonl").exists()  # a data-parallel job names every rank's files by rank
    for rank in (0, 1):
        steps = list(read_jsonl(profiler / f"steps.rank{rank}.jsonl"))
        assert steps and all(s["rank"] == rank for s in steps)
        train = [s for s in steps if s["phase"] == "train"]
        assert len(train) == 2 * 10  # 300 images in global batches of 32, 2 epochs: every rank takes each step
        assert all(0 < sum(s[k] for k in SEGMENTS) <= s["total"] + 1e-6 for s in train)
        meta = json.loads((profiler / f"meta.rank{rank}.json").read_text())
        assert meta["rank"] == rank and meta["world_size"] == 2 and meta["host"] and meta["batch_size"] == 32
    assert (profiler / "trace.json").exists() and not list(profiler.glob("trace.rank*"))  # rank 0's window only


def test_the_node_is_sampled_by_its_first_rank(pair: Job):
    profiler = pair.path / "profiler"
    assert set(rank_files(profiler, "system.jsonl")) == {0}  # both ranks on this machine: one monitor for it
    samples = list(read_jsonl(profiler / "system.rank0.jsonl"))
    assert samples and all(s["rank"] == 0 and s["host"] for s in samples)
    assert max(s["proc_rss"] for s in samples) > 100e6  # rank 0's process: torch and a model are resident
    assert list(read_jsonl(profiler / "system.jsonl"))  # the job's own process samples as before
    summary = pair.read()["profiler"]
    assert summary["ranks"] == 2 and summary["nodes"] == 1 and summary["samples"] == len(samples)


def test_the_straggler_rule_compares_the_ranks(pair: Job):
    rules = json.loads((pair.path / "profiler/rules.json").read_text())
    straggler = rules["StragglerRank"]
    assert straggler["status"] in ("IssuesFound", "NoIssuesFound"), straggler["message"]
    ranks = straggler["details"]["ranks"]
    assert [row["rank"] for row in ranks] == [0, 1] and all(row["steps"] == 20 - 5 for row in ranks)
    assert min(row["slowdown"] for row in ranks) == pytest.approx(1.0)
    assert rules["OverallFrameworkMetrics"]["status"] == "NoIssuesFound"  # the other rules read rank 0's steps


def test_the_report_shows_the_ranks_side_by_side(pair: Job):
    html = (pair.path / "report.html").read_text()
    assert "Ranks side by side" in html and "rank 0" in html and "rank 1" in html
    assert "System usage per node" in html
