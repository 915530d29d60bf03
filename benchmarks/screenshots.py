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
TABS = {"accuracy_vs_storage": ("method_comparison", "Accuracy vs cost"), "bias_by_fix": ("representation_bias", "Bias by fix")}
"""Single views behind a tab, shot as the tab's chart (README, issue #18)."""
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def shoot_tab(page, url: str, path: str, tab: str, out: Path) -> None:
    page.goto(f"{url}/{path}")
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']", timeout=60_000)
    page.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=300_000)
    page.wait_for_selector(IDLE, timeout=300_000)
    page.get_by_role("tab", name=tab).click()
    panel = page.get_by_role("tabpanel", name=tab)
    panel.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=900_000)
    page.wait_for_selector(IDLE, timeout=300_000)
    time.sleep(2)
    panel.locator("[data-testid='stPlotlyChart']").first.screenshot(path=str(out))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="mini8")
    ap.add_argument("--out", default=str(ROOT / "docs" / "screenshots"))
    ap.add_argument("--only", default=None, help="comma-separated names of PAGES and TABS to shoot (default: all)")
    args = ap.parse_args()
    only = set(args.only.split(",")) if args.only else set(PAGES) | set(TABS)
    from playwright.sync_api import sync_playwright

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with serve({"MERGELENS_DEFAULT_SUITE": args.suite}, timeout=120) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        for name, (path, tab) in TABS.items():
            if name in only:
                shoot_tab(page, url, path, tab, out / f"{name}.png")
                print(out / f"{name}.png")
        for name, path in PAGES.items():
            if name not in only:
                continue
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
