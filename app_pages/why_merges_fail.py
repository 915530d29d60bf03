"""Why merges fail: task-vector geometry, the λ plane of a task pair, adaptation trajectories, layer-by-layer similarity
and whether a pairwise metric predicts the pairwise merge. Every view is also ``python -m merging why VIEW``."""

import streamlit as st

import ui
import ui_why
from merging import trajectory as T
from merging import why_figures as F
from merging.jobs import FeaturesRequest, RunsJob
from merging.layer_similarity import layer_view
from merging.methods import METHODS, method_group
from merging.pair_metrics import METRICS, correlations
from merging.runs import RunConfig, cached_result

ui.restore_from_url("why-")
settings = ui.sidebar()
name, preset, device = settings["suite"], settings["preset"], settings["device"]
st.title("Why merges fail")
st.caption("Views from the 2023-2026 merging papers on *why* a merge loses accuracy: where task vectors overlap and conflict, how "
           "accuracy moves with the coefficients, what test-time adaptation optimises, where representations drift, and which "
           "pairwise measurements foretell a merge. Each tab is also a CLI command (`python -m merging why ...`, CSV and HTML).")
suite = ui.require_suite(name)
tasks, family = suite.tasks, ui.family(suite)
ADAPTIVE = [m for m in ("adamerging", "wemoe", "tinting", "surgery") if m in METHODS]
BASES = [m for m in ("task_arithmetic", "ties", "weight_averaging") if m in METHODS and method_group(m) == "data-free, one model"]


def keep(key: str, options: list) -> None:
    """Drop a widget's remembered value that is no longer among its options (another suite, task or run)."""
    if key in st.session_state and st.session_state[key] not in options:
        del st.session_state[key]


names = ["Trajectories", "Geometry", "λ plane", "Layer by layer", "Metric vs merge"]
tabs = dict(zip(names, st.tabs(names, key="why-tab", on_change="rerun"), strict=True))

if tabs["Trajectories"].open:
    with tabs["Trajectories"]:
        c1, c2 = st.columns([1, 2])
        method = c1.selectbox("Method", ADAPTIVE, format_func=lambda m: METHODS[m].title, key="why-traj-method")
        analysis = c2.toggle("Test accuracy along the run (analysis only: reads test labels)", key="why-traj-analysis",
                             help="Runs the method again with analysis_test_accuracy=true, which evaluates every task's labeled test set at the "
                                  "recorded points. Off by default; nothing is ever chosen by it.")
        config = RunConfig(name, method, {"analysis_test_accuracy": True} if analysis else {}, preset)
        result = cached_result(config, suite, ui.CACHE_DIR, device)
        if result is None:
            st.info(f"{METHODS[method].title} ({preset}) has not run with this code yet: it runs in a background job.")
            ui.job_panel(ui.start_job(RunsJob(name, (config,), device), automatic=True), f"Running {METHODS[method].title}")
            st.stop()
        objective = T.objective_frame(result)
        ui.chart(F.objective_figure(objective, f"{result['title']}: the objective it minimises and its parts (per task)"), family, run=result)
        accuracy = T.accuracy_frame(result)
        if accuracy is not None:
            ui.chart(F.accuracy_trajectory_figure(accuracy, "Test accuracy at the same points (analysis only: reads test labels)"), family, run=result)
        else:
            st.caption("Turn on the analysis option above to see test accuracy at the same points.")
        coefs = T.coefficients(result)
        if coefs is not None:
            steps, rows, ctasks, values = coefs
            keep("why-traj-step", steps)
            step = st.select_slider("Coefficients after update", steps, value=steps[-1], key="why-traj-step")
            ui.chart(F.coefficient_heatmap(rows, ctasks, values[steps.index(step)], step), family, run=result)
        ui.download_csv(objective, f"{name}_{method}_trajectory.csv", checkpoints=suite.checkpoint_family,
                        runs=dict.fromkeys(objective.index, result))

if tabs["Geometry"].open:
    with tabs["Geometry"]:
        g = ui_why.geometry(name)
        blocks = F.block_order(g.block_cosine["block"])
        c1, c2 = st.columns(2)
        ui.chart(F.cosine_heatmap(g.cosine, "Cosine of the task vectors, whole model"), family, c1)
        block = c2.select_slider("Block", blocks, key="why-geo-block")
        ui.chart(F.block_cosine_heatmap(g, block), family, c2)
        c1, c2 = st.columns(2)
        ui.chart(F.norms_figure(g), family, c1)
        ui.chart(F.tasks_per_weight_figure(g), family, c2)
        ui.chart(F.conflicts_figure(g), family)
        keys = list(dict.fromkeys(g.spectrum["key"]))
        key = st.selectbox("Matrix", keys, index=len(keys) - 1 if keys else 0, key="why-geo-key")
        c1, c2 = st.columns(2)
        ui.chart(F.spectrum_figure(g, key), family, c1)
        ui.chart(F.ranks_figure(g), family, c2)
        st.caption("Dotted: each task's update τₜ; solid: the merged update θ − θ₀ of task arithmetic (λ 0.3) and the SVD merges at their defaults. "
                   "Effective rank: exp of the entropy of σ/Σσ (Roy and Vetterli 2007).")

if tabs["λ plane"].open:
    with tabs["λ plane"]:
        if len(tasks) < 2:
            st.info(f"The λ plane needs two tasks; suite {name} has one.")
            st.stop()
        c1, c2 = st.columns(2)
        task_i = c1.selectbox("Task i", tasks, key="why-plane-i")
        keep("why-plane-j", [t for t in tasks if t != task_i])
        task_j = c2.selectbox("Task j", [t for t in tasks if t != task_i], key="why-plane-j")
        plane = ui_why.plane(name, task_i, task_j)
        for col, fig in zip(st.columns(3), F.plane_heatmaps(plane), strict=True):
            ui.chart(fig, family, col)
        best = plane.best()
        st.caption(f"θ₀ + λᵢτᵢ + λⱼτⱼ on an 11×11 grid, {ui_why.N} stratified test images per task. ✕: task arithmetic at 0.3; ★: the highest mean "
                   f"accuracy ({best[0]:g}, {best[1]:g}), a description of the plane, not a tuned choice. ξ counts the images whose prediction differs "
                   "from the task's own single-task model θ₀ + λₜτₜ (Ortiz-Jiménez et al. 2023).")
        ui.download_csv(plane.frame(), f"{name}_lambda_plane_{task_i}_{task_j}.csv", checkpoints=suite.checkpoint_family)

if tabs["Layer by layer"].open:
    with tabs["Layer by layer"]:
        c1, c2 = st.columns(2)
        base = c1.selectbox("Merge", BASES, format_func=lambda m: METHODS[m].title, key="why-layer-base")
        task = c2.selectbox("Task", tasks, key="why-layer-task")
        configs = {"individual": RunConfig(name, "individual"), "merged": RunConfig(name, base),
                   "merged + Surgery": RunConfig(name, "surgery", {"base": base}, preset=preset)}
        if not ui.bias_ready(name, configs, device, ui_why.N):
            st.info("The individual, merged and merged + Surgery runs and their per-block features run in a background job.")
            ui.job_panel(ui.start_job(RunsJob(name, tuple(configs.values()), device, FeaturesRequest(ui_why.N, True)), automatic=True), "Preparing")
            st.stop()
        profile, matrices = layer_view(ui.load_suite(name), base, task, ui_why.N, preset, cache_dir=ui.CACHE_DIR, device=device)
        c1, c2 = st.columns(2)
        ui.chart(F.profile_figure(profile, "cka", "CKA with the individual model (band: 25-75 % of resamples)"), family, c1)
        ui.chart(F.profile_figure(profile, "cosine", "Cosine with the individual model (band: 25-75 % of samples)"), family, c2)
        which = st.radio("Layer x layer CKA of", list(matrices), index=1, horizontal=True, key="why-layer-matrix")
        ui.chart(F.cka_matrix_heatmap(matrices[which], f"{which} (rows) x individual (columns), {task}"), family)
        ui.runs_caption(ui.cached_results(suite, configs, device))
        ui.download_csv(profile, f"{name}_{base}_{task}_layers.csv", checkpoints=suite.checkpoint_family)

if tabs["Metric vs merge"].open:
    with tabs["Metric vs merge"]:
        table = ui_why.pairs(name)
        r = correlations(table).set_index("metric")
        metric = st.radio("Metric", METRICS, horizontal=True, key="why-pairs-metric",
                          index=int(r["pearson_r"].abs().fillna(-1).to_numpy().argmax()))
        ui.chart(F.metric_scatter(table, metric, r.loc[metric, "pearson_r"], r.loc[metric, "spearman_r"]), family)
        st.dataframe(r.style.format("{:.3f}", subset=["pearson_r", "pearson_p", "spearman_r", "spearman_p"]), width="stretch")
        st.caption(f"Each point: one of the {len(table)} task pairs, merged by task arithmetic (λ 0.3) on its two tasks; its accuracy normalized by the "
                   "individual models. The metric shown first is the one with the largest |Pearson r|.")
        ui.download_csv(table, f"{name}_pairs.csv", checkpoints=suite.checkpoint_family)
ui.save_to_url("why-", skip=("why-traj-step",))
