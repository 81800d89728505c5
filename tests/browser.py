"""Opening reports in the system's headless Chromium (Playwright drives it; never `playwright install`).

Needs Chromium (Debian: `apt-get install chromium`; `IMGTUNE_CHROMIUM` names another binary). Screenshots
and PDFs are kept as test artifacts in `test-artifacts/` (or `$IMGTUNE_TEST_ARTIFACTS`).
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

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


@dataclass
class RenderedReport:
    figures: int  # as the report's footer counts them
    errors: list[str]  # console errors and page exceptions
    requests: list[str]  # every URL the page asked for
    points: list[int]  # data points each drawn plot holds
    svg_paths: int
    title: str
    screenshot: Path
    pdf: bytes

    @property
    def pdf_pages(self) -> int:
        return len(re.findall(rb"/Type\s*/Page[^s]", self.pdf))


@contextlib.contextmanager
def chromium_page(width: int, height: int) -> Iterator[tuple[Any, list[str], list[str]]]:
    """A page in headless Chromium, with the console errors and page exceptions it collects, and every URL
    it requests."""
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    requests: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("request", lambda request: requests.append(request.url))
            yield page, errors, requests
        finally:
            browser.close()


def render_report(report: Path, artifact: str) -> RenderedReport:
    """Open `report` in Chromium, wait for every plot, screenshot it and print it to PDF (as artifacts)."""
    figures = int(re.search(r"(\d+) interactive figures", report.read_text()).group(1))
    with chromium_page(1280, 900) as (page, errors, requests):
        page.goto(report.as_uri())
        page.wait_for_function(f"document.querySelectorAll('.js-plotly-plot').length === {figures}")
        points = page.evaluate(
            """() => Array.from(document.querySelectorAll('.js-plotly-plot')).map(gd =>
                gd._fullData.reduce((n, trace) =>
                    n + ((trace.z || trace.x || trace.y || trace.dimensions || []).length || 0), 0))"""
        )
        svg_paths = page.evaluate("document.querySelectorAll('.js-plotly-plot .main-svg path').length")
        title = page.title()
        screenshot = artifacts_dir() / f"{artifact}.png"
        page.screenshot(path=str(screenshot), full_page=True)
        pdf = page.pdf(format="A4", print_background=True)  # what "print to PDF" gives a user
    (artifacts_dir() / f"{artifact}.pdf").write_bytes(pdf)
    return RenderedReport(figures, errors, requests, points, svg_paths, title, screenshot, pdf)


def assert_rendered_offline(rendered: RenderedReport) -> None:
    """No console errors, nothing fetched from the network, every plot drawn and holding data."""
    assert rendered.errors == []
    assert [url for url in rendered.requests if not url.startswith("file://")] == []
    assert len(rendered.points) == rendered.figures and all(n > 0 for n in rendered.points), rendered.points
    assert rendered.svg_paths > 10 * rendered.figures  # drawn, not only declared
    assert rendered.screenshot.stat().st_size > 50_000
    assert rendered.pdf.startswith(b"%PDF") and rendered.pdf_pages >= 2
