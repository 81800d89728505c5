"""The job report in a real headless Chromium: no console errors, every plot drawn and holding data.

Needs the system's Chromium (Debian: `apt-get install chromium`; `IMGTUNE_CHROMIUM` names another binary).
The screenshot is kept as a test artifact in `test-artifacts/` (or `$IMGTUNE_TEST_ARTIFACTS`).
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pytest

from imgtune.config import build_config
from imgtune.jobs import Job
from imgtune.training.job import run_training_job

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium_path() -> str:
    path = os.environ.get("IMGTUNE_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(path).exists():
        pytest.fail(
            f"Chromium not found at {path}: install it (Debian: apt-get install chromium) or set IMGTUNE_CHROMIUM"
        )
    return path


def artifacts_dir() -> Path:
    directory = Path(os.environ.get("IMGTUNE_TEST_ARTIFACTS", ROOT / "test-artifacts"))
    directory.mkdir(parents=True, exist_ok=True)
    return directory


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
    from playwright.sync_api import sync_playwright

    report = reported_job.path / "report.html"
    figures = int(re.search(r"(\d+) interactive figures", report.read_text()).group(1))
    assert figures >= 8
    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            page.goto(report.as_uri())
            page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length === {figures}")
            points = page.evaluate(
                """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd =>
                    gd._fullData.reduce((n, trace) => n + ((trace.z || trace.x || trace.y || []).length || 0), 0))"""
            )
            svg_paths = page.evaluate("document.querySelectorAll('.js-plotly-plot .main-svg path').length")
            title = page.title()
            screenshot = artifacts_dir() / "job-report.png"
            page.screenshot(path=str(screenshot), full_page=True)
            pdf = page.pdf(format="A4", print_background=True)  # what "print to PDF" gives a user
        finally:
            browser.close()
    assert errors == []
    assert [url for url in requests if not url.startswith("file://")] == []  # works offline: nothing fetched
    assert len(points) == figures and all(n > 0 for n in points), points
    assert svg_paths > 50  # drawn, not only declared
    assert reported_job.name in title
    assert screenshot.stat().st_size > 50_000
    (artifacts_dir() / "job-report.pdf").write_bytes(pdf)
    pages = len(re.findall(rb"/Type\s*/Page[^s]", pdf))
    assert pdf.startswith(b"%PDF") and pages >= 3
