"""Representation bias: a joint projection of individual vs merged vs merged+Surgery features, before/after
Surgery, the bias metrics per task, the per-layer bias curve, and the images behind selected points."""

import numpy as np
import plotly.express as px
import streamlit as st

import ui
from merging.methods import METHODS
from merging.runs import RunConfig

settings = ui.sidebar()
name, preset, device = settings["suite"], settings["preset"], settings["device"]
st.title("Representation bias")
st.caption("The merged model's features drift from each individual model's on the same images (Yang et al., 2024). "
           "One joint projection of all models' features per task keeps positions comparable; Surgery pulls the merged features back.")

BASES = [m for m in ("task_arithmetic", "ties", "weight_averaging", "adamerging") if m in METHODS]
c1, c2, c3, c4 = st.columns([2, 2, 2, 1])
base = c1.selectbox("Base merge", BASES, format_func=lambda m: METHODS[m].title, key="bias-base")
projection = c2.radio("Projection", ["umap", "tsne", "pca"], format_func=str.upper, horizontal=True, key="bias-proj")
view = c3.radio("Show", ["before Surgery", "after Surgery", "both"], horizontal=True, key="bias-view")
n = c4.number_input("Samples / task", 60, 1000, 300, step=60, key="bias-n")

configs = {
    "individual": RunConfig(name, "individual"),
    "merged": RunConfig(name, base, preset=preset if METHODS[base].presets else None),
    "merged + Surgery": RunConfig(name, "surgery", {"base": base}, preset=preset),
}
features_spec = {"n": int(n), "layers": True, "project": {"task": st.session_state.get("bias-task"), "method": projection}}
spec = {"kind": "runs", "suite": name, "device": device, "features": features_spec,
        "runs": [{"method": c.method, "params": c.params, "preset": c.preset} for c in configs.values()]}
ready = ui.suite_is_built(name) and ui.bias_ready(name, configs, device, int(n))
if not ready:
    st.info("Computing: the suite (first visit only), the three runs and their features run in a background job.")
    st.session_state["bias-job"] = ui.start_job(spec)

    @st.fragment(run_every=ui.POLL_SECONDS)
    def progress_panel() -> None:
        if ui.job_progress(st.session_state.get("bias-job"), "Preparing the bias view") == "done":
            st.rerun(scope="app")

    progress_panel()
    st.stop()

ui.warm_up_projections()  # only now: while the job runs, numba's compile would slow it (the job fits the first view itself)
suite = ui.load_suite(name)
task = st.selectbox("Task", suite.tasks, key="bias-task")
features = ui.bias_features(name, configs, device, int(n))
frame = ui.projected(name, configs, device, int(n), task, projection)
shown = {"before Surgery": ["individual", "merged"], "after Surgery": ["individual", "merged + Surgery"], "both": list(configs)}[view]
rows = frame[frame["model"].isin(shown)].reset_index(drop=True)
color = st.radio("Colour by", ["model", "class"], horizontal=True, key="bias-color")
fig = px.scatter(rows, x="x", y="y", color="model" if color == "model" else "classname", symbol=None if color == "model" else "model",
                 custom_data=["sample", "model"], hover_data=["classname", "predicted_classname", "correct"], height=620,
                 color_discrete_map={"individual": "#2563eb", "merged": "#dc2626", "merged + Surgery": "#16a34a"},
                 title=f"{task}: {projection.upper()} of the final features ({METHODS[base].title}, {view})")
fig.update_traces(marker={"size": 6, "opacity": 0.75})
fig.update_layout(dragmode="lasso", legend_title=None, xaxis_title=None, yaxis_title=None)
event = st.plotly_chart(fig, on_select="rerun", selection_mode=("box", "lasso"), key="bias-scatter", width="stretch")
ui.download_html(fig, f"{name}_{task}_{projection}_bias.html")

selected = sorted({int(p["customdata"][0]) for p in event.selection.points if p.get("customdata")}) if event and event.selection else []
if selected:
    st.markdown(f"**{len(selected)} selected test images** (true label, then each model's prediction)")
    data = suite.data[task]
    preds = {m: dict(zip(fs[task].indices.tolist(), fs[task].predictions.tolist(), strict=True)) for m, fs in features.items()}
    cols = st.columns(8)
    for i, s in enumerate(selected[:32]):
        img = np.kron(data.test_images[s].numpy(), np.ones((3, 3, 1), np.uint8))
        caption = f"#{s} {data.classnames[int(data.test_labels[s])]}\n" + "\n".join(
            f"{m[:10]}: {data.classnames[preds[m][s]]}{'' if preds[m][s] == int(data.test_labels[s]) else ' ✗'}" for m in configs)
        cols[i % 8].image(img, caption=caption)
    if len(selected) > 32:
        st.caption(f"showing the first 32 of {len(selected)}")
else:
    st.caption("Box- or lasso-select points to see their images with the true label and each model's prediction.")

st.subheader("Bias metrics (vs the individual model, final features)")
metrics = ui.bias_metrics(name, configs, device, int(n))
final = metrics[(metrics["layer"] == "final") & (metrics["model"] != "individual")]
table = final.pivot_table(index=["task", "model"], columns="metric", values="value", sort=False)
cols = [c for c in ("l1", "l2", "cosine", "cka", "knn_overlap", "accuracy") if c in table.columns]
st.dataframe(table[cols].style.format("{:.3f}"), width="stretch")
ui.download_csv(table[cols], f"{name}_bias_metrics.csv")
l1 = final[final["metric"] == "l1"].pivot_table(index="task", columns="model", values="value", sort=False)
if {"merged", "merged + Surgery"} <= set(l1.columns):
    drop = 100 * (1 - l1["merged + Surgery"] / l1["merged"])
    st.caption("Surgery lowers the mean L1 bias by " + ", ".join(f"{t} {d:.0f} %" for t, d in drop.items()))

st.subheader("Bias per layer")
layered = metrics[(metrics["metric"] == "l1") & (metrics["model"] != "individual") & (metrics["task"] == task)]
st.plotly_chart(px.line(layered, x="layer", y="value", color="model", markers=True, labels={"value": "mean L1 to individual"},
                        color_discrete_map={"merged": "#dc2626", "merged + Surgery": "#16a34a"}, title=f"{task}: mean L1 distance per block"),
                width="stretch")
