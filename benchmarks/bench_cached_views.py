"""Time the interactions on cached views that issue #23 names, in a real browser (goal: each <= 2 s).

    .venv/bin/python benchmarks/bench_cached_views.py [--suite mini8] [--repeat 3]

Uses the project's cache as it is (every run of the Method comparison page and two finished sweeps must be
there: `python -m merging table --suite mini8 --preset fast --methods <all>` and two `sweep` runs). Starts
``streamlit run app.py`` and, in headless Chromium:

- Method comparison opened again after a first visit (server caches warm), three ways: from another page through
  the sidebar (no page load), reloaded in its tab, and in a new tab; timed until the script is idle and a chart is drawn;
- a task change in WEMoE's per-sample routing: from the selectbox choice until the script is idle;
- switching Ablations between two finished sweeps: from the choice until the script is idle.

Each is repeated ``--repeat`` times; the table gives the median and the maximum.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
import urllib.parse
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app_server import CHROMIUM, CHROMIUM_ARGS, serve  # noqa: E402

CHART = "[data-testid='stPlotlyChart']"
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
RUNNING = "[data-testid='stApp'][data-test-script-state='running']"


def settled(page, timeout: float = 300) -> None:
    """Wait until a rerun started and ended (Streamlit marks the app running, then not running)."""
    try:
        page.wait_for_selector(RUNNING, timeout=2_000)
    except Exception:  # noqa: BLE001 - a very fast rerun may finish before we look
        pass
    page.wait_for_selector(IDLE, timeout=timeout * 1000)


def open_page(context, url: str) -> tuple[object, float]:
    page = context.new_page()
    t0 = time.perf_counter()
    page.goto(url)
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']", timeout=120_000)
    page.locator(CHART).first.wait_for(timeout=600_000)
    page.wait_for_selector(IDLE, timeout=600_000)
    return page, time.perf_counter() - t0


def choose(page, label: str, option: str) -> float:
    """Pick ``option`` in the selectbox labelled ``label``; seconds until the rerun it causes has ended."""
    box = page.locator("[data-testid='stSelectbox']", has_text=label)
    field = box.locator("input[role='combobox']")
    field.click()
    field.fill(option)
    page.locator("[role='option']", has_text=option).first.wait_for(timeout=10_000)
    t0 = time.perf_counter()
    field.press("Enter")
    settled(page)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="mini8")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    from merging.methods import METHODS
    from merging.sweeps import list_sweeps

    sweeps = [m for m in list_sweeps(ROOT / "cache") if m["config"]["suite"] == args.suite][:2]
    if len(sweeps) < 2:
        sys.exit("two finished sweeps of the suite are needed in cache/sweeps")
    rows: dict[str, list[float]] = {"Method comparison opened again, from the sidebar": [], "Method comparison opened again, same tab (reload)": [],
                                     "Method comparison opened again, new tab": [],
                                     "reference: the Merge page (one chart) opened again, new tab": [], "WEMoE routing: task change": [], "Ablations: switch sweep": []}
    first = {}
    with serve({"MERGELENS_DEFAULT_SUITE": args.suite}, timeout=120) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1400, "height": 1000})
        page, first["Method comparison, first visit"] = open_page(context, f"{url}/method_comparison")
        page.close()
        for _ in range(args.repeat):
            page, _ = open_page(context, f"{url}/merge")
            t0 = time.perf_counter()
            page.get_by_role("link", name="Method comparison").click()
            page.locator(".js-plotly-plot .gtitle:has-text('side by side')").first.wait_for(timeout=300_000)
            page.wait_for_selector(IDLE, timeout=300_000)
            rows["Method comparison opened again, from the sidebar"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            page.reload()
            page.locator(CHART).first.wait_for(timeout=300_000)
            page.wait_for_selector(IDLE, timeout=300_000)
            rows["Method comparison opened again, same tab (reload)"].append(time.perf_counter() - t0)
            page.close()
            page, seconds = open_page(context, f"{url}/method_comparison")
            rows["Method comparison opened again, new tab"].append(seconds)
            reference, seconds = open_page(context, f"{url}/merge")  # what a new tab costs on this machine whatever the page
            rows["reference: the Merge page (one chart) opened again, new tab"].append(seconds)
            reference.close()
            tasks = ["shapes", "colors"]
            for task in tasks:
                rows["WEMoE routing: task change"].append(choose(page, "Per-sample routing", task))
            page.close()
        query = "?" + urllib.parse.urlencode({"abl-sweep": json.dumps(f"done:{sweeps[0]['id']}")})
        page, first["Ablations, first visit"] = open_page(context, f"{url}/ablations{query}")
        for _ in range(args.repeat):
            for m in (sweeps[1], sweeps[0]):
                title = m["config"].get("title") or m["id"]
                rows["Ablations: switch sweep"].append(choose(page, "Sweep", title))
        browser.close()
    print(f"methods registered: {len(METHODS)}; sweeps: {', '.join(m['id'] for m in sweeps)}")
    print("| interaction | median (s) | max (s) | n |\n|---|---:|---:|---:|")
    for name, values in rows.items():
        print(f"| {name} | {statistics.median(values):.2f} | {max(values):.2f} | {len(values)} |")
    for name, seconds in first.items():
        print(f"| {name} (once) | {seconds:.2f} | | 1 |")


if __name__ == "__main__":
    main()
