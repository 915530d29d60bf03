"""Real-browser test of the "Why merges fail" page on micro: the trajectory tab draws a cached AdaMerging run's
objective and coefficients, and the geometry tab draws the cached geometry view."""

from __future__ import annotations

from pathlib import Path

import pytest

from app_server import CHROMIUM, CHROMIUM_ARGS, serve
from merging.geometry import suite_geometry
from merging.runs import RunConfig, run

pytestmark = pytest.mark.browser

if not Path(CHROMIUM).exists():
    pytest.skip("Debian chromium is not installed (scripts/test.sh installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


def test_why_page_trajectory_and_geometry_tabs(micro_suite, micro_cache, tmp_path):
    run(RunConfig("micro", "adamerging", preset="fast"), micro_suite, cache_dir=micro_cache, device="cpu")
    suite_geometry(micro_suite, cache_dir=micro_cache)
    env = {"MERGELENS_CACHE": str(micro_cache), "MERGELENS_DEFAULT_SUITE": "micro"}
    with serve(env, log=micro_cache / "streamlit-why.log") as url, sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.goto(f"{url}/why_merges_fail")
        page.get_by_role("heading", name="Why merges fail").first.wait_for(timeout=60_000)
        panel = page.get_by_role("tabpanel", name="Trajectories")
        panel.locator(".js-plotly-plot").nth(1).wait_for(timeout=60_000)  # the objective and the coefficient heatmap
        assert panel.get_by_text("AdaMerging: the objective it minimises").count() >= 1
        page.screenshot(path=str(tmp_path / "why_trajectories.png"), full_page=True)
        page.get_by_role("tab", name="Geometry").click()
        geometry = page.get_by_role("tabpanel", name="Geometry")
        geometry.locator(".js-plotly-plot").nth(6).wait_for(timeout=60_000)
        assert geometry.get_by_text("Cosine of the task vectors, whole model").count() >= 1
        page.screenshot(path=str(tmp_path / "why_geometry.png"), full_page=True)
        browser.close()
