"""Train a job on dogs-mini with default settings (a first run: features not cached yet), screenshot its report
in headless Chromium, then serve it and screenshot the endpoint's page with a test photo classified (for the
README).

python scripts/report_screenshot.py [--out docs/job-report.png] [--endpoint-out docs/endpoint-page.png]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

from imgtune.config import ServeOptions, build_config
from imgtune.runs.train import run_training_job
from imgtune.serving.server import BackgroundEndpoint

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGTUNE_SHARED", ROOT.parent / "shared"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/job-report.png")
    parser.add_argument("--endpoint-out", type=Path, default=ROOT / "docs/endpoint-page.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["IMGTUNE_CACHE"] = str(Path(tmp) / "cache")  # a first run: the feature cache is built too
        config = build_config(
            {
                "name": "dogs-mini-mobilenet_v2",
                "data": {"path": str(SHARED / "data/dogs-mini")},
                "model": {
                    "backbone": "mobilenet_v2",
                    "weights": str(SHARED / "weights/mobilenet_v2_imagenet_features.pth"),
                },
            }
        )
        job = run_training_job(config, workspace=Path(tmp), progress=False)
        shot = Path(tmp) / "full.png"
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.goto((job.path / "report.html").as_uri())
            page.wait_for_function("document.querySelectorAll('.js-plotly-plot').length > 5")
            page.screenshot(path=str(shot), full_page=True)
            browser.close()
        save(shot, args.out, scale=2)
        page_shot = Path(tmp) / "page.png"
        photo = sorted((SHARED / "data/dogs-mini/test/003.beagle").iterdir())[0]
        with BackgroundEndpoint(job.path, ServeOptions()) as endpoint, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 900, "height": 760})
            page.goto(endpoint.url + "/")
            page.wait_for_function("document.getElementById('model').textContent.includes('classes')")
            page.set_input_files("#file", str(photo))
            page.wait_for_selector(".result")
            page.screenshot(path=str(page_shot))
            browser.close()
        save(page_shot, args.endpoint_out, scale=1)


def save(shot: Path, out: Path, scale: int) -> None:
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    image = image.resize((image.width // scale, image.height // scale), Image.LANCZOS)
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=128).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB, {image.width}x{image.height})")


if __name__ == "__main__":
    main()
