"""Plotly figures of the "Why merges fail" views, shared by the page and the CLI's self-contained HTML (no Streamlit)."""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import plotly.graph_objects as go

from merging.geometry import Geometry
from merging.io import atomic_write
from merging.lambda_plane import TA_POINT, LambdaPlane

BAND = "rgba(99, 110, 250, 0.18)"


def write_html(figures: Sequence[go.Figure], path: str | Path, title: str) -> Path:
    """One self-contained HTML file (plotly.js inlined once) with every figure under a heading."""
    parts = [fig.to_html(full_html=False, include_plotlyjs=(i == 0)) for i, fig in enumerate(figures)]
    page = f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title></head><body><h2>{html.escape(title)}</h2>{''.join(parts)}</body></html>"
    return atomic_write(path, lambda tmp: Path(tmp).write_text(page, encoding="utf-8"))


# view 1: geometry
def block_order(blocks) -> list[str]:
    """``embedding``, ``block0``, ``block1``, ..., ``output``: the order of the forward pass."""
    rank = {"embedding": -1, "output": 10**6}
    return sorted(dict.fromkeys(blocks), key=lambda b: rank.get(b, int(b[len("block"):]) if b[len("block"):].isdigit() else 10**5))


def cosine_heatmap(matrix: pd.DataFrame, title: str) -> go.Figure:
    return px.imshow(matrix, text_auto=".2f", zmin=-1, zmax=1, color_continuous_scale="RdBu_r", aspect="auto", title=title,
                     labels={"x": "task vector", "y": "task vector", "color": "cosine"})


def block_cosine_heatmap(geometry: Geometry, block: str) -> go.Figure:
    sub = geometry.block_cosine[geometry.block_cosine["block"] == block]
    matrix = sub.pivot(index="task_a", columns="task_b", values="cosine").loc[geometry.tasks, geometry.tasks]
    return cosine_heatmap(matrix, f"Cosine of the task vectors, {block} only")


def norms_figure(geometry: Geometry) -> go.Figure:
    per_block = geometry.norms.assign(sq=geometry.norms["norm"] ** 2).groupby(["block", "task"], sort=False)["sq"].sum().pow(0.5).reset_index()
    order = {b: i for i, b in enumerate(block_order(per_block["block"]))}
    per_block = per_block.sort_values("block", key=lambda b: b.map(order), kind="stable")
    return px.line(per_block, x="block", y="sq", color="task", markers=True, title="‖τ‖ per block (Frobenius norm over the block's tensors)",
                   labels={"sq": "‖τ‖", "block": ""})


def conflicts_figure(geometry: Geometry) -> go.Figure:
    order = {b: i for i, b in enumerate(block_order(geometry.conflicts["block"]))}
    c = geometry.conflicts.assign(tensor=geometry.conflicts["key"].str.replace("transformer.resblocks.", "", regex=False),
                                  order=geometry.conflicts["block"].map(order)).sort_values("order", kind="stable")
    return px.bar(c, x="tensor", y="conflict", color="block", title="Fraction of entries where the task vectors disagree in sign, per tensor",
                  labels={"conflict": "sign-conflict fraction", "tensor": ""})


def tasks_per_weight_figure(geometry: Geometry) -> go.Figure:
    return px.bar(geometry.tasks_per_weight, x="tasks", y="fraction", color="rule", barmode="group",
                  title="Tasks keeping each weight after TIES / TALL masking",
                  labels={"tasks": "tasks keeping the weight", "fraction": "fraction of all weights"})


def spectrum_figure(geometry: Geometry, key: str) -> go.Figure:
    s = geometry.spectrum[geometry.spectrum["key"] == key]
    ranks = geometry.ranks[geometry.ranks["key"] == key].set_index("model")["effective_rank"]
    s = s.assign(model=s["model"].map(lambda m: f"{m} (eff. rank {ranks[m]:.1f})"))
    tasks = set(geometry.tasks)
    fig = px.line(s, x="index", y="sigma", color="model", log_y=True, title=f"Singular values of each update of {key}",
                  labels={"index": "i", "sigma": "σᵢ"})
    for trace in fig.data:
        if trace.name.split(" (")[0] in tasks:
            trace.line.dash = "dot"
        else:
            trace.line.width = 3
    return fig


def ranks_figure(geometry: Geometry) -> go.Figure:
    r = geometry.ranks.assign(kind=np.where(geometry.ranks["model"].isin(geometry.tasks), "task", geometry.ranks["model"]))
    mean = r.groupby(["key", "kind"], sort=False)["effective_rank"].mean().reset_index()
    mean["tensor"] = mean["key"].str.replace("transformer.resblocks.", "", regex=False)
    return px.line(mean, x="tensor", y="effective_rank", color="kind", markers=True, title="Effective rank per matrix (task: mean over the tasks)",
                   labels={"effective_rank": "effective rank", "tensor": ""})


# view 2: the λ plane
def plane_heatmaps(plane: LambdaPlane) -> list[go.Figure]:
    i, j = plane.tasks
    best = plane.best()
    figs = []
    for values, title, scale in ((plane.accuracy[i], f"accuracy on {i} (%)", "Viridis"), (plane.accuracy[j], f"accuracy on {j} (%)", "Viridis"),
                                 (plane.disentanglement_error, "disentanglement error ξ = ξᵢ + ξⱼ", "Magma_r")):
        fig = go.Figure(go.Heatmap(z=values.T, x=plane.grid, y=plane.grid, colorscale=scale, colorbar={"title": ""},
                                   hovertemplate="λ " + i + " %{x}<br>λ " + j + " %{y}<br>%{z:.2f}<extra></extra>"))
        fig.add_trace(go.Scatter(x=[TA_POINT], y=[TA_POINT], mode="markers+text", text=["TA 0.3"], textposition="top right",
                                 marker={"symbol": "x", "size": 12, "color": "white", "line": {"width": 1, "color": "black"}}, name="TA (0.3, 0.3)"))
        fig.add_trace(go.Scatter(x=[best[0]], y=[best[1]], mode="markers+text", text=["best"], textposition="bottom left",
                                 marker={"symbol": "star", "size": 14, "color": "gold", "line": {"width": 1, "color": "black"}},
                                 name="highest mean accuracy"))
        fig.update_layout(title=title, xaxis_title=f"λ {i}", yaxis_title=f"λ {j}", showlegend=False, height=420)
        figs.append(fig)
    return figs


# view 3: trajectories
def _emphasised(fig: go.Figure, name: str, dash_others: bool) -> go.Figure:
    """The trace ``name`` drawn thick (the sum or mean), the others its parts (dotted when ``dash_others``)."""
    for trace in fig.data:
        if trace.name == name:
            trace.line.width = 4
        elif dash_others:
            trace.line.dash = "dot"
    return fig


def objective_figure(frame: pd.DataFrame, title: str) -> go.Figure:
    fig = px.line(frame, x="step", y="value", color="series", markers=True, title=title, labels={"value": "", "step": "update"})
    return _emphasised(fig, "objective", dash_others=True)


def accuracy_trajectory_figure(frame: pd.DataFrame, title: str) -> go.Figure:
    fig = px.line(frame, x="step", y="accuracy", color="task", markers=True, title=title, labels={"accuracy": "test accuracy (%)", "step": "update"})
    return _emphasised(fig, "average", dash_others=False)


def coefficient_heatmap(rows: Sequence[str], tasks: Sequence[str], values: np.ndarray, step: int) -> go.Figure:
    short = [r.replace("transformer.resblocks.", "") for r in rows]
    fig = px.imshow(values, x=list(tasks), y=short, zmin=0, zmax=1, color_continuous_scale="Viridis", aspect="auto",
                    title=f"Learned coefficients λ after {step} updates", labels={"x": "task", "y": "tensor", "color": "λ"})
    fig.update_layout(height=max(400, 14 * len(rows)))
    return fig


# view 4: layer by layer
def profile_figure(profile: pd.DataFrame, metric: str, title: str) -> go.Figure:
    fig = go.Figure()
    colours = px.colors.qualitative.Plotly
    for k, (model, sub) in enumerate(profile[profile["metric"] == metric].groupby("model", sort=False)):
        c = colours[k % len(colours)]
        fig.add_trace(go.Scatter(x=list(sub["layer"]) + list(sub["layer"])[::-1], y=list(sub["q75"]) + list(sub["q25"])[::-1], fill="toself",
                                 fillcolor=c, opacity=0.2, line={"width": 0}, hoverinfo="skip", showlegend=False))
        fig.add_trace(go.Scatter(x=sub["layer"], y=sub["value"], mode="lines+markers", name=model, line={"color": c, "width": 3}))
    fig.update_layout(title=title, xaxis_title="layer", yaxis_title=metric)
    return fig


def cka_matrix_heatmap(matrix: pd.DataFrame, title: str) -> go.Figure:
    return px.imshow(matrix, text_auto=".2f", zmin=0, zmax=1, color_continuous_scale="Viridis", aspect="auto", title=title,
                     labels={"x": "individual model's layer", "y": "layer", "color": "CKA"})


# view 5: metric vs merge
def metric_scatter(table: pd.DataFrame, metric: str, pearson: float, spearman: float) -> go.Figure:
    fig = px.scatter(table, x=metric, y="normalized_accuracy", hover_name="pair", trendline=None,
                     title=f"{metric} vs the pairwise merge: Pearson r = {pearson:.2f}, Spearman r = {spearman:.2f} ({len(table)} pairs)",
                     labels={"normalized_accuracy": "normalized accuracy of the pair's TA merge (%)"})
    fig.update_traces(marker={"size": 11})
    return fig
