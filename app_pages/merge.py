"""Merge: pick methods and hyperparameters (presets shown), run in the background, get the per-task table."""

import dataclasses
import json
import typing

import streamlit as st

import ui
from merging.evaluation import accuracy_table
from merging.methods import METHODS, make_params, params_dict
from merging.runs import RunConfig, program_report

settings = ui.sidebar()
name, preset, device = settings["suite"], settings["preset"], settings["device"]
st.title("Merge")
suite = ui.require_suite(name)

choices = [m for m in METHODS if m not in ("pretrained", "individual")]
picked = st.multiselect("Methods", choices, default=[m for m in ("task_arithmetic", "ties") if m in choices],
                        format_func=lambda m: METHODS[m].title, key="merge-methods")


def param_widgets(method_name: str) -> dict:
    """One widget per hyperparameter, prefilled from the preset (or the default); returns the overrides."""
    method = METHODS[method_name]
    used = preset if preset in method.presets else None
    defaults = params_dict(make_params(method, preset=used))
    hints = typing.get_type_hints(method.Params)
    overrides = {}
    for f in dataclasses.fields(method.Params):
        key, value, kind = f"{method_name}-{f.name}-{used}", defaults[f.name], hints[f.name]
        if kind is bool:
            new = st.checkbox(f.name, value=value, key=key)
        elif kind is int:
            new = int(st.number_input(f.name, value=int(value), step=1, key=key))
        elif kind is float:
            new = float(st.number_input(f.name, value=float(value), format="%g", key=key))
        else:
            new = st.text_input(f.name, value="" if value is None else str(value), key=key)
            new = new if new != "" or value is not None else None
        if new != value:
            overrides[f.name] = new
    if used:
        st.caption(f"preset **{used}**: " + ", ".join(f"{k}={v}" for k, v in method.presets[used].items()))
    if method.paper_url:
        st.caption(f"[paper]({method.paper_url})")
    return overrides


configs = {"pretrained": RunConfig(name, "pretrained"), "individual": RunConfig(name, "individual")}
if picked:
    cols = st.columns(min(len(picked), 3))
    for i, m in enumerate(picked):
        with cols[i % len(cols)].expander(METHODS[m].title, expanded=True):
            configs[m] = RunConfig(name, m, param_widgets(m), preset if METHODS[m].presets else None)

results = ui.cached_results(suite, configs, device)
missing = [label for label, r in results.items() if r is None]
spec = {"kind": "runs", "suite": name, "device": device,
        "runs": [{"method": c.method, "params": c.params, "preset": c.preset} for label, c in configs.items() if label in missing]}


@st.fragment(run_every=ui.POLL_SECONDS)
def progress_panel() -> None:
    state = ui.job_progress(st.session_state.get("merge-job"), "Running")
    if state == "done":
        st.rerun(scope="app")


if missing:
    st.write(f"Not computed yet: {', '.join(METHODS[configs[m].method].title for m in missing)}.")
    if st.button("Run", type="primary", key="merge-run"):
        st.session_state["merge-job"] = ui.start_job(spec)
    progress_panel()

done = {label: r for label, r in results.items() if r is not None}
if len(done) > 0:
    labels = {label: ui.run_label(r) for label, r in done.items()}
    table = accuracy_table({labels[k]: r["accuracy"] for k, r in done.items()}, suite.tasks)
    ui.accuracy_bars(table.drop(columns="avg"))
    (tab_cost,) = ui.accuracy_tabs(table, labels.get("individual"), f"{name}_accuracy", ["Cost"])
    with tab_cost:
        cost = {labels[k]: {"trainable params": r["parameters"]["trainable"], "total params": r["parameters"]["total"],
                            "adapt s": round(r["seconds"]["adapt"], 2), "evaluate s": round(r["seconds"]["evaluate"], 2)} for k, r in done.items()}
        st.dataframe(cost, width="stretch")
    pick = st.selectbox("Export a run as FusionBench program_report.json", list(done), format_func=lambda k: labels[k], key="merge-export")
    st.download_button("Download report", json.dumps(program_report(done[pick]), indent=2), file_name=f"{pick}_program_report.json", mime="application/json")
