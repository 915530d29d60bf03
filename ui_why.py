"""Helpers of the "Why merges fail" page: views computed by a background job (``merging.jobs.ViewJob``, the same
worker, progress bar, Cancel and sharing across sessions as every other job; the page only reads their cached output),
and cached readers. No computation runs in a Streamlit thread."""

from __future__ import annotations

import streamlit as st

import ui
from merging.geometry import DEFAULT_MERGES, geometry_path, suite_geometry
from merging.jobs import ViewJob
from merging.lambda_plane import lambda_grid, lambda_plane, lambda_plane_path
from merging.pair_metrics import pair_table, pair_table_path

N = 200
"""Test images per task of the λ plane, the representation CKA and the layer view (issue 19): the library's default, which the
background ``ViewJob`` uses."""


def geometry(name: str):
    suite = ui.load_suite(name)
    target = geometry_path(suite, DEFAULT_MERGES, 0.2, 0.4, ui.CACHE_DIR)
    if not target.is_file():
        ui.job_panel(ui.start_job(ViewJob(name, "geometry"), automatic=True), "Task-vector geometry")
        st.stop()
    return _geometry(name, ui.suite_fingerprint(name))


@st.cache_data(max_entries=4, show_spinner=False)
def _geometry(name: str, fingerprint: str):
    return suite_geometry(ui.load_suite(name), cache_dir=ui.CACHE_DIR)


def plane(name: str, task_i: str, task_j: str):
    suite = ui.load_suite(name)
    target = lambda_plane_path(suite, task_i, task_j, lambda_grid(), N, 0, ui.CACHE_DIR)
    if not target.is_file():
        ui.job_panel(ui.start_job(ViewJob(name, "lambda_plane", (task_i, task_j)), automatic=True),
                     f"The λ plane of {task_i} and {task_j} (121 merges, {N} images per task)")
        st.stop()
    return lambda_plane(suite, task_i, task_j, cache_dir=ui.CACHE_DIR)


def pairs(name: str):
    suite = ui.load_suite(name)
    target = pair_table_path(suite, N, cache_dir=ui.CACHE_DIR)
    if not target.is_file():
        ui.job_panel(ui.start_job(ViewJob(name, "pairs"), automatic=True), "Every pair's task-arithmetic merge and metrics")
        st.stop()
    return pair_table(suite, N, cache_dir=ui.CACHE_DIR)
