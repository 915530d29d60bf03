"""Time the Representation-bias page as a new user meets it, the browser tests' way.

    .venv/bin/python benchmarks/bench_dashboard.py [--suite mini8] [--cache-dir DIR]

Starts ``streamlit run app.py`` on a free port with an empty (or given) cache, opens the Representation-bias
page in headless Chromium and waits until the before/after-Surgery scatter is drawn (first visit: the suite
build, three runs, their features and the UMAP fit all happen then); then opens it again in a new tab of the
same browser (second visit: everything is cached, the browser keeps Streamlit's scripts in its HTTP cache as a
returning user's does), and once more in a fresh browser context (an empty HTTP cache).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app_server import CHROMIUM, CHROMIUM_ARGS, serve  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="mini8")
    ap.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    ap.add_argument("--screenshot", default=None, help="save the first view here (PNG)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    cache = Path(args.cache_dir or tempfile.mkdtemp(prefix="mergelens-bench-"))
    env = {"MERGELENS_CACHE": str(cache), "MERGELENS_DEFAULT_SUITE": args.suite}
    with serve(env, timeout=120) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        times = []
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        for visit in ("first", "second", "fresh"):
            if visit == "fresh":
                context = browser.new_context(viewport={"width": 1400, "height": 1000})
            page = context.new_page()
            t0 = time.perf_counter()
            page.goto(f"{url}/representation_bias")
            page.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=900_000)
            times.append(time.perf_counter() - t0)
            if visit == "first" and args.screenshot:
                page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=120_000)
                page.screenshot(path=args.screenshot, full_page=True)
            page.close()
        browser.close()
    print(f"| Representation-bias page, {args.suite}, empty cache -> UMAP drawn (first visit) | {times[0]:.1f} s |")
    print(f"| same page, second visit (new tab) | {times[1]:.1f} s |")
    print(f"| same page, new browser context (empty HTTP cache) | {times[2]:.1f} s |")


if __name__ == "__main__":
    main()
