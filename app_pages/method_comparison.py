"""Method comparison: per-task accuracy of every method side by side (single merges, the storage lane, Surgery, FeatCal,
WEMoE, Model Tinting), accuracy against what each adds (storage, data, time) with the Pareto front, WEMoE's routing,
Tinting's confidence filter and the cross-task (encoder x head) matrix."""

import pandas as pd
import plotly.express as px
import streamlit as st

import ui
from merging import artifacts
from merging.evaluation import accuracy_table
from merging.jobs import RunsJob
from merging.methods import GROUPS, METHODS, method_group
from merging.runs import RunConfig

ui.restore_from_url("cmp-")
settings = ui.sidebar()
name, preset, device = settings["suite"], settings["preset"], settings["device"]
st.title("Method comparison")
suite = ui.require_suite(name)

available = ui.row_order(list(METHODS), by_name=True)
groups = {g: [m for m in available if method_group(m) == g] for g in GROUPS}
st.caption(" · ".join(f"**{g}**: {', '.join(METHODS[m].title.split(' (')[0] for m in ms)}" for g, ms in groups.items()))
if [m for m in st.session_state.get("cmp-methods", []) if m not in available]:
    del st.session_state["cmp-methods"]
picked = st.multiselect("Methods", available, format_func=lambda m: f"{METHODS[m].title} · {method_group(m)}", key="cmp-methods",
                        **ui.initial("cmp-methods", default=available))
ui.save_to_url("cmp-", skip=("cmp-run", "cmp-job"))
configs = {m: RunConfig(name, m, preset=preset if METHODS[m].presets else None) for m in picked}
results = ui.cached_results(suite, configs, device)
missing = [m for m, r in results.items() if r is None]


if missing:
    st.write(f"Not computed yet with the **{preset}** preset: {', '.join(METHODS[m].title for m in missing)}.")
    cmp_job = RunsJob(name, tuple(configs[m] for m in missing), device)
    if st.button("Run the missing methods", type="primary", key="cmp-run"):
        st.session_state["cmp-job"] = ui.start_job(cmp_job)
    ui.job_panel(ui.attached_job(cmp_job) or st.session_state.get("cmp-job"), "Running")

done = {m: r for m, r in results.items() if r is not None}
if not done:
    st.stop()
labels = {m: METHODS[m].title for m in done}
runs, family = {labels[m]: r for m, r in done.items()}, ui.family(suite)
table = accuracy_table({labels[m]: r["accuracy"] for m, r in done.items()}, suite.tasks)
ui.accuracy_bars(table.drop(columns="avg"), family, "Per-task accuracy, side by side")
(tab_cost,) = ui.accuracy_tabs(table, labels.get("individual"), f"{name}_{preset}_comparison", ["Accuracy vs cost"], suite=suite, runs=runs)
with tab_cost:
    cost = pd.DataFrame({labels[m]: {"average accuracy": r["average"], "extra storage (MB)": r["storage"]["extra_mb"],
                                     "unlabeled images used": r["data"]["images"], "adaptation seconds": r["seconds"]["adapt"],
                                     "trainable params": r["parameters"]["trainable"], "group": method_group(m),
                                     "data split": r["data"]["split"] or "none"} for m, r in done.items()}).T
    cost = cost.loc[ui.row_order(list(cost.index))]
    x = st.radio("Cost", ["extra storage (MB)", "unlabeled images used", "adaptation seconds", "trainable params"], horizontal=True, key="cmp-cost-x")
    ui.chart(ui.cost_figure(cost, x, cost["group"].to_dict()), family)
    st.caption("★ references · ● one merged model, no data · ■ storage lane: a per-task part chosen by the task id at inference "
               "(compression more than merging) · ◆ learns from unlabeled images. The dotted line is the Pareto front: no method "
               "left of it is more accurate. Extra storage is what a method stores beyond one merged model (Individual: the other "
               "T − 1 fine-tuned models); images are each method's unlabeled images (test-time adaptation: the test sets; FeatCal: "
               "a few train images per task).")
    st.dataframe(ui.settings_column(cost, runs).style.format({"average accuracy": "{:.1f}", "adaptation seconds": "{:.1f}", "extra storage (MB)": "{:.3f}",
                                    "unlabeled images used": "{:,.0f}", "trainable params": "{:,.0f}"}), width="stretch")
    ui.download_csv(cost, f"{name}_{preset}_cost.csv", checkpoints=suite.checkpoint_family, runs=runs)

# Lazy tabs (only the open one runs and is sent to the browser): a returning visitor waits for the charts they look at,
# not for every routing heatmap and matrix of the page (BENCHMARKS.md, "Cached views")
names = [n for n, present in (("WEMoE routing", "wemoe" in done), ("Model Tinting: the confidence filter", "tinting" in done),
                              ("Cross-task accuracy", True)) if present]
if st.session_state.get("cmp-detail") not in (None, *names):
    del st.session_state["cmp-detail"]
details = dict(zip(names, st.tabs(names, key="cmp-detail", on_change="rerun"), strict=True))
if "WEMoE routing" in details and details["WEMoE routing"].open:
    with details["WEMoE routing"]:
        st.subheader("WEMoE routing")
        routing = done["wemoe"]["info"]["routing"]
        blocks = done["wemoe"]["info"]["blocks"]
        own = pd.DataFrame({t: [routing[t][b][i] for b in range(len(blocks))] for i, t in enumerate(suite.tasks)}, index=[f"block {b}" for b in blocks]).T
        c1, c2 = st.columns(2)
        ui.chart(px.imshow(own, text_auto=".2f", color_continuous_scale="Viridis", aspect="auto", title="Weight of a task's own task vector, per block",
                           labels={"x": "MoE block", "y": "test images of task", "color": "r"}), family, c1, done["wemoe"])
        b = c2.selectbox("Block", range(len(blocks)), format_func=lambda i: f"block {blocks[i]}", key="cmp-block", **ui.initial("cmp-block", index=len(blocks) - 1))
        per_block = pd.DataFrame([routing[t][b] for t in suite.tasks], index=suite.tasks, columns=suite.tasks)
        ui.chart(px.imshow(per_block, text_auto=".2f", color_continuous_scale="Viridis", aspect="auto", title=f"Mean routing weight in block {blocks[b]}",
                           labels={"x": "expert task vector", "y": "test images of task", "color": "r"}), family, c2, done["wemoe"])
        task = st.selectbox("Per-sample routing for the test images of", suite.tasks, key="cmp-route-task")
        samples = ui.routing_samples(done["wemoe"], name, task)
        ui.chart(px.box(samples, x="expert", y="weight", color="block", points=False,
                        title=f"Routing weights of {len(samples['sample'].unique())} {task} test images"), family, run=done["wemoe"])

if "Model Tinting: the confidence filter" in details and details["Model Tinting: the confidence filter"].open:
    with details["Model Tinting: the confidence filter"]:
        st.subheader("Model Tinting: the confidence filter")
        kept = done["tinting"]["info"]["kept_fraction"]
        frame = pd.DataFrame(kept).reset_index(names="epoch").melt(id_vars="epoch", var_name="task", value_name="kept fraction")
        ui.chart(px.line(frame, x="epoch", y="kept fraction", color="task", title="Fraction of each batch kept by the filter, per epoch"), family,
                 run=done["tinting"])

if details["Cross-task accuracy"].open:
    with details["Cross-task accuracy"]:
        st.subheader("Cross-task accuracy (encoder of task i x head of task j)")
        if st.session_state.get("cmp-cross") not in (None, *done):
            del st.session_state["cmp-cross"]
        which = st.selectbox("Model", list(done), format_func=lambda m: labels[m], key="cmp-cross",
                             **ui.initial("cmp-cross", index=list(done).index(next((m for m in ("surgery", "wemoe") if m in done), list(done)[0]))))
        st.caption("Row i: the model as adapted for task i (its encoder, and its per-task modules if it has any), tested with the head "
                   "of task j. A method that keeps one shared encoder (every static merge; Model Tinting with its default head tint) "
                   "has identical rows.")
        if not artifacts.cross_task_cached(done[which], ui.CACHE_DIR):  # computed in the background, then only read
            st.info(f"Computing the cross-task matrix of {labels[which]} in the background (every encoder on every test set).")
            ui.job_panel(ui.start_job(RunsJob(name, (configs[which],), device, cross_task=True), automatic=True), "Cross-task matrix")
            st.stop()
        matrix = ui.cross_task(done[which], name)
        ui.chart(px.imshow(matrix, text_auto=".0f", color_continuous_scale="Blues", aspect="auto", title=f"{labels[which]}: encoder i x head j",
                           labels={"x": "head / test set j", "y": "encoder adapted for i", "color": "acc %"}), family, run=done[which])
        ui.download_csv(matrix, f"{name}_{which}_cross_task.csv", checkpoints=suite.checkpoint_family, runs={t: done[which] for t in matrix.index})
ui.save_to_url("cmp-", skip=("cmp-run", "cmp-job"))
