"""Real-browser end-to-end tests: Playwright drives Debian's Chromium against `streamlit run app.py`.

Screenshots land in the test's temp dir (printed with -s) and, when MERGELENS_SCREENSHOTS is set, there too.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from merging.methods import BASELINES
from merging.runs import RunConfig, run

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
pytestmark = pytest.mark.browser

if not Path(CHROMIUM).exists():
    pytest.skip("Debian chromium is not installed (scripts/test.sh installs it)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(micro_suite, micro_cache):
    for m in BASELINES:
        run(RunConfig("micro", m), micro_suite, cache_dir=micro_cache, device="cpu")
    port = _free_port()
    env = {**os.environ, "MERGELENS_CACHE": str(micro_cache), "MERGELENS_DEFAULT_SUITE": "micro", "PYTHONUNBUFFERED": "1"}
    log = open(micro_cache / "streamlit.log", "w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1"],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    for _ in range(120):
        try:
            if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                break
        except OSError:
            time.sleep(0.5)
    else:
        proc.kill()
        pytest.fail("streamlit did not become healthy: " + (micro_cache / "streamlit.log").read_text()[-2000:])
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage"],
        )
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
    box = page.get_by_label("scaling").first
    box.fill("0.45")
    box.press("Enter")
    wait_idle(page)
    page.get_by_role("button", name="Run").click()
    page.get_by_text("scaling=0.45").first.wait_for(timeout=120_000)
    wait_idle(page)
    shot(page, "merge")
