"""Full-page screenshots of every dashboard page on the current cache, for the README.

    .venv/bin/python benchmarks/screenshots.py [--suite mini8] [--out docs/screenshots]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app_server import CHROMIUM, CHROMIUM_ARGS, serve  # noqa: E402

PAGES = {"overview": "", "merge": "merge", "representation_bias": "representation_bias", "method_comparison": "method_comparison", "ablations": "ablations"}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="mini8")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with serve({"MERGELENS_DEFAULT_SUITE": args.suite}, timeout=120) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
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


if __name__ == "__main__":
    main()
