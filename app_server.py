"""Start ``streamlit run app.py`` on a free localhost port and wait for its health check: shared by the
browser tests and the benchmark/screenshot scripts (the same way Streamlit's own e2e suite does it)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serve_process(env: dict[str, str] | None = None, log: Path | None = None, timeout: float = 60.0) -> Iterator[tuple[str, subprocess.Popen]]:
    """Yield the URL of a running app (environment ``env`` on top of this one) and its server process; stop it afterwards."""
    port = free_port()
    out = open(log, "w") if log else subprocess.DEVNULL
    proc = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", "app.py", "--server.headless", "true", "--server.port", str(port), "--server.address", "127.0.0.1"],
        cwd=ROOT, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + timeout
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=1).read() == b"ok":
                    break
            except OSError:
                if time.time() > deadline or proc.poll() is not None:
                    tail = log.read_text()[-2000:] if log else ""
                    raise RuntimeError(f"streamlit did not become healthy at {url}\n{tail}") from None
                time.sleep(0.5)
        yield url, proc
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
        if log:
            out.close()


@contextmanager
def serve(env: dict[str, str] | None = None, log: Path | None = None, timeout: float = 60.0) -> Iterator[str]:
    """Yield the URL of a running app (environment ``env`` on top of this one); stop it afterwards."""
    with serve_process(env, log, timeout) as (url, _):
        yield url
