"""Helpers of the "Why merges fail" page: views computed by ``python -m merging why ...`` in a background process
(the page only reads their cached output), and cached readers. No computation runs in a Streamlit thread."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import streamlit as st

import ui
from merging.geometry import DEFAULT_MERGES, geometry_path, suite_geometry
from merging.lambda_plane import lambda_grid, lambda_plane, lambda_plane_path
from merging.pair_metrics import pair_table, pair_table_path

ROOT = Path(__file__).resolve().parent
N = 200
"""Test images per task of the λ plane, the representation CKA and the layer view (issue 19)."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


def start_view(args: list[str], target: Path) -> Path:
    """Start ``python -m merging why ARGS`` in the background unless ``target`` exists or the same command already runs
    (any session: a pid file per command under ``cache/why/``); returns the command's log file."""
    marker = ui.CACHE_DIR / "why" / f".running-{hashlib.sha256(' '.join(args).encode()).hexdigest()[:12]}"
    log = marker.with_suffix(".log")
    if target.is_file():
        return log
    pid = marker.read_text().strip() if marker.is_file() else ""
    if pid.isdigit() and _alive(int(pid)):
        return log
    marker.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "merging", "why", *args, "--cache-dir", str(ui.CACHE_DIR), "--out", str(ui.CACHE_DIR / "why" / "out")]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    marker.write_text(str(proc.pid))
    return log


def wait_for(target: Path, log: Path, label: str) -> None:
    """A line that polls until the background command has written ``target``, then reruns the page; it shows the
    command's last log line, and its error if it stopped with one."""

    @st.fragment(run_every=ui.POLL_SECONDS)
    def panel() -> None:
        if target.is_file():
            st.rerun(scope="app")
        lines = log.read_text(errors="replace").strip().splitlines() if log.is_file() else []
        last = lines[-1] if lines else ""
        if last.startswith("error:"):
            st.error(f"{label} failed: {last[len('error:'):].strip()}")
        else:
            st.info(f"{label}: computing in the background… {last[:160]}")

    panel()


def geometry(name: str):
    suite = ui.load_suite(name)
    target = geometry_path(suite, DEFAULT_MERGES, 0.2, 0.4, ui.CACHE_DIR)
    if not target.is_file():
        wait_for(target, start_view(["geometry", "--suite", name], target), "Task-vector geometry")
        st.stop()
    return _geometry(name, ui.suite_fingerprint(name))


@st.cache_data(max_entries=4, show_spinner=False)
def _geometry(name: str, fingerprint: str):
    return suite_geometry(ui.load_suite(name), cache_dir=ui.CACHE_DIR)


def plane(name: str, task_i: str, task_j: str):
    suite = ui.load_suite(name)
    target = lambda_plane_path(suite, task_i, task_j, lambda_grid(), N, 0, ui.CACHE_DIR)
    if not target.is_file():
        log = start_view(["lambda-plane", "--suite", name, "--tasks", f"{task_i},{task_j}"], target)
        wait_for(target, log, f"The λ plane of {task_i} and {task_j} (121 merges, {N} images per task)")
        st.stop()
    return lambda_plane(suite, task_i, task_j, cache_dir=ui.CACHE_DIR)


def pairs(name: str):
    suite = ui.load_suite(name)
    target = pair_table_path(suite, N, cache_dir=ui.CACHE_DIR)
    if not target.is_file():
        wait_for(target, start_view(["pairs", "--suite", name], target), "Every pair's task-arithmetic merge and metrics")
        st.stop()
    return pair_table(suite, N, cache_dir=ui.CACHE_DIR)
