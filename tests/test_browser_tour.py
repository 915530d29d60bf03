"""The Tour in headless Chromium on the micro suite: first in the navigation, Next walks the steps, one λ drag redraws
the what-if, and the presenter view hides the sidebar (issue #20)."""

from __future__ import annotations

from pathlib import Path

import pytest

from app_server import CHROMIUM, CHROMIUM_ARGS, serve
from merging.runs import RunConfig, run

pytestmark = pytest.mark.browser

if not Path(CHROMIUM).exists():
    pytest.skip("Debian chromium is not installed (scripts/test.sh installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def drag_slider(page, label: str, value: float, low: float, high: float) -> float:
    """Drag the slider labelled ``label`` to ``value`` with the mouse; returns the value it landed on."""
    box = page.locator("[data-testid='stSlider']", has_text=label)
    track = box.locator("[role='group'] > div").first.bounding_box()
    thumb = box.locator("[role='group'] > div > div[data-rac]").first.bounding_box()
    y = thumb["y"] + thumb["height"] / 2
    page.mouse.move(thumb["x"] + thumb["width"] / 2, y)
    page.mouse.down()
    page.mouse.move(track["x"] + (value - low) / (high - low) * track["width"], y, steps=5)
    page.mouse.up()
    return float(box.locator("input[type='range']").get_attribute("value"))


def test_tour_in_browser(micro_suite, micro_cache, tmp_path):
    for m in ("pretrained", "individual", "task_arithmetic"):
        run(RunConfig("micro", m), micro_suite, cache_dir=micro_cache, device="cpu")
    env = {"MERGELENS_CACHE": str(micro_cache), "MERGELENS_DEFAULT_SUITE": "micro"}
    with serve(env, log=micro_cache / "streamlit-tour.log") as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_context(viewport={"width": 1280, "height": 720}).new_page()
        page.goto(f"{url}/tour")
        page.get_by_text("Step 1 of 7").wait_for(timeout=120_000)
        assert page.locator("[data-testid='stSidebarNav'] a").first.inner_text().strip().endswith("Tour")
        page.locator(".js-plotly-plot").first.wait_for(timeout=60_000)
        page.get_by_role("button", name="Next →").click()
        page.get_by_text("Step 2 of 7").wait_for(timeout=60_000)
        page.locator(".js-plotly-plot .gtitle:has-text('λ = 0.30')").first.wait_for(timeout=60_000)
        page.wait_for_selector(IDLE, timeout=60_000)
        landed = drag_slider(page, "Scaling coefficient", 0.8, 0.0, 1.5)
        assert landed != pytest.approx(0.3)
        page.locator(f".js-plotly-plot .gtitle:has-text('λ = {landed:.2f}')").first.wait_for(timeout=30_000)
        page.screenshot(path=str(tmp_path / "tour_step2.png"))
        page.get_by_text("Presenter view").click()
        page.wait_for_selector("[data-testid='stSidebar']", state="hidden", timeout=30_000)
        for step in range(3, 8):
            page.get_by_role("button", name="Next →").click()
            page.get_by_text(f"Step {step} of 7").wait_for(timeout=60_000)
            page.wait_for_selector(IDLE, timeout=60_000)
            assert page.locator("[data-testid='stException']").count() == 0
        assert page.get_by_role("button", name="Next →").is_disabled()
        page.screenshot(path=str(tmp_path / "tour_step7_presenter.png"))
        browser.close()
