"""Time the Tour's live what-if in a real browser (issue #20: <= 1 s median, <= 2 s p95 from slider release to the
redrawn figure, on mini8, 20 slider moves).

    flock /tmp/mergelens-heavy.lock .venv/bin/python benchmarks/bench_whatif.py [--suite mini8] [--cache cache]

Starts ``streamlit run app.py``, opens the Tour at step 2 in headless Chromium (1280x720), and drags the sliders with
the mouse: 14 moves of task arithmetic's λ, then (after switching the merge to TIES, not timed) 6 moves of TIES's
density, every value new to the server (nothing is answered from the engine's memory). Each move is timed from
the mouse release until the figure's title shows the new value (the chart redrawn with the new accuracies), and
until the script is idle. The engine's own time per move (merge + forward + projection, read off the caption) is
printed beside it. Also printed: the machine's load average before the run.

    .venv/bin/python benchmarks/bench_whatif.py --walk docs/screenshots --cache /tmp/fresh/cache

instead walks the Tour as a new user: the Overview first (it runs the baselines), then steps 1 to 7 with Next,
clicking "Compute them now" wherever a step's runs are missing and waiting for its figure, screenshotting every
step with the presenter view off (``tour_<k>.png``, 1280x1100) and on (``tour_<k>_presenter.png``, the 1280x720 screen).
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app_server import CHROMIUM, CHROMIUM_ARGS, serve  # noqa: E402

IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"
TITLE = ".js-plotly-plot .gtitle"
LAMBDAS = [0.35, 0.8, 0.1, 1.2, 0.55, 0.95, 0.2, 1.4, 0.65, 0.45, 1.05, 0.05, 0.75, 1.3]
DENSITIES = [0.5, 0.1, 0.35, 0.8, 0.15, 0.65]


def slider_geometry(page, label: str) -> tuple[object, dict, dict]:
    """The slider's range input, its track's box and its thumb's box (Streamlit 1.67: a react-aria slider whose
    thumb sits at ``left: <fraction of the range>`` of the track)."""
    box = page.locator("[data-testid='stSlider']", has_text=label)
    track = box.locator("[role='group'] > div").first
    thumb = track.locator(":scope > div[data-rac]").first
    return box.locator("input[type='range']"), track.bounding_box(), thumb.bounding_box()


def drag_to(page, label: str, value: float, low: float, high: float, fmt: str) -> tuple[float, float, str]:
    """Drag ``label``'s thumb to ``value``; seconds from the release to the title showing it, and to an idle script."""
    field, track, thumb = slider_geometry(page, label)
    y = thumb["y"] + thumb["height"] / 2
    page.mouse.move(thumb["x"] + thumb["width"] / 2, y)
    page.mouse.down()
    target = track["x"] + (value - low) / (high - low) * track["width"]
    page.mouse.move(target, y, steps=6)
    t0 = time.perf_counter()
    page.mouse.up()
    landed = float(field.get_attribute("value"))
    shown = fmt.format(landed)
    page.locator(f"{TITLE}:has-text('{shown}')").first.wait_for(timeout=60_000)
    drawn = time.perf_counter() - t0
    page.wait_for_selector(IDLE, timeout=60_000)
    return drawn, time.perf_counter() - t0, shown


def engine_seconds(page) -> float | None:
    text = page.locator("[data-testid='stCaptionContainer']", has_text="Re-merged").first.inner_text(timeout=5_000)
    m = re.search(r"Re-merged and scored in ([0-9.]+) s", text)
    return float(m.group(1)) if m else None


def walk(url: str, out: Path, browser) -> None:
    """A new user's walk through the Tour; every step's screenshot, presenter view off and on."""
    out.mkdir(parents=True, exist_ok=True)
    page = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()
    t0 = time.perf_counter()
    page.goto(url)
    page.locator("[data-testid='stMetric']").first.wait_for(timeout=1_800_000)  # the Overview's baselines, computed on the first visit
    print(f"Overview ready after {time.perf_counter() - t0:.0f} s")
    page.goto(f"{url}/tour")
    page.get_by_text("Step 1 of 7").wait_for(timeout=300_000)
    for step in range(1, 8):
        if step > 1:
            page.get_by_role("button", name="Next →").click()
            page.get_by_text(f"Step {step} of 7").wait_for(timeout=120_000)
        page.wait_for_selector(IDLE, timeout=300_000)
        if page.get_by_role("button", name="Compute them now").count():
            t1 = time.perf_counter()
            page.get_by_role("button", name="Compute them now").click()
            page.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=3_600_000)
            print(f"step {step}: its runs computed in {time.perf_counter() - t1:.0f} s")
        page.locator(".js-plotly-plot").first.wait_for(timeout=600_000)
        page.wait_for_selector(IDLE, timeout=600_000)
        if page.get_by_role("button", name="Compute them now").count():  # a step whose figure shows part of its runs (step 7)
            t1 = time.perf_counter()
            page.get_by_role("button", name="Compute them now").click()
            page.get_by_role("button", name="Compute them now").wait_for(state="detached", timeout=3_600_000)
            page.wait_for_selector(IDLE, timeout=600_000)
            print(f"step {step}: the rest of its runs computed in {time.perf_counter() - t1:.0f} s")
        time.sleep(1.0)  # plotly's transitions
        assert page.locator("[data-testid='stException']").count() == 0, f"step {step} shows an exception"
        page.set_viewport_size({"width": 1280, "height": 1100})  # the page scrolls inside the app: a taller window shows all of it
        page.wait_for_selector(IDLE, timeout=300_000)
        page.mouse.move(800, 500)
        page.mouse.wheel(0, -20_000)  # back to the top (a clicked button may have scrolled it)
        time.sleep(1.0)
        page.screenshot(path=str(out / f"tour_{step}.png"))
        page.set_viewport_size({"width": 1280, "height": 720})
        page.get_by_text("Presenter view").click()
        page.wait_for_selector("[data-testid='stSidebar']", state="hidden", timeout=60_000)
        page.wait_for_selector(IDLE, timeout=300_000)
        time.sleep(1.0)
        page.screenshot(path=str(out / f"tour_{step}_presenter.png"))
        page.get_by_text("Presenter view").click()
        page.locator("[data-testid='stSidebar']").wait_for(timeout=60_000)
        page.wait_for_selector(IDLE, timeout=300_000)
        print(f"step {step}: screenshots at {time.perf_counter() - t0:.0f} s")
    page.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--suite", default="mini8")
    ap.add_argument("--cache", default=None, help="the app's cache folder (default: the project's cache/)")
    ap.add_argument("--walk", default=None, metavar="DIR", help="walk the Tour's seven steps and write screenshots here (no timing)")
    args = ap.parse_args()
    from playwright.sync_api import sync_playwright

    load = os.getloadavg()
    env = {"MERGELENS_DEFAULT_SUITE": args.suite, **({"MERGELENS_CACHE": str(Path(args.cache).resolve())} if args.cache else {})}
    if args.walk:
        with serve(env, timeout=120, log=None) as url, sync_playwright() as p:
            browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            walk(url, Path(args.walk), browser)
            browser.close()
        return
    rows: list[tuple[str, str, float, float, float | None]] = []
    with serve(env, timeout=120) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()
        t0 = time.perf_counter()
        page.goto(f"{url}/tour?tour-step=2")
        page.locator(f"{TITLE}:has-text('λ = 0.30')").first.wait_for(timeout=300_000)
        page.wait_for_selector(IDLE, timeout=300_000)
        first = time.perf_counter() - t0
        for v in LAMBDAS:
            drawn, idle, shown = drag_to(page, "Scaling coefficient", v, 0.0, 1.5, "λ = {:.2f}")
            rows.append(("task arithmetic λ", shown, drawn, idle, engine_seconds(page)))
        page.locator("[data-testid='stRadio']", has_text="Merge").get_by_text("TIES-Merging").click()
        page.locator(f"{TITLE}:has-text('density')").first.wait_for(timeout=60_000)
        page.wait_for_selector(IDLE, timeout=60_000)
        for v in DENSITIES:
            drawn, idle, shown = drag_to(page, "TIES density", v, 0.05, 1.0, "density {:.2f}")
            rows.append(("TIES density", shown, drawn, idle, engine_seconds(page)))
        page.screenshot(path=str(ROOT / "cache" / "bench_whatif_last.png"))
        browser.close()
    print(f"load average before the run (1, 5, 15 min): {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; CPUs: {os.cpu_count()}")
    print(f"Tour step 2 opened (server started cold: engine built, Plotly loaded): {first:.2f} s")
    print("| move | value | release → figure redrawn (s) | release → script idle (s) | engine (s) |\n|---|---|---:|---:|---:|")
    for kind, shown, drawn, idle, eng in rows:
        print(f"| {kind} | {shown} | {drawn:.3f} | {idle:.3f} | {'' if eng is None else f'{eng:.3f}'} |")
    drawn = sorted(r[2] for r in rows)
    p95 = drawn[min(len(drawn) - 1, round(0.95 * (len(drawn) - 1)))]
    print(f"\n{len(drawn)} moves: release → figure redrawn median {statistics.median(drawn):.3f} s, p95 {p95:.3f} s, max {drawn[-1]:.3f} s "
          f"(goal: median <= 1 s, p95 <= 2 s)")
    idle = sorted(r[3] for r in rows)
    print(f"release → script idle: median {statistics.median(idle):.3f} s, max {idle[-1]:.3f} s")


if __name__ == "__main__":
    main()
