"""The Tour page's figures and cached engine (issue #20). Figures are plain plotly ``go`` built from library numbers;
``presenter`` scales fonts and markers for a room (1280x720). Nothing here computes more than the library returns."""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st
from plotly.subplots import make_subplots

import ui
from merging.device import default_device
from merging.methods import get_method, specs
from merging.whatif import DEFAULT_N, WhatIf, WhatIfPoint

ROLE_COLOURS = {"individual": ui.MODEL_COLOURS["individual"], "pretrained": "#9ca3af", "merged": ui.MODEL_COLOURS["merged"],
                "merged + Surgery": ui.MODEL_COLOURS["merged + Surgery"]}
"""The roles keep the Representation-bias page's colours: blue individual, red merged, green after Surgery, grey pretrained."""


def sizes(presenter: bool) -> dict:
    """Font size, marker size and figure height: the presenter's fit one figure on a 1280x720 screen."""
    return {"font": 18, "marker": 10, "height": 430, "title": 21} if presenter else {"font": 13, "marker": 6, "height": 470, "title": 16}


def styled(fig: go.Figure, title: str, presenter: bool, height: int | None = None) -> go.Figure:
    s = sizes(presenter)
    fig.update_layout(title=dict(text=title, font=dict(size=s["title"])), font=dict(size=s["font"]), height=height or s["height"],
                      margin=dict(t=70 if presenter else 60, b=10, l=10, r=10), legend_title=None, template="plotly_white")
    fig.update_annotations(font_size=s["font"])  # subplot titles
    fig.update_xaxes(tickfont_size=s["font"] - 2, title_font_size=s["font"])  # set explicitly: Streamlit's chart theme shrinks them
    fig.update_yaxes(tickfont_size=s["font"] - 2, title_font_size=s["font"])
    fig.update_layout(legend_font_size=s["font"] - 1, hoverlabel_font_size=s["font"])
    return fig


def whatif_engine(name: str) -> WhatIf:
    """The suite's what-if engine, built once per server (task vectors, subsample, fixed bases) and shared."""
    return _whatif_engine(name, ui.suite_fingerprint(name), DEFAULT_N)


@st.cache_resource(show_spinner="Preparing the live what-if: task vectors and 100 test images per task (a few seconds, once)...", max_entries=2)
def _whatif_engine(name: str, fingerprint: str, n: int) -> WhatIf:
    return WhatIf(ui.load_suite(name), n=n, device=default_device())


def task_vector_figure(sizes_table: pd.DataFrame, task: str, before: dict[str, float], after: WhatIfPoint, n: int, presenter: bool) -> go.Figure:
    """Left: ||tau_task|| per layer; right: every task's subsample accuracy of theta_0 and of theta_0 + tau_task."""
    fig = make_subplots(rows=1, cols=2, column_widths=[0.42, 0.58], horizontal_spacing=0.1,
                        subplot_titles=(f"size of τ_{task} per layer", f"accuracy on {n} test images per task"))
    fig.add_bar(x=sizes_table["layer"], y=sizes_table["norm"], marker_color=ROLE_COLOURS["merged"], showlegend=False, row=1, col=1,
                customdata=np.stack([sizes_table["relative"] * 100, sizes_table["parameters"]], axis=1),
                hovertemplate="%{x}: ‖τ‖ = %{y:.3f} (%{customdata[0]:.1f} % of ‖θ₀‖, %{customdata[1]:,} weights)<extra></extra>")
    tasks = list(after.accuracy)
    fig.add_bar(x=tasks, y=[before[t] for t in tasks], name="pretrained θ₀", marker_color=ROLE_COLOURS["pretrained"], row=1, col=2)
    fig.add_bar(x=tasks, y=[after.accuracy[t] for t in tasks], name=f"θ₀ + τ_{task}", row=1, col=2,
                marker_color=[ROLE_COLOURS["individual"] if t == task else "#93c5fd" for t in tasks])
    fig.update_yaxes(title_text="‖τ‖ (L2)", row=1, col=1)
    fig.update_yaxes(title_text="accuracy (%)", range=[0, 100], row=1, col=2)
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.18))
    gain = after.accuracy[task] - before[task]
    return styled(fig, f"Adding τ_{task} to θ₀: {task} {before[task]:.0f} → {after.accuracy[task]:.0f} % ({gain:+.0f})", presenter)


def whatif_figure(engine: WhatIf, point: WhatIfPoint, task: str, title: str, presenter: bool) -> go.Figure:
    """The live what-if: every task's subsample accuracy (bars; individual and pretrained as markers) and ``task``'s
    points in its fixed PCA basis (individual and pretrained stay put; the merge's points move)."""
    s = sizes(presenter)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.08,
                        subplot_titles=(f"accuracy, {engine.n} test images per task: merged (bars), individual / pretrained (—)",
                                        f"{task}: final features, PCA (fixed basis)"))
    tasks = engine.tasks
    fig.add_bar(x=tasks, y=[point.accuracy[t] for t in tasks], name="merged", marker_color=ROLE_COLOURS["merged"], row=1, col=1,
                text=[f"{point.accuracy[t]:.0f}" for t in tasks], textposition="inside", insidetextanchor="start")
    for model, symbol in (("individual", "line-ew"), ("pretrained", "line-ew")):
        fig.add_scatter(x=tasks, y=[engine.reference_accuracy[model][t] for t in tasks], mode="markers", name=model, row=1, col=1,
                        marker=dict(symbol=symbol, size=s["marker"] * 3, line=dict(width=4, color=ROLE_COLOURS[model]), color=ROLE_COLOURS[model]))
    frame = engine.frame(point, task)
    for model in ("pretrained", "individual", "merged"):
        rows = frame[frame["model"] == model]
        fig.add_scatter(x=rows["x"], y=rows["y"], mode="markers", name=model, showlegend=False, row=1, col=2,
                        marker=dict(size=s["marker"], color=ROLE_COLOURS[model], opacity=0.75 if model != "pretrained" else 0.45),
                        customdata=np.stack([rows["sample"], rows["classname"], rows["correct"]], axis=1),
                        hovertemplate=f"{model} · test image #%{{customdata[0]}} · %{{customdata[1]}} · correct: %{{customdata[2]}}<extra></extra>")
    fig.update_yaxes(title_text="accuracy (%)", range=[0, 100], row=1, col=1)
    fig.update_xaxes(showticklabels=False, row=1, col=2)
    fig.update_yaxes(showticklabels=False, row=1, col=2)
    fig.update_xaxes(tickangle=-30, row=1, col=1)
    fig.update_layout(showlegend=False, uirevision="whatif")
    return styled(fig, title, presenter, height=380 if presenter else None)


def cost_figure(table: pd.DataFrame, merged: str, individual: str, presenter: bool) -> go.Figure:
    """Per-task full-test accuracy of the merge against the individual models, with the gap written on each task."""
    tasks = [c for c in table.columns if c != "avg"]
    fig = go.Figure()
    fig.add_bar(x=tasks, y=table.loc[individual, tasks], name=individual, marker_color=ROLE_COLOURS["individual"])
    fig.add_bar(x=tasks, y=table.loc[merged, tasks], name=merged, marker_color=ROLE_COLOURS["merged"],
                text=[f"{table.loc[merged, t] - table.loc[individual, t]:+.0f}" for t in tasks], textposition="outside")
    fig.update_layout(barmode="group", yaxis=dict(title="accuracy (%), full test set", range=[0, 108]), legend=dict(orientation="h", y=-0.15))
    gap = table.loc[merged, "avg"] - table.loc[individual, "avg"]
    return styled(fig, f"One merged model vs eight individual ones: average {table.loc[merged, 'avg']:.1f} vs "
                       f"{table.loc[individual, 'avg']:.1f} % ({gap:+.1f})", presenter)


def bias_figure(frame: pd.DataFrame, l1: pd.DataFrame, task: str, shown: tuple[str, ...], title: str, projection: str, presenter: bool) -> go.Figure:
    """Left: ``task``'s joint projection of the ``shown`` models (one fit over all three, so two steps share the
    individual points); right: the mean L1 bias per task of each non-individual model in ``l1`` (task x model)."""
    s = sizes(presenter)
    fig = make_subplots(rows=1, cols=2, column_widths=[0.55, 0.45], horizontal_spacing=0.1,
                        subplot_titles=(f"{task}: {projection} of the final features", "mean L1 to the individual model, per task"))
    for model in shown:
        rows = frame[frame["model"] == model]
        fig.add_scatter(x=rows["x"], y=rows["y"], mode="markers", name=model, row=1, col=1,
                        marker=dict(size=s["marker"], color=ROLE_COLOURS.get(model), opacity=0.7),
                        customdata=np.stack([rows["sample"], rows["classname"], rows["correct"]], axis=1),
                        hovertemplate=f"{model} · test image #%{{customdata[0]}} · %{{customdata[1]}} · correct: %{{customdata[2]}}<extra></extra>")
    for model in l1.columns:
        fig.add_bar(x=list(l1.index), y=l1[model], name=f"{model} (L1)", marker_color=ROLE_COLOURS.get(model), row=1, col=2,
                    marker_line=dict(width=[3 if t == task else 0 for t in l1.index], color="black"))
    pad = lambda lo, hi: [lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo)]  # noqa: E731
    # the whole fit's extent (every model, shown or not): steps 4 and 5 draw the same view, so the individual points do not move
    fig.update_xaxes(showticklabels=False, range=pad(frame["x"].min(), frame["x"].max()), row=1, col=1)
    fig.update_yaxes(showticklabels=False, range=pad(frame["y"].min(), frame["y"].max()), row=1, col=1)
    fig.update_yaxes(title_text="mean L1", row=1, col=2)
    fig.update_layout(barmode="group", legend=dict(orientation="h", y=-0.15))
    return styled(fig, title, presenter)


def presenter_cost(fig: go.Figure, presenter: bool) -> go.Figure:
    """``ui.cost_figure`` (shared with Method comparison) with the tour's sizes."""
    s = sizes(presenter)
    fig.update_traces(marker_size=s["marker"] * 2, textfont_size=s["font"] - 2)
    return styled(fig, fig.layout.title.text, presenter)


def trajectory_figure(curves: dict[str, dict], presenter: bool, title: str) -> go.Figure:
    """Top: each method's training objective over its schedule (share of steps); bottom: its average test accuracy
    at the same moments where the run recorded it, else its final accuracy as one marker at the end."""
    s = sizes(presenter)
    fig = make_subplots(rows=2, cols=1, shared_xaxes=True, vertical_spacing=0.1,
                        subplot_titles=("objective the method minimises (entropy of the heads on unlabeled test images)",
                                        "average test accuracy (%)"))
    colours = ui.method_colours()
    for name, c in curves.items():
        colour = readable(colours.get(c["method"], "#6b7280"))
        fig.add_scatter(x=c["x"], y=c["objective"], mode="lines+markers", name=c["title"], legendgroup=name, row=1, col=1,
                        line=dict(color=colour, width=3), marker=dict(size=s["marker"]))
        if c.get("accuracy") is not None:
            fig.add_scatter(x=c["x_accuracy"], y=c["accuracy"], mode="lines+markers", name=c["title"], legendgroup=name, showlegend=False,
                            row=2, col=1, line=dict(color=colour, width=3, dash="dot"), marker=dict(size=s["marker"]))
        else:
            fig.add_scatter(x=[1.0], y=[c["final"]], mode="markers+text", name=c["title"], legendgroup=name, showlegend=False, row=2, col=1,
                            marker=dict(size=s["marker"] * 2, color=colour), text=[f"{c['final']:.1f}"], textposition="middle left")
    starts = [c["start"] for c in curves.values() if c.get("start") is not None]
    if starts:
        fig.add_hline(y=starts[0], line=dict(color="#6b7280", dash="dash"), row=2, col=1, annotation_text="start: task arithmetic, λ = 0.3",
                      annotation_position="bottom right")
    fig.update_xaxes(title_text="share of the adaptation schedule", tickformat=".0%", row=2, col=1)
    fig.update_layout(legend=dict(orientation="h", x=0.99, xanchor="right", y=0.99, yanchor="top", bgcolor="rgba(255,255,255,0.8)"))
    return styled(fig, title, presenter, height=(470 if presenter else 560))


def readable(colour: str) -> str:
    """``colour`` darkened until it reads on white (the palette's pastels, e.g. WEMoE's peach, vanish on a projector)."""
    r, g, b = (int(colour.lstrip("#")[i : i + 2], 16) for i in (0, 2, 4))
    lum = 0.2126 * r + 0.7152 * g + 0.0722 * b
    if lum <= 150:
        return colour
    k = 150 / lum
    return "#{:02x}{:02x}{:02x}".format(*(int(v * k) for v in (r, g, b)))


def presenter_css() -> None:
    """Presenter view: no sidebar or header, larger text, the page's width used (1280x720, the back of a room)."""
    st.markdown(
        """<style>
        [data-testid="stSidebar"], [data-testid="stSidebarCollapsedControl"], [data-testid="stExpandSidebarButton"],
        header[data-testid="stHeader"] {display: none !important;}
        [data-testid="stMainBlockContainer"], .block-container {padding-top: 0.8rem !important; padding-bottom: 0.5rem !important;
            max-width: 100% !important; padding-left: 2rem !important; padding-right: 2rem !important;}
        [data-testid="stMarkdownContainer"] p, [data-testid="stMarkdownContainer"] li {font-size: 1.2rem; line-height: 1.35;}
        [data-testid="stCaptionContainer"] {font-size: 1.05rem;}
        h1 {font-size: 1.9rem !important; padding: 0 !important;}
        [data-testid="stWidgetLabel"] p, [role="radiogroup"] label p, button p {font-size: 1.15rem !important;}
        </style>""",
        unsafe_allow_html=True,
    )


def analysis_params(method: str) -> dict:
    """``{"analysis_test_accuracy": True}`` where the method has that option (its trajectory then holds test accuracy), else {}."""
    return {"analysis_test_accuracy": True} if any(h.name == "analysis_test_accuracy" for h in specs(get_method(method))) else {}


def adaptation_curve(result: dict) -> dict:
    """A data-dependent run's objective over its schedule, and its average test accuracy where recorded.

    Reads ``info["trajectory"]`` (``step``, ``objective``, optionally ``test_accuracy`` {task: [...]}); older runs
    keep a loss curve in ``info["entropy"]`` (AdaMerging, every ``entropy_every`` steps) or ``info["loss"]`` (every
    ``log_every``). x is the share of the schedule (step / last step).
    """
    info = result.get("info", {})
    out = {"method": result["method"], "title": result["title"], "final": result["average"], "accuracy": None, "start": None}
    traj = info.get("trajectory")
    if traj and traj.get("step"):
        steps = traj["step"]
        last = max(steps[-1], 1)
        out.update(x=[s / last for s in steps], objective=list(traj["objective"]))
        acc = traj.get("test_accuracy")
        if isinstance(acc, dict) and acc:
            per_task = [acc[t] for t in result["tasks"] if t in acc]
            out.update(accuracy=[sum(v) / len(v) for v in zip(*per_task, strict=True)], x_accuracy=out["x"])
            out["start"] = out["accuracy"][0]
        return out
    curve = info.get("entropy") or info.get("loss") or []
    n = max(len(curve) - 1, 1)
    out.update(x=[i / n for i in range(len(curve))], objective=list(curve))
    return out


def finding(curves: dict[str, dict]) -> dict:
    """The step-7 finding in words, computed from the curves: where the objective kept falling while accuracy fell."""
    lines, worst = [], None
    for c in curves.values():
        obj = c["objective"]
        if c.get("accuracy"):
            acc = c["accuracy"]
            peak = max(range(len(acc)), key=lambda i: acc[i])
            fall = acc[peak] - acc[-1]
            lines.append(f"- **{c['title']}**: accuracy {acc[0]:.1f} → best {acc[peak]:.1f} % at {c['x_accuracy'][peak]:.0%} of its schedule → "
                         f"{acc[-1]:.1f} % at the end, while its objective went {obj[0]:.2f} → {obj[peak]:.2f} → {obj[-1]:.2f}.")
            if fall > 0 and obj[-1] < obj[peak] and (worst is None or fall > worst[1]):
                worst = (c, fall, peak)
        else:
            lines.append(f"- **{c['title']}**: objective {obj[0]:.2f} → {obj[-1]:.2f}; final accuracy {c['final']:.1f} % (full test set; "
                         "accuracy along the way not recorded in this run).")
    if worst is not None:
        c, fall, peak = worst
        title = (f"{c['title']}: the objective keeps falling ({c['objective'][peak]:.2f} → {c['objective'][-1]:.2f}) "
                 f"while accuracy falls {fall:.1f} points")
        text = (f"A lower objective is not a better model: after {c['x_accuracy'][peak]:.0%} of its schedule {c['title']} keeps making its "
                f"predictions more confident and loses {fall:.1f} points of average accuracy doing it.")
    else:
        ordered = sorted(curves.values(), key=lambda c: c["objective"][-1])
        low, high = ordered[0], ordered[-1]
        if len(ordered) > 1 and low["final"] < high["final"]:
            title = f"Lower entropy, lower accuracy: {low['title']} {low['objective'][-1]:.2f} / {low['final']:.1f} % vs {high['title']} {high['objective'][-1]:.2f} / {high['final']:.1f} %"
            text = (f"{low['title']} drives the shared objective lower than {high['title']} ({low['objective'][-1]:.2f} vs {high['objective'][-1]:.2f}) "
                    f"and ends with less accuracy ({low['final']:.1f} vs {high['final']:.1f} %): confident is not right.")
        else:
            title = "Objective and accuracy over the adaptation"
            text = "On this suite's runs the objective and the accuracy do not part ways: no failure to show here."
    return {"title": title, "text": "\n".join([text, "", *lines])}


def fixes_figure(rows: pd.DataFrame, presenter: bool) -> go.Figure:
    """One bar per method, average full-test accuracy, sorted, each labelled with what it adds (``rows``: index = method
    name; columns title, average, trainable, seconds, uses). Task arithmetic and Individual are the two ends."""
    s = sizes(presenter)
    rows = rows.sort_values("average")
    colours = ui.method_colours()

    def adds(r) -> str:
        if r.name in ("task_arithmetic", "individual"):
            return "the start: one merged model" if r.name == "task_arithmetic" else f"{r['uses']}: T fine-tuned models stored"
        return f"+{r['trainable']:,.0f} trainable · {r['seconds']:.0f} s · {r['uses']}"

    fig = go.Figure(go.Bar(
        y=[f"<b>{r['title']}</b><br>{adds(r)}" for _, r in rows.iterrows()], x=rows["average"], orientation="h",
        marker_color=[readable(colours.get(m, "#6b7280")) for m in rows.index], text=[f"{v:.1f} %" for v in rows["average"]],
        textposition="inside", insidetextanchor="end", textfont=dict(color="white", size=s["font"]), hoverinfo="x+y",
    ))  # fmt: skip
    low = float(rows["average"].min())
    fig.update_layout(xaxis=dict(title="average accuracy (%), full test sets", range=[max(0.0, low - 25), 100]), showlegend=False,
                      bargap=0.25)
    return styled(fig, "What each fix buys, and what it adds", presenter, height=max(s["height"], 60 + 52 * len(rows)) if not presenter else s["height"])
