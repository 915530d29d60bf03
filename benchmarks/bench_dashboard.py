"""Time the Representation-bias page as a new user meets it, the browser tests' way.

    .venv/bin/python benchmarks/bench_dashboard.py [--suite mini8] [--cache-dir DIR] [--returns 3]

Starts ``streamlit run app.py`` on a free port with an empty (or given) cache and opens the Representation-bias
page in headless Chromium with a fresh on-disk profile, as a user's browser has one. A visit is timed from the
navigation until the before/after-Surgery scatter is drawn.

- first visit: the suite build, three runs, their features and the UMAP fit all happen then;
- second visit: a few seconds after the user closed the first (finished) one, the page is opened again in
  a new tab of the same browser (everything cached on the server; the browser's HTTP and
  compiled-script caches warm, as a returning user's are); repeated ``--returns`` times;
- the same in a new tab of an off-the-record browser context that loaded the page once before (the way
  earlier versions of this bench measured a second visit: HTTP cache warm, no compiled-script cache);
- a fresh off-the-record context (empty browser caches);
- the page opened again in the tab that shows it (how ``tests/test_browser.py`` times its second visit);
- coming back from another page of the app through the sidebar (no page load: the way a user in the app returns).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app_server import CHROMIUM, CHROMIUM_ARGS, serve  # noqa: E402

VIEWPORT = {"width": 1400, "height": 1000}
CHART = "[data-testid='stPlotlyChart']"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
SCATTER = ".js-plotly-plot .gtitle:has-text('of the final features')"


def visit(context, url: str, settle: float, screenshot: str | None = None) -> float:
    """Seconds from opening ``url`` in a new tab until the scatter is drawn. The tab stays open until the
    page's script has finished, then closes; the next visit comes ``settle`` seconds later."""
    page = context.new_page()
    t0 = time.perf_counter()
    page.goto(url, wait_until="commit")
    page.locator(CHART).first.wait_for(timeout=900_000)
    seconds = time.perf_counter() - t0
    page.wait_for_selector(IDLE, timeout=300_000)
    if screenshot:
        page.screenshot(path=screenshot, full_page=True)
    page.close()
    time.sleep(settle)
    return seconds


def opened(context, url: str):
    """A new tab showing ``url`` with its script finished and a Plotly chart drawn."""
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector(IDLE, timeout=300_000)
    page.locator(CHART).first.wait_for(timeout=300_000)
    return page


def same_tab_return(context, url: str, settle: float) -> float:
    """Seconds from opening the page again in the tab that shows it (the browser test's second visit) until the scatter is drawn."""
    page = opened(context, url)
    time.sleep(settle)
    t0 = time.perf_counter()
    page.goto(url, wait_until="commit")
    page.locator(SCATTER).first.wait_for(timeout=300_000)
    seconds = time.perf_counter() - t0
    page.close()
    return seconds


def sidebar_return(context, url: str) -> float:
    """Seconds from clicking "Representation bias" in the sidebar of the Overview page until the scatter is drawn."""
    page = opened(context, url)  # the Overview, its bars drawn: Plotly is loaded
    t0 = time.perf_counter()
    page.get_by_role("link", name="Representation bias").click()
    page.locator(SCATTER).first.wait_for(timeout=300_000)
    seconds = time.perf_counter() - t0
    page.close()
    return seconds


def measure(cache: Path, profile_dir: Path, args: argparse.Namespace) -> tuple[float, list[float], list[float], float, float, list[float]]:
    """Every timing of one benchmark run; the scratch folders are the caller's to remove."""
    from playwright.sync_api import sync_playwright

    env = {"MERGELENS_CACHE": str(cache), "MERGELENS_DEFAULT_SUITE": args.suite}
    with serve(env, timeout=120) as url, sync_playwright() as p:
        bias = f"{url}/representation_bias"
        profile = p.chromium.launch_persistent_context(str(profile_dir), executable_path=CHROMIUM,
                                                       args=CHROMIUM_ARGS, viewport=VIEWPORT)
        first = visit(profile, bias, args.settle, args.screenshot)
        returns = [visit(profile, bias, args.settle) for _ in range(args.returns)]
        same_tab = [same_tab_return(profile, bias, args.settle) for _ in range(args.returns)]
        back = sidebar_return(profile, url)
        profile.close()
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        otr = browser.new_context(viewport=VIEWPORT)
        fresh = visit(otr, bias, args.settle)
        otr_returns = [visit(otr, bias, args.settle) for _ in range(args.returns)]
        browser.close()
    return first, returns, same_tab, back, fresh, otr_returns


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="mini8")
    ap.add_argument("--cache-dir", default=None, help="default: a fresh temporary folder")
    ap.add_argument("--screenshot", default=None, help="save the first view here (PNG)")
    ap.add_argument("--returns", type=int, default=3, help="how many second visits to time")
    ap.add_argument("--settle", type=float, default=5.0, help="seconds between leaving the page and coming back")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mergelens-bench-") as scratch:
        cache = Path(args.cache_dir or Path(scratch) / "cache")
        first, returns, same_tab, back, fresh, otr_returns = measure(cache, Path(scratch) / "profile", args)

    def fmt(xs: list[float]) -> str:
        return f"median {statistics.median(xs):.2f} s ({', '.join(f'{x:.2f}' for x in xs)})"

    print(f"| Representation-bias page, {args.suite}, empty cache -> UMAP drawn (first visit) | {first:.1f} s |")
    print(f"| same page, second visit (new tab, same browser profile) | {fmt(returns)} |")
    print(f"| same page, opened again in the tab that shows it (the browser test's second visit) | {fmt(same_tab)} |")
    print(f"| same page, back from the Overview through the sidebar | {back:.2f} s |")
    print(f"| same page, new off-the-record browser context (empty browser caches) | {fresh:.2f} s |")
    print(f"| same page, new tab of that context (HTTP cache warm, no compiled-script cache) | {fmt(otr_returns)} |")


if __name__ == "__main__":
    main()
