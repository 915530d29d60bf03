"""The app server's CPU time while one page sits open and nothing runs.

    .venv/bin/python benchmarks/bench_idle.py [--page ""] [--seconds 60]

Builds the ``micro`` suite and its baselines into a temporary cache (so no job is queued or running),
starts ``streamlit run app.py`` on it, opens the page in headless Chromium, waits until its script has
finished, then reads the server process's user+system CPU time from ``/proc`` over ``--seconds``.
A page that polls (a fragment with ``run_every``) reruns on the server at every tick; an idle page costs nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from app_server import CHROMIUM, CHROMIUM_ARGS, serve  # noqa: E402

IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def server_pid(port: str) -> int:
    for proc in Path("/proc").iterdir():
        try:
            cmd = (proc / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"streamlit" in b" ".join(cmd) and port.encode() in cmd:
            return int(proc.name)
    raise RuntimeError(f"no streamlit process on port {port}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--page", default="", help="URL path of the page, e.g. merge (default: the Overview)")
    parser.add_argument("--seconds", type=float, default=60.0)
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) / "cache"
        subprocess.run([sys.executable, "-m", "merging", "table", "--suite", "micro", "--cache-dir", str(cache)], cwd=ROOT, check=True,
                       stdout=subprocess.DEVNULL)
        env = {"MERGELENS_CACHE": str(cache), "MERGELENS_DEFAULT_SUITE": "micro"}
        with serve(env, log=Path(tmp) / "server.log") as url, sync_playwright() as pw:
            pid = server_pid(url.rsplit(":", 1)[1])
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            page = browser.new_page()
            page.goto(f"{url}/{args.page}")
            page.wait_for_selector(IDLE, timeout=300_000)
            time.sleep(5)
            before, t0 = cpu_seconds(pid), time.perf_counter()
            time.sleep(args.seconds)
            used, wall = cpu_seconds(pid) - before, time.perf_counter() - t0
            browser.close()
    print(f"page /{args.page}: server CPU {used:.2f} s over {wall:.1f} s idle ({100 * used / wall:.2f} % of one core); load {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
