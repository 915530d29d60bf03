"""Tour: seven steps from one task vector to where methods fail, each a paragraph citing its paper above a figure
computed from this suite's cached runs; a live what-if (λ, TIES density) and a presenter view (issue #20)."""

import pandas as pd
import streamlit as st

import ui
import ui_tour
from merging.evaluation import accuracy_table
from merging.jobs import FeaturesRequest, RunsJob
from merging.methods import METHODS, get_method, method_group
from merging.runs import RunConfig
from merging.whatif import PROJECTION_LABEL, full_test_result, task_vector_sizes

STEPS = {1: "A task vector", 2: "Merging", 3: "The cost", 4: "Why: bias", 5: "Surgery", 6: "Other fixes", 7: "Where methods fail"}
TITLES = {**STEPS, 2: "Merging, live", 3: "The cost of one model for all tasks", 4: "Why: representation bias", 5: "Surgery pulls the features back",
          6: "Other fixes, side by side"}
BIAS_N, BIAS_PROJECTION = 300, "umap"  # steps 4-5 read the Representation-bias page's runs and features (each page fills the other's cache)

ui.restore_from_url("tour-")


def current_step() -> int:
    """The step in Session State as an int: the indicator's labels differ in the presenter view (a new widget), whose
    value can come back as its label, or not at all; then the step last shown."""
    raw = st.session_state.get("tour-step", st.session_state.get("_tour-step-shown", 1))
    try:
        chosen = int(str(raw).split()[0])
    except ValueError:
        chosen = st.session_state.get("_tour-step-shown", 1)
    return chosen if chosen in STEPS else 1


st.session_state["tour-step"] = current_step()
presenter = st.session_state.get("tour-presenter", False)
if presenter:
    ui_tour.presenter_css()
settings = ui.sidebar()  # drawn (hidden in presenter view) so the suite and preset stay the app's
name, preset, device = settings["suite"], settings["preset"], settings["device"]
suite = ui.require_suite(name)
family = ui.family(suite)  # every figure's subtitle: the checkpoints its numbers come from


def paper(method: str) -> str:
    m = get_method(method)
    return f"[{m.title.split(' (')[0]}]({m.paper_url})"


def go(delta: int) -> None:
    st.session_state["tour-step"] = min(max(current_step() + delta, 1), len(STEPS))


def prepared(configs: dict[str, RunConfig], key: str, what: str, features: FeaturesRequest | None = None, ready: bool | None = None) -> dict | None:
    """The cached results of ``configs``, or None after offering to compute the missing ones in a background job."""
    results = ui.cached_results(suite, configs, device)
    missing = [m for m, r in results.items() if r is None]
    if not missing and ready is not False:
        return results
    wanted = list(configs) if features is not None or not missing else missing  # features: every run's, the cached ones' too
    job = RunsJob(name, tuple(configs[m] for m in wanted), device, features)
    titles = ", ".join(METHODS[configs[m].method].title for m in missing) or "their features"
    st.info(f"This step's figure needs {what} that this suite's cache does not hold yet: {titles}. They run in the background "
            "(minutes on a CPU); the step fills in when they are done.")
    if st.button("Compute them now", type="primary", key=f"tourrun-{key}"):
        st.session_state[f"tourjob-{key}"] = ui.start_job(job)
    ui.job_panel(ui.attached_job(job) or st.session_state.get(f"tourjob-{key}"), f"Preparing step {step}")
    return None


# -- header: Back, the step indicator, Next, the presenter toggle --------------------------------------------------------------
step = st.session_state["tour-step"]
st.session_state["_tour-step-shown"] = step
if presenter:  # one row: Back, the step numbers, Next, the toggle; the step's title says where we are
    nav = st.columns([1.3, 6, 1.3, 2.2], vertical_alignment="center")
else:
    top = st.columns([5, 2], vertical_alignment="bottom")
    top[0].title("Tour", help="Why merged models lose accuracy, and what fixes it: seven steps on this suite's cached runs")
    top[0].caption(f"Why merged models lose accuracy, and what fixes it: seven steps on **{name}**, each figure computed from its runs.")
    nav = [*st.columns([1.4, 10, 1.4], vertical_alignment="center"), top[1]]
nav[0].button("← Back", key="tourbtn-back", on_click=go, args=(-1,), disabled=step == 1, width="stretch")
nav[1].radio("Step", list(STEPS), format_func=(lambda i: str(i)) if presenter else (lambda i: f"{i} {STEPS[i]}"), horizontal=True,
             key="tour-step", label_visibility="collapsed")
nav[2].button("Next →", key="tourbtn-next", on_click=go, args=(1,), disabled=step == len(STEPS), type="primary", width="stretch")
nav[3].toggle("Presenter view", key="tour-presenter", help="Hide the sidebar, enlarge text and markers, one figure per screen (1280x720)")
ui.save_to_url("tour-")
head = st.columns([3, 2], vertical_alignment="bottom") if step in (1, 2, 4, 5) else [st.container()]
head[0].subheader(f"Step {step} of {len(STEPS)} · {TITLES[step]}")
task_slot = head[-1] if len(head) > 1 else None

engine = ui_tour.whatif_engine(name)
refs = ui.cached_results(suite, {m: RunConfig(name, m) for m in ("pretrained", "individual", "task_arithmetic")}, device)
worst = max(engine.tasks, key=lambda t: engine.reference_accuracy["individual"][t] - engine.score("task_arithmetic", 0.3).accuracy[t])
if st.session_state.get("tour-task") not in engine.tasks:
    st.session_state["tour-task"] = worst


def task_picker() -> str:
    """The task of steps 1, 2, 4 and 5, beside the step's title (so the figure keeps the screen in the presenter view)."""
    return task_slot.selectbox("Task", engine.tasks, key="tour-task", label_visibility="collapsed",
                               help=f"Default: {worst}, the task the merge at λ = 0.3 hurts most on the subsample")


if step == 1:
    st.markdown(f"Fine-tuning the pretrained encoder θ₀ on one task gives θₜ. Their difference **τₜ = θₜ − θ₀ is a task vector** "
                f"({paper('task_arithmetic')}, Ilharco et al., ICLR 2023): a direction in weight space that carries the task. Adding it "
                "to θ₀ gives back the fine-tuned model; its size per layer shows where fine-tuning changed the network, and the "
                "bars on the right what adding it alone does to every task.")
    task = task_picker()
    sizes = task_vector_sizes(suite, task)
    added = engine.score_added(task)
    ui.chart(ui_tour.task_vector_figure(sizes, task, engine.reference_accuracy["pretrained"], added, engine.n, presenter), family,
             key="tour-fig-1")
    if refs["pretrained"] and refs["individual"]:
        st.caption(f"On the whole {task} test set (cached runs): pretrained {refs['pretrained']['accuracy'][task]:.1f} %, fine-tuned "
                   f"{refs['individual']['accuracy'][task]:.1f} %. The bars are on {engine.n} stratified test images per task.")

elif step == 2:
    st.markdown(f"**Merging** adds a fraction λ of the eight task vectors' sum: θ = θ₀ + λ Σₖ τₖ ({paper('task_arithmetic')}). "
                f"One model, one knob: move λ and every task's accuracy moves at once, and the merged model's features (red) move "
                f"against the individual model's (blue) and the pretrained one's (grey), which stay put. {paper('ties')} (Yadav et al., "
                "NeurIPS 2023) first keeps each vector's largest entries (the density) and only those that agree in sign.")

    task = task_picker()

    @st.fragment
    def whatif() -> None:
        c1, c2, c3 = st.columns([2, 3, 3])
        method = c1.radio("Merge", ["task_arithmetic", "ties"], format_func=lambda m: METHODS[m].title, key="tour-method", horizontal=True)
        scaling = c2.slider("Scaling coefficient λ", 0.0, 1.5, step=0.05, key="tour-lambda", **ui.initial("tour-lambda", value=0.3))
        density = c3.slider("TIES density", 0.05, 1.0, step=0.05, key="tour-density", disabled=method != "ties",
                            **ui.initial("tour-density", value=0.2))
        point = engine.score(method, scaling, density)
        knob = f"λ = {scaling:.2f}" + (f", density {density:.2f}" if method == "ties" else "")
        full = full_test_result(suite, name, method, scaling, density if method == "ties" else None, ui.CACHE_DIR, device)
        title = (f"{METHODS[method].title}, {knob}: average {point.average:.1f} % on the subsample"
                 + (f" · {full['average']:.1f} % on the full test set (cached run)" if full else ""))
        ui.chart(ui_tour.whatif_figure(engine, point, task, title, presenter), family, key="tour-fig-2")
        landed = (f"**Full test set** (cached run at this setting): average **{full['average']:.1f} %**, {task} {full['accuracy'][task]:.1f} %. "
                  if full else "No cached run at this setting: accuracy on the subsample only. ")
        st.caption(landed + f"Accuracy on {engine.n} stratified test images per task; {PROJECTION_LABEL}; mean L1 bias on {task}: "
                   f"{point.l1[task]:.3f}." + (f" Re-merged and scored in {point.seconds:.2f} s." if point.seconds else ""))

    whatif()

elif step == 3:
    st.markdown("**The cost.** At the λ = 0.3 that AdaMerging, Surgery and FusionBench use, one merged model replaces eight fine-tuned "
                "ones, and every task pays for it. On the whole test sets of this suite:")
    if refs["task_arithmetic"] and refs["individual"]:
        labels = {"task_arithmetic": "Task Arithmetic (λ = 0.3)", "individual": "Individual (fine-tuned per task)"}
        table = accuracy_table({labels[m]: refs[m]["accuracy"] for m in labels}, suite.tasks)
        ui.chart(ui_tour.cost_figure(table, labels["task_arithmetic"], labels["individual"], presenter), family, key="tour-fig-3")
        if not presenter:
            st.caption("Bars: accuracy on each task's full test set from the cached runs; the numbers above the red bars are the merge's "
                       "loss against the individual model, in points.")
    else:
        prepared({m: RunConfig(name, m) for m in ("individual", "task_arithmetic")}, "cost", "the baseline runs")

elif step in (4, 5):
    if step == 4:
        st.markdown(f"**Why?** Give the merged model and the task's individual model the same test images: the merged model's features "
                    f"land elsewhere. {paper('surgery')} (Yang et al., ICML 2024) calls this **representation bias** and measures it as "
                    "the mean L1 distance between the two models' final features. Each head was trained on its individual model's "
                    "features, so features that drift are misread.")
    else:
        st.markdown(f"**{paper('surgery')} pulls the features back.** A small per-task module after the merged encoder, trained on "
                    "unlabeled test images to minimise that same L1 distance, moves the merged features (green) onto the individual "
                    "model's (blue). The same projection as step 4, the same images:")
    configs = {"individual": RunConfig(name, "individual"), "merged": RunConfig(name, "task_arithmetic"),
               "merged + Surgery": RunConfig(name, "surgery", {"base": "task_arithmetic"}, preset=preset)}
    task = task_picker()
    ready = ui.bias_ready(name, configs, device, BIAS_N)
    if prepared(configs, "bias", "the individual, merged and Surgery runs and their features", FeaturesRequest(BIAS_N, True, BIAS_PROJECTION, task),
                ready) is not None:
        frame = ui.projected(name, configs, device, BIAS_N, task, BIAS_PROJECTION)
        metrics = ui.bias_metrics(name, configs, device, BIAS_N)
        final = metrics[(metrics["layer"] == "final") & (metrics["metric"] == "l1") & (metrics["model"] != "individual")]
        l1 = final.pivot_table(index="task", columns="model", values="value", sort=False).loc[suite.tasks]
        if step == 4:
            shown, cols = ("individual", "merged"), ["merged"]
            title = f"{task}: individual vs merged (Task Arithmetic, λ = 0.3); mean L1 {l1.loc[task, 'merged']:.3f}"
        else:
            shown, cols = ("individual", "merged + Surgery"), ["merged", "merged + Surgery"]
            drop = 100 * (1 - l1["merged + Surgery"] / l1["merged"])
            title = f"{task}: after Surgery, mean L1 {l1.loc[task, 'merged']:.3f} → {l1.loc[task, 'merged + Surgery']:.3f} (−{drop[task]:.0f} %)"
        fig = ui_tour.bias_figure(frame, l1[cols], task, shown, title, BIAS_PROJECTION.upper(), presenter)
        ui.chart(fig, family, key=f"tour-fig-{step}")
        note = frame.attrs.get("note", "")
        results = ui.cached_results(suite, configs, device)
        acc = {m: results[m]["accuracy"][task] for m in configs}
        if step == 4:
            st.caption(f"One {BIAS_PROJECTION.upper()} fit over the three models' features of {BIAS_N} {task} test images (steps 4 and 5 share it). "
                       f"Full test set: merged {acc['merged']:.1f} % vs individual {acc['individual']:.1f} % on {task}." + (f" {note}" if note else ""))
        else:
            st.caption(f"Surgery lowers the mean L1 bias on every task by {drop.min():.0f}-{drop.max():.0f} %; on {task} the full-test accuracy "
                       f"goes {acc['merged']:.1f} → {acc['merged + Surgery']:.1f} % (individual {acc['individual']:.1f} %).")

elif step == 6:
    fixes = [m for m in METHODS if method_group(m) == "data-dependent"]
    lane = [METHODS[m].title.split(" (")[0] for m in METHODS if method_group(m) == "storage lane (task id)"]
    st.markdown(f"**Other fixes.** {paper('adamerging')} learns λ per layer and task by minimising the heads' entropy on unlabeled test "
                f"images; {paper('wemoe')} turns the MLPs into a mixture of task vectors routed per input; {paper('tinting')} adds a "
                "per-task tint to one layer. Each buys accuracy with something: trainable parameters, unlabeled data, time. "
                f"Every data-dependent method in the registry is here ({len(fixes)})"
                + (f"; methods that store a part per task and need the task id ({', '.join(lane)}) are on Method comparison." if lane else "."))
    configs = {m: RunConfig(name, m, preset=preset if METHODS[m].presets else None) for m in ["task_arithmetic", *fixes, "individual"]}
    results = ui.cached_results(suite, configs, device)
    done = {m: r for m, r in results.items() if r is not None}
    if len(done) < len(configs):
        prepared(configs, "others", "runs")
    if len(done) >= 2:
        rows = pd.DataFrame({m: {"title": METHODS[m].title.split(" (")[0], "average": r["average"], "trainable": r["parameters"]["trainable"],
                                 "seconds": r["seconds"]["adapt"], "uses": {"data-dependent": "unlabeled images", "reference": "labels"}.get(
                                     method_group(m), "weights only")} for m, r in done.items()}).T
        rows[["average", "trainable", "seconds"]] = rows[["average", "trainable", "seconds"]].astype(float)
        ui.chart(ui_tour.fixes_figure(rows, presenter), family, key="tour-fig-6")
        if not presenter:
            st.caption(f"Full test sets, the {preset} preset, adaptation seconds on this machine ({device}). Trainable: what a method "
                       "learns on top of the merged model; Individual's 'labels' are the fine-tuning of T separate models.")

elif step == 7:
    st.markdown(f"**Where methods fail.** {paper('adamerging')} and {paper('wemoe')} both start from task arithmetic (λ = 0.3) and "
                "minimise the entropy of the heads' predictions on unlabeled test images, trusting that confident means right. "
                "Here is how far that trust carries on this suite:")
    analysis = {m: RunConfig(name, m, ui_tour.analysis_params(m), preset=preset) for m in ("adamerging", "wemoe")}
    results = ui.cached_results(suite, analysis, device)
    if None in results.values():  # the plain runs' objective (no accuracy along the way) while the analysis runs are missing
        plain = ui.cached_results(suite, {m: RunConfig(name, m, preset=preset) for m in analysis}, device)
        results = {m: results[m] or plain[m] for m in analysis}
    curves = {m: ui_tour.adaptation_curve(r) for m, r in results.items() if r is not None}
    if curves:
        finding = ui_tour.finding(curves)
        ui.chart(ui_tour.trajectory_figure(curves, presenter, finding["title"]), family, key="tour-fig-7")
        st.markdown(finding["text"])
        if not presenter:
            st.caption("Test accuracy along the way is recorded for analysis only (the runs' analysis_test_accuracy option reads test "
                       "labels); nothing was chosen by it. Objective: the summed entropy of the eight heads on one unlabeled batch per task.")
    if any(c.get("accuracy") is None for c in curves.values()) or len(curves) < len(analysis):
        prepared(analysis, "fail", "runs that record test accuracy along their adaptation")

if not presenter:
    st.caption("Every figure is computed from this suite's cached runs; the what-if (step 2) re-merges live. The pages in the sidebar "
               "hold the full views: Merge, Representation bias, Method comparison, Ablations.")
