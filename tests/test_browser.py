"""Real-browser end-to-end tests: Playwright drives Debian's Chromium against `streamlit run app.py`.

Screenshots land in the test's temp dir (printed with -s) and, when MERGELENS_SCREENSHOTS is set, there too.
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from app_server import CHROMIUM, CHROMIUM_ARGS, serve
from merging.methods import BASELINES
from merging.runs import RunConfig, run

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.browser

if not Path(CHROMIUM).exists():
    pytest.skip("Debian chromium is not installed (scripts/test.sh installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


@pytest.fixture(scope="module")
def server(micro_suite, micro_cache):
    for m in BASELINES:
        run(RunConfig("micro", m), micro_suite, cache_dir=micro_cache, device="cpu")
    env = {"MERGELENS_CACHE": str(micro_cache), "MERGELENS_DEFAULT_SUITE": "micro"}
    with serve(env, log=micro_cache / "streamlit.log") as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser, tmp_path):
    ctx = browser.new_context(viewport={"width": 1400, "height": 1000})
    pg = ctx.new_page()
    pg.shots = tmp_path  # type: ignore[attr-defined]
    yield pg
    ctx.close()


def wait_idle(page, timeout: float = 60_000) -> None:
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']", timeout=timeout)
    page.wait_for_selector("[data-testid='stApp'][data-test-script-state='notRunning']", timeout=timeout)


def shot(page, name: str) -> Path:
    path = page.shots / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    target = os.environ.get("MERGELENS_SCREENSHOTS")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)
    print(f"screenshot: {path}")
    return path


def open_page(page, url: str, path: str = "") -> None:
    page.goto(f"{url}/{path}")
    wait_idle(page)


def test_overview_in_browser(server, page):
    open_page(page, server)
    page.get_by_text("Baselines on micro").wait_for(timeout=60_000)
    page.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=30_000)
    assert page.locator("[data-testid='stMetric']").count() == 4
    shot(page, "overview")


def test_merge_page_starts_a_run_and_shows_its_table(server, page):
    open_page(page, server, "merge")
    page.get_by_text("Methods").first.wait_for(timeout=30_000)
    box = page.get_by_label("scaling (λ)", exact=True).first
    box.fill("0.37")  # a value no other test computes, so the run is new
    box.press("Enter")
    page.get_by_text("Not computed yet").wait_for(timeout=60_000)  # the rerun with the new value has drawn
    wait_idle(page)
    page.get_by_role("button", name="Run").click()
    page.get_by_text("scaling=0.37").first.wait_for(timeout=120_000)
    wait_idle(page)
    shot(page, "merge")


def test_a_deep_link_as_a_fresh_servers_first_request_renders_with_navigation(micro_suite, micro_cache, page):
    """Pages live in app_pages/, not pages/: with pages/, Streamlit's legacy discovery would run merge.py without
    app.py (no navigation, no page config) when a fresh server's first request is a deep link."""
    from merging.methods import get_method

    for m in BASELINES:
        run(RunConfig("micro", m), micro_suite, cache_dir=micro_cache, device="cpu")
    env = {"MERGELENS_CACHE": str(micro_cache), "MERGELENS_DEFAULT_SUITE": "micro"}
    with serve(env, log=micro_cache / "streamlit-deeplink.log") as url:
        open_page(page, url, "merge")  # nothing has been requested from this server before
        page.get_by_role("heading", name="Merge").first.wait_for(timeout=60_000)
        nav = page.locator("[data-testid='stSidebarNav']")
        nav.wait_for(timeout=30_000)
        for title in ("Overview", "Merge", "Representation bias", "Method comparison", "Ablations"):
            assert nav.get_by_text(title, exact=True).count() == 1, title
        # the hyperparameters explain themselves: hovering the help icon shows the method's own words
        page.get_by_role("button", name="Help for scaling (λ)").first.hover()
        help_text = get_method("task_arithmetic").Params.__dataclass_fields__["scaling"].metadata["help"]
        page.get_by_text(help_text[:40]).first.wait_for(timeout=30_000)
        shot(page, "merge_help_tooltip")


@pytest.fixture(scope="module")
def bias_ready(micro_suite, micro_cache):
    """The bias view's runs and features, computed as the page's background job would."""
    from merging import jobs

    runs = (RunConfig("micro", "individual"), RunConfig("micro", "task_arithmetic"), RunConfig("micro", "surgery", {"base": "task_arithmetic"}, "fast"))
    jobs.execute(jobs.RunsJob("micro", runs, "cpu", jobs.FeaturesRequest(n=300, layers=True)), micro_cache, lambda f, m: None)


def test_representation_bias_lasso_shows_images(server, page, bias_ready):
    t0 = time.perf_counter()
    open_page(page, server, "representation_bias")
    chart = page.locator("[data-testid='stPlotlyChart']").first
    chart.wait_for(timeout=240_000)
    first = time.perf_counter() - t0
    page.get_by_text("Bias metrics").wait_for(timeout=60_000)
    wait_idle(page)
    shot(page, "bias_before_selection")
    box = page.locator(".nsewdrag").first.bounding_box()
    cx, cy, w, h = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2, box["width"], box["height"]
    page.mouse.move(cx - 0.45 * w, cy - 0.45 * h)
    page.mouse.down()
    for fx, fy in [(0.45, -0.45), (0.45, 0.45), (-0.45, 0.45), (-0.45, -0.44)]:
        page.mouse.move(cx + fx * w, cy + fy * h, steps=8)
    page.mouse.up()
    page.get_by_text("selected test images").wait_for(timeout=60_000)
    page.locator("[data-testid='stImage']").first.wait_for(timeout=60_000)
    wait_idle(page)
    page.locator("[data-testid='stImage']").first.scroll_into_view_if_needed()
    shot(page, "bias_selection")
    assert page.locator("[data-testid='stImage']").count() > 0
    page.get_by_role("tab", name="Bias metrics").click()  # a lazy tab: its table is computed and sent on opening
    page.locator("[data-testid='stDataFrame']").first.wait_for(timeout=60_000)
    wait_idle(page)
    shot(page, "bias_metrics_tab")
    t1 = time.perf_counter()
    open_page(page, server, "representation_bias")
    page.locator("[data-testid='stPlotlyChart']").first.wait_for(timeout=60_000)
    print(f"bias page: first view {first:.1f} s, second visit {time.perf_counter() - t1:.1f} s")


def test_method_comparison_in_browser(server, page, micro_suite, micro_cache):
    for m in ("wemoe", "tinting", "surgery", "adamerging"):
        run(RunConfig("micro", m, preset="fast"), micro_suite, cache_dir=micro_cache, device="cpu")
    open_page(page, server, "method_comparison")
    page.get_by_role("tabpanel", name="WEMoE routing").wait_for(timeout=120_000)  # the first detail tab is open
    wait_idle(page)
    assert page.locator("[data-testid='stPlotlyChart']").count() >= 5  # bars, cost, 2 routing heatmaps, routing box
    shot(page, "method_comparison")
    page.get_by_role("tab", name="Cross-task accuracy").click()  # lazy: computed in a background job on first open
    page.get_by_role("tabpanel", name="Cross-task accuracy").locator(".js-plotly-plot .heatmaplayer").first.wait_for(timeout=180_000)
