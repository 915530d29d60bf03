"""Representation bias: a joint projection of individual vs merged vs merged + Surgery vs merged + FeatCal features,
the bias metrics per task, the per-layer bias curve, the per-task bias of every fix grouped by base merge, and the
images behind selected points."""

import numpy as np
import streamlit as st

import ui
from merging.jobs import FeaturesRequest, RunsJob
from merging.methods import METHODS, method_group
from merging.runs import RunConfig

ui.restore_from_url("bias-")
settings = ui.sidebar()
name, preset, device = settings["suite"], settings["preset"], settings["device"]
st.title("Representation bias")
st.caption("The merged model's features drift from each individual model's on the same images (Yang et al., 2024). "
           "One joint projection of all models' features per task keeps positions comparable; Surgery pulls the merged features back "
           "with small per-task modules, FeatCal by recalibrating every layer's weights from a few unlabeled train images.")

BASES = list(dict.fromkeys(m for m in ("task_arithmetic", "ties", "weight_averaging", *METHODS) if method_group(m) == "data-free, one model"))
BASES += [m for m in ("adamerging",) if m in METHODS]  # a data-dependent base whose run Surgery reuses
PROJECTIONS = ["umap", "tsne", "pca"]
VIEWS = {"before": ["individual", "merged"], "after Surgery": ["individual", "merged + Surgery"],
         "after FeatCal": ["individual", "merged + FeatCal"], "all": ["individual", "merged", "merged + Surgery", "merged + FeatCal"]}
# The bias fixes the grouped chart compares on each base merge (ProbSurgery's per-task bias figure)
FIXES = {"": None, " + Surgery": ("surgery", {}), " + SurgeryV2": ("surgery", {"version": 2}), " + FeatCal": ("featcal", {})}
COLOURS = ["model", "class"]
controls = st.container()  # the widgets are drawn into it after the scatter, so that the browser starts loading Plotly first


def chosen(key: str, options: list):
    """A widget's value at the start of this run (Session State holds it before the widget is drawn); a value
    left over from another suite is dropped, so the widget falls back to its first option."""
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]
    return st.session_state.get(key, options[0])


def draw_controls(tasks: list[str] | None = None) -> None:
    with controls:
        c1, c2, c3, c4 = st.columns([2, 2, 2, 1])
        c1.selectbox("Base merge", BASES, format_func=lambda m: METHODS[m].title, key="bias-base")
        c2.radio("Projection", PROJECTIONS, format_func=str.upper, horizontal=True, key="bias-proj")
        c3.radio("Show", list(VIEWS), horizontal=True, key="bias-view")
        c4.number_input("Samples / task", 60, 1000, step=60, key="bias-n", **ui.initial("bias-n", value=300))
        if tasks:
            c5, c6 = st.columns([2, 5])
            c5.selectbox("Task", tasks, key="bias-task")
            c6.radio("Colour by", COLOURS, horizontal=True, key="bias-color")


base, projection, view = chosen("bias-base", BASES), chosen("bias-proj", PROJECTIONS), chosen("bias-view", list(VIEWS))
n = int(st.session_state.get("bias-n", 300))
configs = {
    "individual": RunConfig(name, "individual"),
    "merged": RunConfig(name, base, preset=preset if METHODS[base].presets else None),
    "merged + Surgery": RunConfig(name, "surgery", {"base": base}, preset=preset),
    "merged + FeatCal": RunConfig(name, "featcal", {"base": base}),
}
job = RunsJob(name, tuple(configs.values()), device, FeaturesRequest(n, True, projection, st.session_state.get("bias-task")))
ui.save_to_url("bias-", skip=("bias-scatter",))
ready = ui.suite_is_built(name) and ui.bias_ready(name, configs, device, n)
if not ready:
    draw_controls()
    st.info("Computing: the suite (first visit only), the three runs and their features run in a background job.")
    ui.job_panel(ui.start_job(job, automatic=True), "Preparing the bias view")
    st.stop()

suite = ui.load_suite(name)
family, runs = ui.family(suite), ui.cached_results(suite, configs, device)
task, color = chosen("bias-task", suite.tasks), chosen("bias-color", COLOURS)
# Lazy tabs (only the open one runs and is sent): a returning visitor's scatter is not kept waiting by the
# metrics table's and the per-layer chart's scripts in the browser (BENCHMARKS.md, "The dashboard")
tab_projection, tab_metrics, tab_layers, tab_fixes = st.tabs(["Projection", "Bias metrics", "Bias per layer", "Bias by fix"], key="bias-tab",
                                                            on_change="rerun")
if tab_projection.open:
    with tab_projection:
        fig = ui.bias_scatter(name, configs, device, n, task, projection, tuple(VIEWS[view]), color,
                              title=f"{task}: {projection.upper()} of the final features ({METHODS[base].title}, {view})")
        event = ui.chart(fig, family, on_select="rerun", selection_mode=("box", "lasso"), key="bias-scatter")
        ui.runs_caption(runs)
draw_controls(suite.tasks)
ui.warm_up_projections()  # only now: while the job runs, numba's compile would slow it (the job fits the first view itself)
metrics = ui.bias_metrics(name, configs, device, n)
final = metrics[(metrics["layer"] == "final") & (metrics["model"] != "individual")]
l1 = final[final["metric"] == "l1"].pivot_table(index="task", columns="model", values="value", sort=False)
drops = {fix: 100 * (1 - l1[f"merged + {fix}"] / l1["merged"]) for fix in ("Surgery", "FeatCal") if {"merged", f"merged + {fix}"} <= set(l1.columns)}


def surgery_summary() -> None:
    for fix, drop in drops.items():
        st.caption(f"{fix} changes the mean L1 bias of the final features by " + ", ".join(f"{t} {-d:+.0f} %" for t, d in drop.items()))


if tab_projection.open:
    with tab_projection:
        ui.download_html(fig, f"{name}_{task}_{projection}_bias.html")
        surgery_summary()
        selected = sorted({int(p["customdata"][0]) for p in event.selection.points if p.get("customdata")}) if event and event.selection else []
        if selected:
            st.markdown(f"**{len(selected)} selected test images** (true label, then each model's prediction; "
                        "colours here are roles: red the chosen base merge, green the same after Surgery, blue the individual model)")
            data, features = suite.data[task], ui.bias_features(name, configs, device, n)
            preds = {m: dict(zip(fs[task].indices.tolist(), fs[task].predictions.tolist(), strict=True)) for m, fs in features.items()}
            groups = ui.surgery_outcomes(selected, data.test_labels, preds)
            pick = st.radio("Images", list(groups), horizontal=True, key="bias-outcome",
                            format_func=lambda g: f"{g} ({len(groups[g])})")
            selected = groups[pick]
            if pick != "all":
                st.caption(f"showing the {len(selected)} {pick}")
            cols = st.columns(8)
            for i, s in enumerate(selected[:32]):
                img = np.kron(data.test_images[s].numpy(), np.ones((3, 3, 1), np.uint8))
                caption = f"#{s} **{data.classnames[int(data.test_labels[s])]}**  \n" + "  \n".join(
                    f"{m}: {data.classnames[preds[m][s]]}{'' if preds[m][s] == int(data.test_labels[s]) else ' ✗'}" for m in configs)
                cols[i % 8].image(img, caption=caption)
            if len(selected) > 32:
                st.caption(f"showing the first 32 of {len(selected)}")
        else:
            st.caption("Box- or lasso-select points to see their images with the true label and each model's prediction.")
if tab_metrics.open:
    with tab_metrics:
        st.markdown("**Every task's bias against the individual model, final features**")
        ui.provenance_caption(family, runs)
        ui.runs_caption(runs)
        surgery_summary()
        table = final.pivot_table(index=["task", "model"], columns="metric", values="value", sort=False)
        cols = [c for c in ("l1", "l2", "cosine", "cka", "knn_overlap", "accuracy") if c in table.columns]
        shown = table[cols].rename(columns={"accuracy": f"accuracy on the {n} sampled images (%)"})
        st.dataframe(shown.style.format("{:.3f}"), width="stretch")
        st.caption(f"Accuracy here is on the {n} stratified test images per task that the metrics use, not the whole test set "
                   "(the Overview and Method comparison pages give that).")
        ui.download_csv(shown, f"{name}_bias_metrics.csv", checkpoints=suite.checkpoint_family, runs=runs, key=lambda i: i[1])
if tab_layers.open:
    with tab_layers:
        layered = metrics[(metrics["metric"] == "l1") & (metrics["model"] != "individual") & (metrics["task"] == task)]
        ui.chart(ui.layer_figure(layered, f"{task}: mean L1 distance per block (vs the individual model)"), family)
        ui.runs_caption(runs)
        st.caption("Surgery (V1) acts on the final features only, so its blocks equal the base merge's; FeatCal recalibrates every "
                   "block, so its curve departs from the first block on.")
if tab_fixes.open:
    with tab_fixes:
        picked = st.multiselect("Base merges", BASES, format_func=lambda m: METHODS[m].title, key="bias-fix-bases",
                                **ui.initial("bias-fix-bases", default=[m for m in ("task_arithmetic", "ties") if m in BASES]))
        fix_configs = {"individual": RunConfig(name, "individual")}
        for b in picked:
            fix_configs[METHODS[b].title] = RunConfig(name, b, preset=preset if METHODS[b].presets else None)
            for suffix, spec in FIXES.items():
                if spec is not None:
                    fix_method, extra = spec
                    fix_configs[METHODS[b].title + suffix] = RunConfig(name, fix_method, {"base": b, **extra},
                                                                       preset=preset if METHODS[fix_method].presets else None)
        if picked and not ui.bias_ready(name, fix_configs, device, n):
            st.info(f"Computing {len(fix_configs) - 1} runs and their features in the background (SurgeryV2 re-runs the encoder "
                    "every step: the slowest of them).")
            ui.job_panel(ui.start_job(RunsJob(name, tuple(fix_configs.values()), device, FeaturesRequest(n, True)), automatic=True), "Bias by fix")
        elif picked:
            fixes = ui.bias_metrics(name, fix_configs, device, n)
            fixes = fixes[(fixes["layer"] == "final") & (fixes["metric"] == "l1") & (fixes["model"] != "individual")]
            ui.chart(ui.fix_bias_figure(fixes, [METHODS[b].title for b in picked], list(FIXES)), family)
            st.caption(f"Mean L1 distance of each task's final features to the individual model's, on the {n} sampled test images "
                       "per task; lower is less representation bias. Surgery and SurgeryV2 train on unlabeled test images, FeatCal "
                       "calibrates on unlabeled train images.")
            ui.download_csv(fixes.pivot_table(index="task", columns="model", values="value", sort=False), f"{name}_bias_by_fix.csv",
                            checkpoints=suite.checkpoint_family)
