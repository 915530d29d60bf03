"""Overview: build (first visit) or load the suite, and the per-task accuracy of the baselines."""

import streamlit as st

import ui
from merging.evaluation import accuracy_table
from merging.jobs import RunsJob
from merging.methods import BASELINES, get_method
from merging.runs import RunConfig

settings = ui.sidebar()
name = settings["suite"]
st.title("MergeLens")
st.markdown(
    "Several models fine-tuned from one pretrained ViT are merged into one multi-task model. Cheap merges lose "
    "accuracy because the merged model's features drift from each individual model's — **representation bias**. "
    "MergeLens runs the merges, measures the bias and compares the methods that remove it."
)

configs = {m: RunConfig(name, m) for m in BASELINES}
baseline_job = RunsJob(name, tuple(configs.values()), settings["device"])

if not ui.suite_is_built(name) or None in ui.cached_results(ui.load_suite(name), configs, settings["device"]).values():
    st.info(f"First visit: building the **{name}** suite (pretraining a tiny ViT and fine-tuning one copy per task) "
            "and running the baselines. This happens once; later visits load it from the cache.")
    ui.job_panel(ui.start_job(baseline_job, automatic=True), f"Preparing {name}")
    st.stop()

suite = ui.load_suite(name)
results = ui.cached_results(suite, configs, settings["device"])
table = accuracy_table({get_method(m).title: r["accuracy"] for m, r in results.items()}, suite.tasks)
info = suite.info.get("mirrors", {})
st.subheader(f"Baselines on {name}")
st.caption(f"{len(suite.tasks)} tasks: " + ", ".join(f"{t} ({info[t]}-like)" if t in info else t for t in suite.tasks)
           + f" · checkpoints **{ui.family(suite)}**")
cols = st.columns(4)
for col, m in zip(cols, ["pretrained", "task_arithmetic", "ties", "individual"], strict=True):
    col.metric(get_method(m).title, f"{results[m]['average']:.1f} %")
ui.accuracy_bars(table.drop(columns="avg"), ui.family(suite))
ui.accuracy_tabs(table, get_method("individual").title, f"{name}_baselines", suite=suite,
                 runs={get_method(m).title: r for m, r in results.items()})
