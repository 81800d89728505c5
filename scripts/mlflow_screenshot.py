"""Start an MLflow tracking server on 127.0.0.1, run a small tuning job on dogs-mini with --mlflow (its trials
nested under its run), and screenshot the MLflow UI's experiment page in headless Chromium (for the README).

python scripts/mlflow_screenshot.py [--out docs/mlflow-tuning.png]
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import imgtune

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("IMGTUNE_SHARED", ROOT.parent / "shared"))
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]  # fmt: skip
PORT = 25731


def wait_for(url: str, seconds: float = 120) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            time.sleep(0.5)
    raise SystemExit(f"{url} did not answer in {seconds:.0f} s")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs/mlflow-tuning.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        store = Path(tmp) / "mlflow"
        uri = f"http://127.0.0.1:{PORT}"
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(PORT), "--workers", "1",
             "--backend-store-uri", f"sqlite:///{store}/db.sqlite", "--artifacts-destination", str(store / "art")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        try:
            wait_for(f"{uri}/health")
            job = imgtune.tune(
                SHARED / "data/dogs-mini", backbone="mobilenet_v2", epochs=4, workspace=Path(tmp) / "ws",
                weights=SHARED / "weights/mobilenet_v2_imagenet_features.pth", name="tune-dogs-mini",
                overrides=["tracking.mlflow=true", f"tracking.mlflow_uri={uri}", "tracking.experiment=dogs-mini"],
                space={"train.lr": {"type": "float", "low": 0.0003, "high": 0.03, "scale": "log"},
                       "train.batch_size": {"type": "categorical", "values": [16, 32]}},
                strategy="random", max_trials=6, progress=False,
            )  # fmt: skip
            experiment = job.record().mlflow["experiment_id"]
            shot = Path(tmp) / "mlflow.png"
            with sync_playwright() as playwright:
                browser = playwright.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1500, "height": 700})
                page.goto(f"{uri}/#/experiments/{experiment}/runs")
                page.wait_for_selector("text=tune-dogs-mini", timeout=60_000)
                close = page.locator("button[aria-label='Close']")  # the assistant panel
                if close.count():
                    close.first.click()
                # the parent run's expander: its nested trials show beneath it
                page.locator("button[data-component-id*='runnamecellrenderer']").first.click()
                page.wait_for_selector("text=trial-", timeout=30_000)
                page.wait_for_timeout(1500)
                page.screenshot(path=str(shot))
                browser.close()
            save(shot, args.out)
        finally:
            server.terminate()
            server.wait(timeout=30)


def save(shot: Path, out: Path) -> None:
    from PIL import Image

    image = Image.open(shot).convert("RGB")
    out.parent.mkdir(parents=True, exist_ok=True)
    image.quantize(colors=128).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1e3:.0f} kB, {image.width}x{image.height})")


if __name__ == "__main__":
    main()
