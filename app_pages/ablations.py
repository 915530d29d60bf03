"""Ablations: a sweep's accuracy (and mean L1 bias) against each swept value, error bands over seeds."""


import plotly.express as px
import plotly.graph_objects as go
import streamlit as st

import ui
from merging import sweeps
from merging.errors import MergeLensError
from merging.jobs import SweepJob
from merging.methods import METHODS, specs
from merging.provenance import family_label, family_of

ui.restore_from_url("abl-")
settings = ui.sidebar()
st.title("Ablations")
builtin = sweeps.builtin_sweeps()
finished = {m["id"]: m for m in sweeps.list_sweeps(ui.CACHE_DIR)}
options = [f"builtin:{k}" for k in builtin] + [f"done:{k}" for k in finished] + ["new"]


def describe(option: str) -> str:
    kind, _, key = option.partition(":")
    if kind == "builtin":
        return f"Built-in: {builtin[key].title or key} ({builtin[key].suite})"
    if kind == "done":
        c = finished[key]["config"]
        return f"Finished: {c.get('title') or key} ({c['suite']}, {finished[key]['created']})"
    return "New sweep..."


def new_sweep() -> sweeps.SweepConfig:
    """A small sweep on the sidebar's suite: one or two swept keys, comma-separated values, seeds."""
    names = [m for m in METHODS if m not in ("pretrained", "individual")]
    for key, options in (("abl-method", names),):
        if st.session_state.get(key, options[0]) not in options:
            del st.session_state[key]
    method = st.selectbox("Method", names, format_func=lambda m: METHODS[m].title, key="abl-method",
                          **ui.initial("abl-method", index=names.index("task_arithmetic")))
    keys = [h.name for h in specs(METHODS[method]) if not h.params_of] + ["num_tasks"]
    for key in ("abl-key1", "abl-key2"):
        if key in st.session_state and st.session_state[key] not in keys:
            del st.session_state[key]
    cols = st.columns(3)
    grid = {cols[0].selectbox("Swept key", keys, key="abl-key1"):
            sweeps.parse_values(cols[0].text_input("Values", key="abl-values1", **ui.initial("abl-values1", value="0.1,0.3,0.5")))}
    if cols[1].checkbox("Second key", key="abl-two"):
        grid[cols[1].selectbox("Second swept key", keys, key="abl-key2", **ui.initial("abl-key2", index=len(keys) - 1))] = sweeps.parse_values(
            cols[1].text_input("Values", key="abl-values2", **ui.initial("abl-values2", value="2,3")))
    seeds = [int(s) for s in cols[2].text_input("Seeds", key="abl-seeds", **ui.initial("abl-seeds", value="0")).split(",") if s.strip()]
    preset = settings["preset"] if METHODS[method].presets else None
    return sweeps.SweepConfig(settings["suite"], method, grid, preset=preset, seeds=tuple(seeds))


def line_plot(table, x: str, by: str, title: str, y_label: str, family: str) -> None:
    """Mean against ``x``, one line per ``by`` value, with a band of +-1 std over seeds."""
    fig, colors = go.Figure(), px.colors.qualitative.Plotly
    for i, (name, g) in enumerate(table.groupby(by, sort=False)):
        color, xs = colors[i % len(colors)], [str(v) for v in g[x]]
        if (g["count"] > 1).any():
            rgba = "rgba({},{},{},0.15)".format(*(int(color[j:j + 2], 16) for j in (1, 3, 5)))
            fig.add_scatter(x=xs + xs[::-1], y=list(g["mean"] + g["std"]) + list(g["mean"] - g["std"])[::-1], fill="toself", mode="lines",
                            fillcolor=rgba, line=dict(width=0), hoverinfo="skip", showlegend=False)
        fig.add_scatter(x=xs, y=g["mean"], mode="lines+markers", name=str(name), line=dict(color=color, width=3 if name == "average" else 1.5))
    fig.update_layout(title=title, xaxis_title=x, yaxis_title=y_label, height=420, margin=dict(t=50, b=10), xaxis_type="category")
    ui.chart(fig, family)


def show_curves(frame, x: str, by: str, metric: str, stem: str) -> None:
    label = "accuracy (%)" if metric == "accuracy" else "mean L1 distance to the experts"
    table = sweeps.curves(frame, x, by, metric)
    line_plot(table, x, by, f"{'Accuracy' if metric == 'accuracy' else 'L1 bias'} vs {x}" + ("" if by == "task" else f", average, by {by}"), label, family)
    with st.expander("Table"):
        st.dataframe(table, width="stretch", hide_index=True)
        ui.download_csv(table.set_index([x, by]), f"{stem}_{metric}_{x}_by_{by}.csv", checkpoints=checkpoints)


if st.session_state.get("abl-sweep", options[0]) not in options:
    del st.session_state["abl-sweep"]  # a link to a sweep this cache does not hold
pick = st.selectbox("Sweep", options, format_func=describe, key="abl-sweep")
kind, _, key = pick.partition(":")
try:
    config = sweeps.manifest_config(finished[key]) if kind == "done" else builtin[key] if kind == "builtin" else new_sweep()
    if kind == "done":
        frame, done, total = sweeps.load_frame(ui.CACHE_DIR, key), len(finished[key]["points"]), len(finished[key]["points"])
        made_on = finished[key].get("suite_fingerprint")
        if ui.suite_is_built(config.suite) and made_on != ui.load_suite(config.suite).fingerprint:
            st.warning(f"This table was computed on other inputs than the {config.suite} suite has now (fingerprint {made_on}, now "
                       f"{ui.load_suite(config.suite).fingerprint}): its numbers are a record, not the current suite's. Pick the same "
                       "sweep as a new one and run it to compute it on the current inputs.")
    else:
        if not ui.suite_is_built(config.suite):
            st.info(f"This sweep runs on the {config.suite} suite, which is not built yet: open the Overview page to build it.")
            st.stop()
        frame, done, total = sweeps.cached_frame(config, ui.load_suite(config.suite), ui.CACHE_DIR, settings["device"])
except MergeLensError as e:
    st.error(str(e))
    st.stop()
made_on = finished[key].get("suite_fingerprint") if kind == "done" else None
if kind != "done" or (ui.suite_is_built(config.suite) and made_on == ui.load_suite(config.suite).fingerprint):
    checkpoints = ui.load_suite(config.suite).checkpoint_family
else:  # a record made on other inputs: the family it recorded (a sweep made before sweeps recorded it: weights unknown)
    checkpoints = finished[key].get("checkpoints") or family_of({"suite": config.suite})
family = family_label(checkpoints)
st.caption(f"Checkpoints: **{family}** · {config.method} on {config.suite}; swept: {', '.join(f'{k} = {v}' for k, v in config.grid.items())}; seeds {list(config.seeds)}. "
           "Bands: ±1 std over seeds (per-task curves of a two-key sweep also spread over the other key).")


ui.save_to_url("abl-", skip=("abl-run", "abl-job"))
if done < total:
    st.write(f"{done} of {total} points computed.")
    sweep_job = SweepJob(config, settings["device"])
    if st.button("Run the sweep", type="primary", key="abl-run"):
        st.session_state["abl-job"] = ui.start_job(sweep_job)
    ui.job_panel(ui.attached_job(sweep_job) or st.session_state.get("abl-job"), "Sweep")

if frame.empty:
    st.stop()
axes, stem = config.axes, sweeps.sweep_id(config)
has_l1 = frame["l1"].notna().any()
for x in axes:
    st.subheader(f"Against {x}")
    for by in ["task"] + [a for a in axes if a != x]:
        show_curves(frame, x, by, "accuracy", stem)
        if has_l1:
            show_curves(frame, x, by, "l1", stem)
if len(axes) == 2:
    st.subheader(f"{axes[0]} × {axes[1]}")
    for metric in ["average"] + (["l1_average"] if has_l1 else []):
        heat = sweeps.grid_table(frame, axes[0], axes[1], metric)
        digits = 1 if metric == "average" else 3
        fig = px.imshow(heat.values, x=[str(c) for c in heat.columns], y=[str(i) for i in heat.index], text_auto=f".{digits}f",
                        labels=dict(x=axes[1], y=axes[0], color=metric), color_continuous_scale="Blues" if metric == "average" else "Reds", aspect="auto")
        fig.update_xaxes(type="category")  # swept values are categories (ranks, versions): one labelled cell each, not a numeric axis
        fig.update_yaxes(type="category")
        fig.update_layout(title=f"{metric} (mean over seeds)", height=380, margin=dict(t=50, b=10))
        ui.chart(fig, family)
        st.dataframe(heat.style.format(f"{{:.{digits}f}}"), width="stretch")
        ui.download_csv(heat, f"{stem}_{metric}_heatmap.csv", checkpoints=checkpoints)
with st.expander("All points (one row per point × task)"):
    st.dataframe(frame, width="stretch", hide_index=True)
    ui.download_csv(frame.set_index(axes + ["seed", "task"]), f"{stem}.csv", "Download the whole sweep", checkpoints=checkpoints)
