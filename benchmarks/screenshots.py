"""Full-page screenshots of every dashboard page on the current cache, for the README.

    .venv/bin/python benchmarks/screenshots.py [--suite mini8] [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = {"overview": "", "merge": "merge", "representation_bias": "representation_bias", "method_comparison": "method_comparison", "ablations": "ablations"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="mini8")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    ap.add_argument("--port", type=int, default=8766)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MERGELENS_DEFAULT_SUITE": args.suite}
    server = subprocess.Popen([sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(args.port)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://localhost:{args.port}"
    try:
        for _ in range(120):
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                time.sleep(0.5)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update"])
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            for name, path in PAGES.items():
                page.goto(f"{url}/{path}")
                page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']", timeout=60_000)
                page.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=300_000)
                page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=300_000)
                time.sleep(2)
                page.screenshot(path=str(out / f"{name}.png"), full_page=False)
                print(out / f"{name}.png")
            browser.close()
    finally:
        server.terminate()


if __name__ == "__main__":
    main()
