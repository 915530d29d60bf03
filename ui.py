"""Shared drawing helpers of the app: the sidebar, cached loaders, job progress. Pages call the library
through these and draw; no computation happens in a Streamlit thread (long work is a background job)."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import plotly.express as px
import streamlit as st

from merging import artifacts, jobs
from merging.device import default_device, default_preset
from merging.errors import MergeLensError
from merging.runs import RunConfig, cached_result, load_model
from merging.suites import Suite, get_suite, input_stamp, is_built, list_suites

CACHE_DIR = Path(os.environ.get("MERGELENS_CACHE", Path(__file__).resolve().parent / "cache"))
SUITE_CONFIGS = Path(__file__).resolve().parent / "suite_configs"
"""The folder the app scans for suite config files (``*.yaml``, ``*.yml``, ``*.toml``), besides ``MERGELENS_SUITES``."""
POLL_SECONDS = 3.0
"""How often a page polls a queued or running job: each poll costs the server ~0.2 CPU-s that the job's worker
would use. Nothing polls when no job runs (BENCHMARKS.md, "The idle server")."""


def sidebar() -> dict:
    """Suite, device and preset pickers shared by every page, plus the running jobs."""
    with st.sidebar:
        names = list_suites() + config_suites()
        default = os.environ.get("MERGELENS_DEFAULT_SUITE", names[0])
        if default not in names:
            names.append(default)
        suite = st.selectbox("Suite", names, index=names.index(default), key="suite",
                             help="mini8: the built-in 8-task suite; micro: 3 tasks, for a quick look; or a suite config file "
                                  "(see README, 'Your own checkpoints') listed in MERGELENS_SUITES or found in suite_configs/")
        device = default_device()
        st.caption(f"Device: **{device}**" + ("" if device == "cuda" else " (no GPU found)"))
        presets = ["fast", "paper"]
        preset = st.radio("Preset", presets, index=presets.index(default_preset(device)), key="preset", horizontal=True,
                          help="fast: sized for a CPU; paper: the published hyperparameters")
        running_jobs_panel()
    return {"suite": suite, "device": device, "preset": preset}


def running_jobs_panel() -> None:
    """Every session's queued or running jobs; it polls only while there are some, then reruns the page once."""
    if not jobs.list_jobs(CACHE_DIR, active_only=True):
        return

    @st.fragment(run_every=5.0)
    def panel() -> None:
        active = jobs.list_jobs(CACHE_DIR, active_only=True)
        if not active:
            st.rerun(scope="app")
        st.markdown("**Running jobs**")
        for j in active:
            st.progress(j.get("progress", 0.0), text=f"{j['id'].split('-')[0]}: {j.get('message', '')}"[:80])

    panel()


def config_suites() -> list[str]:
    """Suite config files the user points the app at: ``MERGELENS_SUITES`` (os.pathsep-separated) and ``suite_configs/``."""
    listed = [p for p in os.environ.get("MERGELENS_SUITES", "").split(os.pathsep) if p]
    found = sorted(str(p) for p in SUITE_CONFIGS.glob("*") if p.suffix in (".yaml", ".yml", ".toml"))
    return list(dict.fromkeys(listed + found))


def suite_is_built(name: str) -> bool:
    return is_built(name, cache_dir=CACHE_DIR)


def require_suite(name: str) -> Suite:
    """The suite, or a pointer to the Overview page (which builds it) and the end of this page's run."""
    if not suite_is_built(name):
        st.info(f"The {name} suite is not built yet: open the Overview page to build it.")
        st.stop()
    return load_suite(name)


def load_suite(name: str) -> Suite:
    """The suite from the on-disk cache (built by a background job); never mutated by callers.

    Loaded again when any of its files changed (``input_stamp``), so a replaced image or checkpoint never
    leaves the app showing numbers of the old inputs; the stamp is re-read at most every few seconds.
    """
    return _load_suite(name, _input_stamp(name))


@st.cache_data(ttl=3, show_spinner=False)
def _input_stamp(name: str) -> str:
    return input_stamp(name, cache_dir=CACHE_DIR)


@st.cache_resource(show_spinner="Loading suite...", max_entries=4)
def _load_suite(name: str, stamp: str) -> Suite:
    return get_suite(name, cache_dir=CACHE_DIR)


def cached_results(suite: Suite, configs: dict[str, RunConfig], device: str) -> dict[str, dict | None]:
    return {label: cached_result(c, suite, CACHE_DIR, device) for label, c in configs.items()}


def job_progress(jid: str, label: str) -> str | None:
    """Draw a job's progress bar and Cancel, or how it ended with a Retry; returns its state."""
    status = jobs.read_status(CACHE_DIR, jid)
    if status is None:
        return None
    state = status["state"]
    if state in jobs.ACTIVE:
        cols = st.columns([5, 1])
        cols[0].progress(status.get("progress", 0.0), text=f"{label}: {status.get('message', '')}")
        if cols[1].button("Cancel", key=f"cancel-{jid}"):
            jobs.cancel(CACHE_DIR, jid)
            st.rerun(scope="app")
    elif state in ("error", "cancelled"):
        cols = st.columns([5, 1])
        if state == "error":
            cols[0].error(f"{label} failed: {status.get('message')}")
        else:
            cols[0].warning(f"{label} was cancelled.")
        if cols[1].button("Retry", key=f"retry-{jid}"):
            jobs.start(status["spec"], CACHE_DIR)
            st.rerun(scope="app")
    return state


def job_panel(jid: str | None, label: str) -> str | None:
    """A job's progress: a fragment that redraws every ``POLL_SECONDS`` only while the job is queued or running
    and reruns the page once when it ends; a finished, failed or absent job costs no polling."""
    if jid is None:
        return None
    status = jobs.read_status(CACHE_DIR, jid)
    if not jobs.is_active(status):
        return job_progress(jid, label)

    @st.fragment(run_every=POLL_SECONDS)
    def panel() -> None:
        if job_progress(jid, label) not in jobs.ACTIVE:
            st.rerun(scope="app")

    panel()
    return status["state"]


def start_job(job: jobs.Job, automatic: bool = False) -> str | None:
    """Pages call this only when the job's outputs are missing, so a finished record is stale and the job reruns.
    ``automatic`` (a page that starts work on opening): a failed job is shown with its Retry, not restarted."""
    try:
        return jobs.start(job, CACHE_DIR, restart_failed=not automatic, restart_done=True)
    except MergeLensError as e:
        st.error(str(e))
        return None


@st.cache_resource(show_spinner="Loading the model...", max_entries=8)
def load_run_model(key: str, suite_name: str, _result: dict):
    return load_model(_result, load_suite(suite_name), CACHE_DIR)


def routing_samples(result: dict, suite_name: str, task: str, n: int = 256) -> pd.DataFrame:
    """Per-sample routing weights of a WEMoE run on up to ``n`` test images of ``task`` (tidy frame)."""
    return _routing_samples(result["key"], suite_name, task, n, result)


# Streamlit leaves arguments named ``_x`` out of a cached function's key: the run's key (which holds the suite's
# fingerprint) stands for the result dict in every cached function below, so two runs never share an entry.
@st.cache_data(show_spinner="Computing routing weights...", max_entries=32)
def _routing_samples(key: str, suite_name: str, task: str, n: int, _result: dict) -> pd.DataFrame:
    import torch

    model = load_run_model(key, suite_name, _result)
    data = load_suite(suite_name).data[task]
    with torch.no_grad():
        r = model.routing_weights(data.preprocess(data.test_images[:n]), task)
    blocks = _result["info"]["blocks"]
    rows = [(s, f"block {blocks[b]}", model.tasks[k], float(r[s, b, k])) for s in range(r.shape[0]) for b in range(r.shape[1]) for k in range(r.shape[2])]
    return pd.DataFrame(rows, columns=["sample", "block", "expert", "weight"])


def cross_task(result: dict, suite_name: str) -> pd.DataFrame:
    """A run's cross-task matrix (encoder of each task x head of each task), cached on disk next to the run."""
    return _cross_task(result["key"], suite_name, result)


@st.cache_data(show_spinner="Computing the cross-task matrix...", max_entries=32)
def _cross_task(key: str, suite_name: str, _result: dict) -> pd.DataFrame:
    return artifacts.cached_cross_task_matrix(_result, load_suite(suite_name), CACHE_DIR)


@st.cache_resource
def warm_up_projections():
    """Compile UMAP's numba code once per server, in the background, while the user looks around."""
    from merging.projection import warm_up_in_background

    return warm_up_in_background()


def _bias_results(name: str, configs: dict[str, RunConfig], device: str) -> dict[str, dict | None]:
    return cached_results(load_suite(name), configs, device)


def bias_ready(name: str, configs: dict[str, RunConfig], device: str, n: int) -> bool:
    """Whether every run and every task's features (with blocks) of the bias view are in the cache."""
    suite = load_suite(name)
    results = _bias_results(name, configs, device)
    return None not in results.values() and all(artifacts.features_cached(r, suite, n, True, CACHE_DIR) for r in results.values())


def suite_fingerprint(name: str) -> str:
    """The loaded suite's fingerprint: part of the key of every cached view computed from its runs, so a
    view of changed inputs is never served from memory (the run keys it reads change with it)."""
    return load_suite(name).fingerprint


def bias_features(name: str, configs: dict[str, RunConfig], device: str, n: int) -> dict:
    """{model label: {task: Features}} read from the feature cache (filled by the background job)."""
    return _bias_features(name, suite_fingerprint(name), configs, device, n)


@st.cache_resource(show_spinner="Loading features...", max_entries=16)
def _bias_features(name: str, fingerprint: str, configs: dict[str, RunConfig], device: str, n: int) -> dict:
    suite = load_suite(name)
    return {label: artifacts.run_features(r, suite, n=n, layers=True, cache_dir=CACHE_DIR) for label, r in _bias_results(name, configs, device).items()}


def projected(name: str, configs: dict[str, RunConfig], device: str, n: int, task: str, method: str) -> pd.DataFrame:
    """One joint fit over the models' features of ``task``, cached on disk by the library."""
    return _projected(name, suite_fingerprint(name), configs, device, n, task, method)


@st.cache_data(show_spinner="Projecting (a few seconds; cached on disk afterwards)...", max_entries=64)
def _projected(name: str, fingerprint: str, configs: dict[str, RunConfig], device: str, n: int, task: str, method: str) -> pd.DataFrame:
    from merging.projection import joint_projection

    sets = {label: fs[task] for label, fs in bias_features(name, configs, device, n).items()}
    return joint_projection(sets, method=method, cache_dir=CACHE_DIR)


MODEL_COLOURS = {"individual": "#2563eb", "merged": "#dc2626", "merged + Surgery": "#16a34a"}


def bias_scatter(name: str, configs: dict[str, RunConfig], device: str, n: int, task: str, method: str, shown: tuple[str, ...],
                 color: str, title: str):
    """The bias page's scatter, built once per view: plotly express spends ~0.1-0.3 s building it, which a
    returning visitor would wait for (BENCHMARKS.md, "The dashboard"). Callers must not mutate it.
    A small-N fallback of the projection (its note) is said under the title."""
    return _bias_scatter(name, suite_fingerprint(name), configs, device, n, task, method, shown, color, title)


@st.cache_resource(show_spinner=False, max_entries=64)
def _bias_scatter(name: str, fingerprint: str, configs: dict[str, RunConfig], device: str, n: int, task: str, method: str,
                  shown: tuple[str, ...], color: str, title: str):
    from merging.projection import figure_title

    frame = projected(name, configs, device, n, task, method)
    title = figure_title(title, frame.attrs.get("note", ""))
    rows = frame[frame["model"].isin(shown)].reset_index(drop=True)
    by_model = color == "model"
    fig = px.scatter(rows, x="x", y="y", color="model" if by_model else "classname", symbol=None if by_model else "model",
                     custom_data=["sample", "model"], hover_data=["classname", "predicted_classname", "correct"], height=620,
                     color_discrete_map=MODEL_COLOURS, title=title)
    fig.update_traces(marker={"size": 6, "opacity": 0.75})
    fig.update_layout(dragmode="lasso", legend_title=None, xaxis_title=None, yaxis_title=None)
    return fig


def bias_metrics(name: str, configs: dict[str, RunConfig], device: str, n: int) -> pd.DataFrame:
    """Every task's metrics of each model against the individual model, final feature and every block."""
    return _bias_metrics(name, suite_fingerprint(name), configs, device, n)


@st.cache_data(show_spinner="Measuring the bias...", max_entries=16)
def _bias_metrics(name: str, fingerprint: str, configs: dict[str, RunConfig], device: str, n: int) -> pd.DataFrame:
    from merging.metrics import bias_table

    feats = bias_features(name, configs, device, n)
    tables = []
    for task in load_suite(name).tasks:
        sets = {label: fs[task] for label, fs in feats.items()}
        tables.append(bias_table(sets, "individual", layers=sets["individual"].layers))
    return pd.concat(tables, ignore_index=True)


def download_html(fig, name: str) -> None:
    """A self-contained HTML of ``fig`` (plotly.js inlined, ~5 MB), generated only when the button is clicked:
    built eagerly it cost every rerun a second of server and browser time."""
    st.download_button("Download interactive HTML", lambda: fig.to_html(include_plotlyjs=True, full_html=True).encode(), file_name=name,
                       mime="text/html", on_click="ignore")


def run_label(result: dict) -> str:
    """A row label: the method's title, its preset, and the hyperparameters changed from it."""
    extras = [f"{k}={v}" for k, v in result.get("overrides", {}).items()]
    if result.get("preset"):
        extras.insert(0, result["preset"])
    return result["title"] + (f" ({', '.join(extras)})" if extras else "")


def accuracy_bars(table: pd.DataFrame, title: str = "Per-task accuracy") -> None:
    long = table.reset_index(names="method").melt(id_vars="method", var_name="task", value_name="accuracy")
    fig = px.bar(long, x="task", y="accuracy", color="method", barmode="group", title=title, height=420)
    fig.update_layout(yaxis_title="accuracy (%)", legend_title=None, margin=dict(t=50, b=10))
    st.plotly_chart(fig, width="stretch")


def accuracy_tabs(table: pd.DataFrame, reference: str | None, filename: str, extra: list[str] | None = None) -> list:
    """Bars, then tabs with the accuracy table and the normalized one (both downloadable); returns any ``extra`` tabs."""
    from merging.evaluation import normalized_table

    tabs = st.tabs(["Accuracy (%)", "Normalized (% of individual)", *(extra or [])])
    with tabs[0]:
        st.dataframe(table.style.format("{:.1f}").background_gradient(cmap="Blues", axis=None), width="stretch")
        download_csv(table, f"{filename}.csv")
    with tabs[1]:
        if reference in table.index:
            norm = normalized_table(table, reference=reference)
            st.dataframe(norm.style.format("{:.1f}").background_gradient(cmap="Greens", axis=None), width="stretch")
            download_csv(norm, f"{filename}_normalized.csv")
        else:
            st.caption("Add Individual to the methods to normalize.")
    return tabs[2:]


def download_csv(table: pd.DataFrame, name: str, label: str = "Download CSV") -> None:
    st.download_button(label, table.to_csv(float_format="%.2f").encode(), file_name=name, mime="text/csv")
