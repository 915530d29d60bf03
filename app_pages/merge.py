"""Merge: pick methods and hyperparameters (presets shown), run in the background, get the per-task table."""

import json

import pandas as pd
import streamlit as st

import ui
from merging.errors import ConfigError
from merging.evaluation import accuracy_table
from merging.jobs import RunsJob
from merging.methods import AUTO, METHODS, HyperparameterSpec, accepts_auto, make_params, method_group, params_dict, specs
from merging.provenance import program_report
from merging.runs import RunConfig

ui.restore_from_url("merge-")
settings = ui.sidebar()
name, preset, device = settings["suite"], settings["preset"], settings["device"]
st.title("Merge")
suite = ui.require_suite(name)

choices = [m for m in ui.row_order(list(METHODS), by_name=True) if method_group(m) != "reference"]
if [m for m in st.session_state.get("merge-methods", []) if m not in choices]:
    del st.session_state["merge-methods"]  # a link naming a method this version does not have
picked = st.multiselect("Methods", choices, format_func=lambda m: f"{METHODS[m].title} · {method_group(m)}", key="merge-methods",
                        **({} if "merge-methods" in st.session_state else {"default": [m for m in ("task_arithmetic", "ties") if m in choices]}))


def widget(h: HyperparameterSpec, value, key: str):
    """One input for one hyperparameter: its help text and allowed values from the method's dataclass."""
    label = f"{h.name} ({h.unit})" if h.unit and h.unit != h.name else h.name
    help_text = f"{h.help} Allowed: {h.allowed()}."
    restored = key in st.session_state  # from the URL or an earlier run: the widget takes it, no default beside it

    def initial(**kw) -> dict:
        return {} if restored else kw

    if h.type == "bool":
        return st.checkbox(label, key=key, help=help_text, **initial(value=bool(value)))
    if h.choices:
        options = list(h.choices)
        if restored and st.session_state[key] not in options:
            del st.session_state[key]
            restored = False
        return st.selectbox(label, options, key=key, help=help_text, **initial(index=options.index(value) if value in options else 0))
    if h.type in ("int", "float"):
        cast = int if h.type == "int" else float
        bounds = {"min_value": cast(h.low) if h.low is not None else None, "max_value": cast(h.high) if h.high is not None else None}
        if h.type == "int":
            return int(st.number_input(label, step=1, key=key, help=help_text, **bounds, **initial(value=int(value))))
        return float(st.number_input(label, format="%g", key=key, help=help_text, **bounds, **initial(value=float(value))))
    new = st.text_input(label, key=key, help=help_text, **initial(value="" if value is None else str(value)))
    return new if new != "" or value is not None else None


def param_widgets(method_name: str, prefix: str = "", used: str | None = None) -> dict:
    """One widget per hyperparameter, prefilled from the preset (or the default); returns the overrides.
    A field that holds another method's parameters (Surgery's base) gets that method's widgets, as ``base.KEY``."""
    method = METHODS[method_name]
    defaults = params_dict(make_params(method, preset=used))
    overrides: dict = {}
    for h in specs(method):
        key = f"{prefix}{method_name}-{h.name}-{used}"
        if h.params_of:
            try:
                base_input = method.inputs(make_params(method, overrides, used))[h.params_of]
            except ConfigError:
                continue  # the page's error line says what is wrong with the fields above
            base = METHODS[base_input.method]
            st.caption(f"**{base.title}** hyperparameters ({h.params_of}.KEY)")
            nested = param_widgets(base.name, f"{key}-", base_input.preset if base_input.preset in base.presets else None)
            overrides.update({f"{h.params_of}.{k}": v for k, v in nested.items()})
            continue
        if h.name == "scaling" and accepts_auto(method) and st.checkbox(
            "choose λ on the validation split", key=f"{key}-auto",
            help="Score every λ of the method's grid on each task's validation split (labels of val, never of test) and keep the best average; "
                 "the result records the grid, the accuracies and the choice (`--set scaling=auto` on the CLI).",
        ):
            overrides[h.name] = AUTO
            continue
        new = widget(h, defaults[h.name], key)
        if new != defaults[h.name]:
            overrides[h.name] = new
    return overrides


def method_config(method_name: str) -> RunConfig | None:
    """The run the widgets describe, or ``None`` with one ``st.error`` line when a value is not allowed."""
    method = METHODS[method_name]
    used = preset if preset in method.presets else None
    overrides = param_widgets(method_name, prefix="merge-p-", used=used)
    if used:
        st.caption(f"preset **{used}**: " + ", ".join(f"{k}={v}" for k, v in method.presets[used].items()))
    if method.paper_url:
        st.caption(f"[paper]({method.paper_url})")
    try:
        make_params(method, overrides, used, allow_auto=True)
    except ConfigError as e:
        st.error(str(e))
        return None
    return RunConfig(name, method_name, overrides, used)


configs = {"pretrained": RunConfig(name, "pretrained"), "individual": RunConfig(name, "individual")}
if picked:
    cols = st.columns(min(len(picked), 3))
    for i, m in enumerate(picked):
        with cols[i % len(cols)].expander(METHODS[m].title, expanded=True):
            config = method_config(m)
            if config is not None:
                configs[m] = config

ui.save_to_url("merge-", skip=("merge-run", "merge-job"))
results = ui.cached_results(suite, configs, device)
missing = [label for label, r in results.items() if r is None]

if missing:
    st.write(f"Not computed yet: {', '.join(METHODS[configs[m].method].title for m in missing)}.")
    job = RunsJob(name, tuple(configs[m] for m in missing), device)
    if st.button("Run", type="primary", key="merge-run"):
        st.session_state["merge-job"] = ui.start_job(job)
    ui.job_panel(ui.attached_job(job) or st.session_state.get("merge-job"), "Running")

done = {label: r for label, r in results.items() if r is not None}
if len(done) > 0:
    labels = {label: ui.run_label(r) for label, r in done.items()}
    table = accuracy_table({labels[k]: r["accuracy"] for k, r in done.items()}, suite.tasks)
    runs = {labels[k]: r for k, r in done.items()}
    ui.accuracy_bars(table.drop(columns="avg"), ui.family(suite))
    auto = {labels[k]: r for k, r in done.items() if "selection" in r}
    tab_cost, *tab_auto = ui.accuracy_tabs(table, labels.get("individual"), f"{name}_accuracy", ["Cost", *(["λ on validation"] if auto else [])],
                                           suite=suite, runs=runs)
    if auto:
        with tab_auto[0]:
            ui.chart(ui.selection_figure(auto), ui.family(suite))
            first = next(iter(auto.values()))["selection"]
            st.caption(f"Each λ of the grid was scored on {first['images']:,} validation images (their labels; never the test split's). "
                       f"Rule: {first['rule']}. The bars and tables above are the chosen model on the test split.")
    with tab_cost:
        cost = {labels[k]: {"trainable params": r["parameters"]["trainable"], "total params": r["parameters"]["total"],
                            "adapt s": round(r["seconds"]["adapt"], 2), "evaluate s": round(r["seconds"]["evaluate"], 2)} for k, r in done.items()}
        st.dataframe(ui.settings_column(pd.DataFrame(cost).T, runs), width="stretch")
    pick = st.selectbox("Export a run as FusionBench program_report.json", list(done), format_func=lambda k: labels[k], key="merge-export")
    st.caption(f"With a provenance block: checkpoints **{ui.family(suite)}** · {ui.settings_md(done[pick])}")
    st.download_button("Download report", json.dumps(program_report(done[pick]), indent=2), file_name=f"{pick}_program_report.json", mime="application/json")
