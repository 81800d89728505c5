"""The job report in a real headless Chromium (tests/browser.py): no console errors, every plot drawn and holding
data, a screenshot and a PDF kept as test artifacts."""

from __future__ import annotations

import pytest

from browser import assert_rendered_offline, render_report
from imgtune.config import build_config
from imgtune.runs.train import run_training_job
from imgtune.storage.jobs import Job

pytestmark = [pytest.mark.slow, pytest.mark.browser]


@pytest.fixture(scope="module")
def reported_job(tmp_path_factory, dogs_mini, mobilenet_weights) -> Job:
    config = build_config(
        {
            "data": {"path": str(dogs_mini), "image_size": 96, "num_workers": 0},
            "model": {"backbone": "mobilenet_v2", "weights": str(mobilenet_weights)},
            "train": {"epochs": 8, "lr": 0.003},
            "profiler": {"interval_ms": 100},
        }
    )
    return run_training_job(config, workspace=tmp_path_factory.mktemp("ws"), progress=False)


def test_report_renders_in_chromium(reported_job: Job):
    rendered = render_report(reported_job.path / "report.html", "job-report")
    assert rendered.figures >= 8
    assert_rendered_offline(rendered)
    assert reported_job.name in rendered.title
    assert rendered.pdf_pages >= 3
