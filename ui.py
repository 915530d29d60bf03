"""Shared drawing helpers of the app: the sidebar, cached loaders, job progress. Pages call the library
through these and draw; no computation happens in a Streamlit thread (long work is a background job)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

from merging import artifacts, jobs
from merging.device import default_device, default_preset
from merging.errors import MergeLensError
from merging.progress import time_left
from merging.provenance import add_subtitle, check_one_family, family_label, has_presets, with_provenance
from merging.provenance import run_label as settings_label
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


def restore_from_url(prefix: str) -> None:
    """On a session's first run of a page, put the URL's settings (``?merge-methods=["ties"]``, JSON values) whose
    names start with ``prefix`` into Session State, before any widget is drawn: a reload, a second tab or a
    shared link shows the same settings, and so attaches to the same job (a job's id is its work)."""
    import json

    flag = f"_restored-{prefix}"
    if st.session_state.get(flag):
        return
    st.session_state[flag] = True
    for key, text in st.query_params.items():
        if key.startswith(prefix) and key not in st.session_state:
            try:
                st.session_state[key] = json.loads(text)
            except ValueError:
                continue  # a hand-edited link: the widget keeps its default


def save_to_url(prefix: str, skip: tuple[str, ...] = ()) -> None:
    """Write the page's settings (Session State keys starting with ``prefix``, JSON-able, not in ``skip``) into the URL."""
    import json

    for key in list(st.session_state):
        if not isinstance(key, str) or not key.startswith(prefix) or key in skip:
            continue
        try:
            text = json.dumps(st.session_state[key])
        except (TypeError, ValueError):
            continue
        if st.query_params.get(key) != text:
            st.query_params[key] = text


def initial(key: str, **defaults) -> dict:
    """A widget's default arguments (``value=``, ``index=``, ``default=``), or none when Session State already holds
    its value (restored from the URL): Streamlit warns when a widget gets both."""
    return {} if key in st.session_state else defaults


def attached_job(job: jobs.Job) -> str | None:
    """The id of ``job`` if it is queued or running (started by this session, another tab, or before a reload)."""
    jid = jobs.job_id(job)
    return jid if jobs.is_active(jobs.read_status(CACHE_DIR, jid)) else None


def require_suite(name: str) -> Suite:
    """The suite, or a pointer to the Overview page (which builds it) and the end of this page's run."""
    if not suite_is_built(name):
        building = building_job(name)
        if building is None:
            st.info(f"The {name} suite is not built yet: open the Overview page to build it.")
        else:
            st.info(f"The {name} suite is being built ({100 * building.get('progress', 0):.0f} %, {building.get('message', '')}); "
                    "this page fills in when it is done.")
            job_panel(building["id"], f"Building {name}")
        st.stop()
    return load_suite(name)


def building_job(name: str) -> dict | None:
    """The running job that builds suite ``name`` (every job on a suite builds it first), if any."""
    return next((j for j in jobs.list_jobs(CACHE_DIR, active_only=True) if j.get("spec", {}).get("suite") == name), None)


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
        fraction = status.get("progress", 0.0)
        eta = time_left(status.get("updated", 0) - status.get("started", 0), fraction)
        cols[0].progress(fraction, text=f"{label}: {status.get('message', '')}" + (f" · {eta}" if eta else ""))
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


MODEL_COLOURS = {"individual": "#2563eb", "merged": "#dc2626", "merged + Surgery": "#16a34a", "merged + FeatCal": "#9333ea"}


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
    colours = MODEL_COLOURS if by_model else class_colours(list(dict.fromkeys(rows["classname"])))
    fig = px.scatter(rows, x="x", y="y", color="model" if by_model else "classname", symbol=None if by_model else "model",
                     custom_data=["sample", "model"], hover_data=["classname", "predicted_classname", "correct"], height=620,
                     color_discrete_map=colours, title=title)
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
    if result.get("preset") and has_presets(result["method"]):  # a method without presets may still record the one it was given
        extras.insert(0, result["preset"])
    return result["title"] + (f" ({', '.join(extras)})" if extras else "")


REFERENCE_COLOURS = {"pretrained": "#9ca3af", "individual": MODEL_COLOURS["individual"]}
"""The reference rows keep one colour on every chart (Individual the same blue as on the bias page)."""
_PALETTE = ["#9A6324", "#f58231", "#808000", "#911eb4", "#42d4f4", "#469990", "#e6194B", "#f032e6", "#000075", "#3cb44b",
            "#800000", "#bfef45", "#000000", "#ffd8b1", "#aaffc3", "#dcbeff"]
"""Kelly's/Trubetskoy's distinct colours, in registry order after the references: neighbours in the legend differ in hue
and lightness (the first palette had pairs, e.g. TSV-M and Tinting, that a reader could not tell apart)."""


def method_colours() -> dict[str, str]:
    """One colour per registered method, the same on every page: the references fixed, the rest in registry order."""
    from merging.methods import METHODS

    others = [m for m in METHODS if m not in REFERENCE_COLOURS]
    return {**REFERENCE_COLOURS, **{m: _PALETTE[i % len(_PALETTE)] for i, m in enumerate(others)}}


def method_of(label: str) -> str | None:
    """The registered method a row label names (its title, optionally followed by the preset and overrides)."""
    from merging.methods import METHODS

    titles = sorted(((m.title, name) for name, m in METHODS.items()), key=lambda t: -len(t[0]))
    return next((name for title, name in titles if label == title or label.startswith(title + " (")), None)


def row_order(labels: list[str], by_name: bool = False) -> list[str]:
    """Pretrained first, Individual last, the merges between in registry order (data-free ones, then data-dependent
    ones): the references never move. ``labels`` are row labels (method titles), or method names with ``by_name``."""
    from merging.methods import GROUPS, METHODS, method_group

    names = sorted(METHODS, key=lambda m: (GROUPS.index(method_group(m)), list(METHODS).index(m)))
    rank = {m: i + 1 for i, m in enumerate(names)}
    rank.update(pretrained=0, individual=len(METHODS) + 1)
    name_of = (lambda label: label) if by_name else method_of
    return sorted(labels, key=lambda label: (rank.get(name_of(label) or "", len(METHODS)), labels.index(label)))


def label_colours(labels: list[str]) -> dict[str, str]:
    """Row label -> its method's colour (rows of one method with other settings share it)."""
    colours = method_colours()
    return {label: colours.get(method_of(label) or "", "#6b7280") for label in labels}


def accuracy_bars(table: pd.DataFrame, family: str, title: str = "Per-task accuracy") -> None:
    order = row_order(list(table.index))
    long = table.loc[order].reset_index(names="method").melt(id_vars="method", var_name="task", value_name="accuracy")
    fig = px.bar(long, x="task", y="accuracy", color="method", barmode="group", title=title, height=420,
                 color_discrete_map=label_colours(order), category_orders={"method": order})
    fig.update_layout(yaxis_title="accuracy (%)", legend_title=None, margin=dict(t=50, b=10))
    chart(fig, family)


def class_colours(classnames: list[str]) -> dict[str, str]:
    """Classes named by colours (mini8's ``colors``: "red", "teal", ...) drawn in those colours; {} otherwise (plotly's palette).

    Pillow's colour-name table decides what is a colour; a task with any other name keeps the palette for all.
    """
    from PIL import ImageColor

    out = {}
    for name in classnames:
        try:
            r, g, b = ImageColor.getrgb(name.replace(" ", ""))[:3]
        except ValueError:
            return {}
        out[name] = f"rgb({r},{g},{b})"
    return out


def surgery_outcomes(samples: list[int], labels, predictions: dict[str, dict[int, int]]) -> dict[str, list[int]]:
    """Selected test images by what Surgery did to them: the moment a teacher shows (issue #23, teaching help).

    ``predictions`` maps "merged" and "merged + Surgery" to {test index: predicted class}. "merged wrong": the
    merge misclassifies; of those, "fixed by Surgery": Surgery gets right, "still wrong": Surgery gets wrong too.
    """
    merged, surgery = predictions["merged"], predictions["merged + Surgery"]
    truth = {s: int(labels[s]) for s in samples}
    wrong = [s for s in samples if merged[s] != truth[s]]
    return {"all": list(samples), "merged wrong": wrong, "fixed by Surgery": [s for s in wrong if surgery[s] == truth[s]],
            "still wrong": [s for s in wrong if surgery[s] != truth[s]]}


def layer_figure(layered: pd.DataFrame, title: str) -> go.Figure:
    """Mean L1 per layer, blocks in network order then the final features, one line per model.

    The final features are a separate point (after the projection), not joined to the last block by the
    line; lines get distinct dashes and markers so one never hides another where they coincide.
    """
    from merging.features import FINAL

    blocks = sorted({layer for layer in layered["layer"] if layer != FINAL}, key=lambda b: int("".join(filter(str.isdigit, b)) or 0))
    order = [*blocks, FINAL]
    fig = go.Figure()
    styles = {"merged": ("solid", "circle"), "merged + Surgery": ("dash", "diamond"), "merged + FeatCal": ("dashdot", "triangle-up")}
    for model, rows in layered.groupby("model", sort=False):
        by_layer = rows.set_index("layer")["value"]
        dash, symbol = styles.get(model, ("dot", "square"))
        colour = MODEL_COLOURS.get(model)
        fig.add_scatter(x=blocks, y=[by_layer.get(b) for b in blocks], mode="lines+markers", name=model, legendgroup=model,
                        line=dict(dash=dash, color=colour, width=2.5), marker=dict(symbol=symbol, size=9, color=colour))
        if FINAL in by_layer:
            fig.add_scatter(x=[FINAL], y=[by_layer[FINAL]], mode="markers", name=model, legendgroup=model, showlegend=False,
                            marker=dict(symbol=symbol, size=12, color=colour, line=dict(width=1, color="black")))
    fig.update_layout(title=title, height=420, yaxis_title="mean L1 to individual", margin=dict(t=50, b=10),
                      xaxis=dict(type="category", categoryorder="array", categoryarray=order, title="layer (blocks in order, then the final features)"))
    return fig


def fix_bias_figure(l1: pd.DataFrame, bases: list[str], suffixes: list[str]) -> go.Figure:
    """Per-task bias of each fix, one group of bars per task and one panel per base merge (ProbSurgery's figure).

    ``l1`` has columns task, model, value; a model is a base title plus one of ``suffixes`` ("" for the base itself).
    """
    from plotly.subplots import make_subplots

    fig = make_subplots(rows=len(bases), cols=1, shared_xaxes=True, subplot_titles=bases, vertical_spacing=0.12 / max(len(bases), 1))
    colours = dict(zip(suffixes, ["#dc2626", "#16a34a", "#0d9488", "#9333ea", *_PALETTE], strict=False))
    for row, base in enumerate(bases, start=1):
        for suffix in suffixes:
            rows = l1[l1["model"] == base + suffix]
            fig.add_bar(x=rows["task"], y=rows["value"], name=(suffix.removeprefix(" + ") or "base merge"), legendgroup=suffix,
                        showlegend=row == 1, marker_color=colours[suffix], row=row, col=1,
                        hovertemplate=f"{base}{suffix}<br>%{{x}}: %{{y:.3f}}<extra></extra>")
        fig.update_yaxes(title_text="mean L1 to individual", row=row, col=1)
    fig.update_layout(barmode="group", height=260 + 260 * len(bases), legend_title=None, margin=dict(t=60, b=10),
                      title="Representation bias per task: the base merge and each fix")
    return fig


GROUP_SYMBOLS = {"reference": "star", "data-free, one model": "circle", "storage lane (task id)": "square", "data-dependent": "diamond"}
"""One marker shape per method group (``merging.methods.GROUPS``) in the accuracy-vs-cost view."""


def pareto_front(cost: pd.Series, accuracy: pd.Series) -> list[str]:
    """Labels on the Pareto front of (low cost, high accuracy), cheapest first: no other point is at least as cheap and more accurate."""
    front, best = [], -np.inf
    for label in sorted(cost.index, key=lambda k: (cost[k], -accuracy[k])):
        if accuracy[label] > best:
            front.append(label)
            best = accuracy[label]
    return front


def cost_figure(cost: pd.DataFrame, x: str, groups: Mapping[str, str] | None = None) -> go.Figure:
    """Average accuracy against a cost (``cost`` has one row per method label), every method visible, the Pareto front drawn.

    Costs span orders of magnitude, so the axis is logarithmic; a method that costs nothing (no extra storage, no
    data, no adaptation: under 10 ms or one unit counts as none) is drawn on the axis floor, labelled "0" there,
    instead of vanishing. ``groups`` (label -> method group) gives each group its marker shape (``GROUP_SYMBOLS``).
    The legend names every marker; a marker whose position no other shares also carries its label and cost.
    """
    seconds, megabytes = "seconds" in x, "MB" in x
    values = cost[x].astype(float)
    values = values.where(values >= (0.01 if seconds else 1e-3 if megabytes else 1), 0.0)
    positive = values[values > 0]
    floor = 10 ** np.floor(np.log10(positive.min()) - 1) if len(positive) else 1.0
    top = max(values.max(), floor)
    drawn = values.where(values > 0, floor)
    fmt = (lambda v: f"{v:.3g} s") if seconds else (lambda v: f"{v:.3g} MB") if megabytes else (lambda v: f"{v:,.0f}")
    colours = label_colours(list(cost.index))
    shared = drawn.duplicated(keep=False)
    accuracy = cost["average accuracy"].astype(float)
    fig = go.Figure()
    for label in cost.index:
        text = "" if shared[label] else f"{label.split(' (')[0]}: {fmt(values[label])}"
        group = (groups or {}).get(label, "")
        fig.add_scatter(x=[drawn[label]], y=[accuracy[label]], mode="markers+text", name=label, cliponaxis=False,
                        marker=dict(size=14, color=colours[label], symbol=GROUP_SYMBOLS.get(group, "circle"), line=dict(width=1, color="white")),
                        text=[text], textposition="middle right", hovertext=f"{label}: {fmt(values[label])}{f' · {group}' if group else ''}",
                        hoverinfo="text+y")
    front = pareto_front(values, accuracy)
    fig.add_scatter(x=[drawn[k] for k in front], y=[accuracy[k] for k in front], mode="lines", name="Pareto front", line_shape="hv",
                    line=dict(color="#6b7280", dash="dot", width=2), hoverinfo="skip")
    decades = np.arange(np.ceil(np.log10(floor)) + 1, np.ceil(np.log10(top)) + 1)
    ticks = [floor, *(10.0 ** decades)]
    note = "0 drawn at the left edge" if len(positive) else f"every method shown has 0 {x}"
    fig.update_layout(title=f"Average accuracy vs {x} (log axis; {note})", height=480, legend_title=None,
                      xaxis=dict(type="log", title=x, tickvals=ticks, ticktext=["0", *(fmt(t) for t in ticks[1:])],
                                 range=[np.log10(floor) - 0.3, np.log10(top) + 1.5]),
                      yaxis=dict(title="average accuracy (%)", range=[accuracy.min() - 3, accuracy.max() + 3]), margin=dict(t=50, b=10, r=10))
    return fig


def family(suite: Suite) -> str:
    """The suite's checkpoint family as one line: ``"mini8 · built-in · weights 1a2b3c4d"`` (computed once per loaded suite)."""
    return family_label(suite.checkpoint_family)


def chart(fig: go.Figure, family: str, where=None, run: dict | None = None, **kwargs):
    """Every figure of the app is drawn here: its title gets the checkpoint family (and, for a one-run figure, the run's
    hyperparameters, preset and data split) as a subtitle, so no number is shown without where it comes from."""
    add_subtitle(fig, family + (f" · {settings_label(run)}" if run is not None else ""))
    kwargs.setdefault("width", "stretch")
    return (where or st).plotly_chart(fig, **kwargs)


def _md(text: str) -> str:
    return text.replace("_", "\\_").replace("*", "\\*")


def provenance_caption(family: str, runs: Mapping[str, dict] | None = None, where=None) -> None:
    """The family line above a table (and each row's hyperparameters, preset and data split); results of two checkpoint
    families stop the page with one error line instead of sharing a table."""
    where = where or st
    if runs:
        try:
            check_one_family(runs.values())
        except MergeLensError as e:
            where.error(str(e))
            st.stop()
    where.caption(f"Checkpoints: **{_md(family)}**")


def settings_md(result: dict) -> str:
    """A run's hyperparameters, preset and data split (``merging.provenance.run_label``), escaped for markdown."""
    return _md(settings_label(result))


def runs_caption(runs: Mapping[str, dict], where=None) -> None:
    """One caption naming each model's hyperparameters, preset and data split (figures and tables whose rows are models)."""
    (where or st).caption("Settings: " + "; ".join(f"**{_md(label)}**: {_md(settings_label(r))}" for label, r in runs.items()))


def settings_column(table: pd.DataFrame, runs: Mapping[str, dict] | None) -> pd.DataFrame:
    """``table`` with a last column ``settings``: each row's run label (λ, preset, the split it adapted on)."""
    if not runs:
        return table
    return table.assign(settings=[settings_label(runs[i]) if i in runs else "" for i in table.index])


def accuracy_tabs(table: pd.DataFrame, reference: str | None, filename: str, extra: list[str] | None = None, *, suite: Suite,
                  runs: Mapping[str, dict] | None = None) -> list:
    """Bars, then tabs with the accuracy table and the normalized one (both downloadable); returns any ``extra`` tabs.
    Above the tables the checkpoint family; in them a ``settings`` column (``runs``: row label -> its result); in their
    CSVs every provenance column."""
    from merging.evaluation import normalized_table

    table = table.loc[row_order(list(table.index))]
    numbers = list(table.columns)
    provenance_caption(family(suite), runs)
    tabs = st.tabs(["Accuracy (%)", "Normalized (% of individual)", *(extra or [])])
    with tabs[0]:
        st.dataframe(settings_column(table, runs).style.format("{:.1f}", subset=numbers).background_gradient(cmap="Blues", axis=None, subset=numbers),
                     width="stretch")
        download_csv(table, f"{filename}.csv", checkpoints=suite.checkpoint_family, runs=runs)
    with tabs[1]:
        if reference in table.index:
            norm = normalized_table(table, reference=reference)
            st.dataframe(settings_column(norm, runs).style.format("{:.1f}", subset=numbers).background_gradient(cmap="Greens", axis=None, subset=numbers),
                         width="stretch")
            download_csv(norm, f"{filename}_normalized.csv", checkpoints=suite.checkpoint_family, runs=runs)
        else:
            st.caption("Add Individual to the methods to normalize.")
    return tabs[2:]


def selection_figure(runs: Mapping[str, dict]) -> go.Figure:
    """Validation accuracy over the λ grid of each ``scaling=auto`` run (``result["selection"]``): the average over
    tasks bold, each task faint, the chosen λ a star."""
    fig = go.Figure()
    for i, (label, r) in enumerate(runs.items()):
        sel, color = r["selection"], px.colors.qualitative.Plotly[i % len(px.colors.qualitative.Plotly)]
        for task, acc in sel.get("per_task", {}).items():
            fig.add_scatter(x=sel["grid"], y=acc, mode="lines", line={"color": color, "width": 1}, opacity=0.3, legendgroup=label, showlegend=False,
                            hovertemplate=f"{task}<br>λ=%{{x:g}}<br>val accuracy %{{y:.1f}} %<extra>{label}</extra>")
        fig.add_scatter(x=sel["grid"], y=sel["accuracy"], mode="lines+markers", line={"color": color, "width": 3}, legendgroup=label,
                        name=f"{label}: average over tasks")
        fig.add_scatter(x=[sel["chosen"]], y=[sel["accuracy"][sel["grid"].index(sel["chosen"])]], mode="markers", legendgroup=label,
                        marker={"symbol": "star", "size": 18, "color": color, "line": {"color": "black", "width": 1}}, name=f"{label}: chosen λ = {sel['chosen']:g}")
    fig.update_layout(title="λ chosen on the validation split", xaxis_title="scaling coefficient λ", yaxis_title="validation accuracy (%)", height=430)
    return fig


def download_csv(table: pd.DataFrame, name: str, label: str = "Download CSV", *, checkpoints: Mapping | None,
                 runs: Mapping[str, dict] | None = None, key=None) -> None:
    """A CSV of ``table`` with its provenance columns (``merging.provenance.with_provenance``): each row's run where
    ``runs`` maps the row to its result, else the checkpoint family (suite, layout, weights). Plain CSV: pandas reads it."""
    exported = with_provenance(table, checkpoints, runs, key)
    st.download_button(label, exported.to_csv(float_format="%.2f").encode(), file_name=name, mime="text/csv")
