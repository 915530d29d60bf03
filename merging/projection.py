"""Joint 2-D/3-D projections (PCA, t-SNE, UMAP) of several models' features, and an interactive HTML scatter.

The papers show representation bias as t-SNE of individual vs merged features (algorithms.md §2). The
views are only comparable when every feature set is embedded in ONE fit (anchors.md §6), so
``joint_projection`` stacks the sets, reduces to at most 50 dims with PCA before t-SNE/UMAP (the
standard speed-up), fits once, and returns one row per (model, sample). Results are cached by the
input feature-set keys, the method and its parameters.

Tiny inputs never end in a library traceback (``fit_embedding``): below what a method needs, its
parameters are lowered or it falls back (to PCA, or to UMAP's PCA start), and the result carries a
``note`` saying so, which ``joint_projection`` puts in ``DataFrame.attrs["note"]`` and the figures show
under their title. Fewer than 2 points is refused in one line.

umap-learn compiles with numba on first use (tens of seconds): ``NUMBA_CACHE_DIR`` defaults to the
project's ``cache/numba`` so the compiled code is reused across processes, umap is imported lazily,
and ``warm_up_in_background`` lets an app pay the compile cost while the user is still choosing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import numbers
import os
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from merging.errors import ConfigError, DataError
from merging.features import FINAL, Features, layer_name
from merging.io import atomic_write, read_cached, save_state_dict
from merging.progress import ProgressFn

log = logging.getLogger(__name__)
PROJECTIONS = ("pca", "tsne", "umap")
LABELS = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
PCA_DIMS = 50
PROJECTION_VERSION = "2"  # 2: small-N fallbacks, and the note stored with the coordinates
NUMBA_CACHE = Path(__file__).resolve().parents[1] / "cache" / "numba"
DEFAULTS: dict[str, dict[str, Any]] = {
    "pca": {},
    "tsne": {"perplexity": 30.0, "n_jobs": 1},
    "umap": {"n_neighbors": 15, "min_dist": 0.1},
}
MIN_POINTS = 2
"""Fewer points are refused: no projection of one point says anything."""
MIN_FIT_POINTS = {"pca": 2, "tsne": 4, "umap": 3}
"""Below these the method falls back to PCA: t-SNE needs perplexity >= 1, i.e. 3 neighbours (perplexity is
capped at (N-1)/3); umap-learn needs n_neighbors >= 2 (capped at N-1)."""
AXES = ("x", "y", "z")


@dataclass(frozen=True)
class Embedding:
    """Coordinates [N, dim] and why they are not the plain fit that was asked for ("" when they are)."""

    coords: np.ndarray
    note: str = ""


def import_umap():
    """Import umap-learn with numba's on-disk cache under ``cache/numba`` unless the user chose a folder."""
    if "umap" not in sys.modules and "NUMBA_CACHE_DIR" not in os.environ:
        NUMBA_CACHE.mkdir(parents=True, exist_ok=True)
        os.environ["NUMBA_CACHE_DIR"] = str(NUMBA_CACHE)
        if "numba" in sys.modules:  # numba reads its config at import; re-read it so the folder applies
            from numba.core import config

            config.reload_config()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import umap

    return umap


def warm_up(n: int = 200, dim: int = 2) -> float:
    """Run one small UMAP fit so numba compiles (or loads from its cache) now; returns the seconds it took."""
    t0 = time.perf_counter()
    x = np.random.default_rng(0).normal(size=(n, 8)).astype(np.float32)
    embed(x, "umap", dim=dim, seed=0)
    return time.perf_counter() - t0


def warm_up_in_background() -> threading.Thread:
    """Start ``warm_up`` on a daemon thread (e.g. when the app opens); join it or just let it finish."""
    thread = threading.Thread(target=warm_up, name="umap-warm-up", daemon=True)
    thread.start()
    return thread


def _check_method(method: str) -> None:
    if method not in PROJECTIONS:
        raise ConfigError(f"unknown projection {method!r}; available: {', '.join(PROJECTIONS)}")


def resolved_params(method: str, params: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The method's defaults overridden by ``params``; unknown names and out-of-range values are one-line errors."""
    _check_method(method)
    unknown = set(params or {}) - set(DEFAULTS[method])
    if unknown:
        allowed = ", ".join(DEFAULTS[method]) or "none"
        raise ConfigError(f"unknown parameter(s) {sorted(unknown)} for projection {method!r}; allowed: {allowed}")
    p = {**DEFAULTS[method], **(params or {})}
    checks = {  # what the libraries themselves accept (openTSNE, umap-learn with spread=1)
        "perplexity": (lambda v: v > 0, "a number > 0"),
        "n_jobs": (lambda v: v == int(v) and v != 0, "a non-zero integer (-1: all cores)"),
        "n_neighbors": (lambda v: v == int(v) and v >= 2, "an integer >= 2"),
        "min_dist": (lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    }
    for name, value in p.items():
        ok, wanted = checks[name]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(value):
            raise ConfigError(f"projection {method!r}: {name} must be {wanted}, got {value!r}")
    return p


def reduce_pca(x: np.ndarray, dims: int = PCA_DIMS, seed: int = 0) -> np.ndarray:
    """PCA to at most ``dims`` components (no-op when already that small)."""
    from sklearn.decomposition import PCA

    if x.shape[1] <= dims:
        return x
    return PCA(n_components=min(dims, len(x)), random_state=seed).fit_transform(x)


def _pca(x: np.ndarray, dim: int, seed: int) -> Embedding:
    """PCA to ``dim`` axes; N points span at most N-1 dims, so the axes beyond that are exactly 0 (and said)."""
    from sklearn.decomposition import PCA

    n, d = x.shape
    rank = min(n - 1, d)
    with np.errstate(divide="ignore", invalid="ignore"):  # explained-variance ratios of a variance that underflows to 0
        out = PCA(n_components=min(dim, rank), random_state=seed).fit_transform(x)
    out = np.pad(out, ((0, 0), (0, dim - out.shape[1])))
    if rank >= dim:
        return Embedding(out)
    flat = AXES[rank:dim]
    return Embedding(out, f"{n} points span at most {rank} dimension{'s' * (rank != 1)}: {', '.join(flat)} {'is' if len(flat) == 1 else 'are'} 0")


def _tsne(x: np.ndarray, dim: int, seed: int, p: Mapping[str, Any]) -> Embedding:
    """openTSNE with perplexity capped at (N-1)/3: it takes 3 x perplexity neighbours per point."""
    from openTSNE import TSNE

    n, d = x.shape
    notes = []
    perplexity = min(float(p["perplexity"]), (n - 1) / 3.0)
    if perplexity < float(p["perplexity"]):
        notes.append(f"perplexity lowered from {float(p['perplexity']):g} to {perplexity:.3g}: {n} points allow at most (N-1)/3")
    init = "pca"
    if d < dim:  # openTSNE's PCA start needs as many feature dims as output dims
        init = "random"
        notes.append(f"started from a random layout: the features have only {d} dimension{'s' * (d != 1)}")
    tsne = TSNE(
        n_components=dim,
        perplexity=perplexity,
        initialization=init,
        random_state=seed,
        n_jobs=int(p["n_jobs"]),
        negative_gradient_method="auto" if dim == 2 else "bh",  # auto: BH below 10k points, FFT above (2-D only)
        verbose=False,
    )
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):  # distances that underflow give NaN: fit_embedding falls back
        return Embedding(np.asarray(tsne.fit(x)), "; ".join(notes))


def _umap(x: np.ndarray, dim: int, seed: int, p: Mapping[str, Any]) -> Embedding:
    """umap-learn with n_neighbors capped at N-1, and umap's PCA start where its spectral one cannot run:
    the spectral start solves for dim+1 eigenvectors, which needs at least dim+2 points (scipy: ``k >= N``)."""
    umap = import_umap()
    n, d = x.shape
    notes = []
    n_neighbors = min(int(p["n_neighbors"]), n - 1)
    if n_neighbors < int(p["n_neighbors"]):
        notes.append(f"n_neighbors lowered from {int(p['n_neighbors'])} to {n_neighbors}: {n} points have at most N-1 neighbours")
    init = "spectral"
    if n < dim + 2:
        init = "pca" if dim <= min(n, d) else "random"
        start = "PCA" if init == "pca" else "a random layout"
        notes.append(f"started from {start}, not spectral: the spectral start needs at least {dim + 2} points")
    with warnings.catch_warnings(record=True) as caught:  # e.g. a disconnected kNN graph: umap still embeds every component
        warnings.simplefilter("always")
        reducer = umap.UMAP(
            n_components=dim,
            n_neighbors=n_neighbors,
            min_dist=float(p["min_dist"]),
            init=init,
            random_state=seed,
            transform_seed=seed,
        )
        out = np.asarray(reducer.fit_transform(x))
    for message in dict.fromkeys(str(w.message) for w in caught):
        log.info("umap: %s", message)
    return Embedding(out, "; ".join(notes))


def fit_embedding(x: np.ndarray, method: str = "umap", dim: int = 2, seed: int = 0, **params: Any) -> Embedding:
    """Project rows of ``x`` [N, d] to ``dim`` (2 or 3) dims, deterministic by ``seed``; any N >= 2 works.

    Small N (``MIN_FIT_POINTS``): t-SNE's perplexity is capped at (N-1)/3 and UMAP's n_neighbors at N-1;
    below 4 (t-SNE) or 3 (UMAP) points, or when the fit gives non-finite values, PCA draws them instead;
    identical rows are drawn at one spot. Each of these is said in ``Embedding.note``.
    """
    if dim not in (2, 3):
        raise ConfigError(f"projection dim must be 2 or 3, got {dim}")
    p = resolved_params(method, params)
    x = np.ascontiguousarray(x, dtype=np.float32)
    label = LABELS[method]
    if x.ndim != 2:
        raise DataError(f"cannot project features of shape {tuple(x.shape)} with {label}: expected [points, dimensions]")
    n = len(x)
    if n < MIN_POINTS:
        raise DataError(f"cannot project {n} point{'s' * (n != 1)} with {label} in {dim}-D: a projection needs at least "
                        f"{MIN_POINTS} points; pick more samples or models")
    if x.shape[1] == 0:
        raise DataError(f"cannot project {n} points with {label} in {dim}-D: the features have no dimensions")
    if not np.isfinite(x).all():
        raise DataError(f"cannot project {n} points with {label} in {dim}-D: the features hold NaN or Inf values")
    if not np.ptp(x, axis=0).any():  # t-SNE gives NaN and UMAP a random cloud for these
        return Embedding(np.zeros((n, dim), np.float32), f"all {n} points are identical: drawn at one spot")
    if method == "pca":
        return _pca(x, dim, seed)
    if n < MIN_FIT_POINTS[method]:
        need = "perplexity >= 1" if method == "tsne" else "n_neighbors >= 2"
        fallback = _pca(x, dim, seed)
        return Embedding(fallback.coords, "; ".join(filter(None, [
            f"{label} needs at least {MIN_FIT_POINTS[method]} points ({need}): drawn with PCA", fallback.note])))
    reduced = reduce_pca(x, PCA_DIMS, seed)
    fit = _tsne(reduced, dim, seed, p) if method == "tsne" else _umap(reduced, dim, seed, p)
    if not np.isfinite(fit.coords).all():  # e.g. near-identical rows whose distances underflow
        fallback = _pca(x, dim, seed)
        return Embedding(fallback.coords, "; ".join(filter(None, [f"{label} gave non-finite coordinates: drawn with PCA", fallback.note])))
    return fit


def embed(x: np.ndarray, method: str = "umap", dim: int = 2, seed: int = 0, **params: Any) -> np.ndarray:
    """``fit_embedding``'s coordinates [N, dim] (its note is dropped: use ``fit_embedding`` to show it)."""
    return fit_embedding(x, method, dim, seed, **params).coords


def projection_key(sets: Mapping[str, Features], layer: str, method: str, dim: int, seed: int, params: Mapping[str, Any]) -> str | None:
    """Hash of the input feature-set keys (in order) and the projection settings; None if a set is uncached."""
    keys = [fs.layer_key(layer) for fs in sets.values()]
    if not all(keys):
        return None
    blob = {"inputs": keys, "method": method, "dim": dim, "seed": seed, "params": dict(params), "version": PROJECTION_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


def _cache_reader(rows: int, dim: int):
    """Read a cached projection, raising (so ``read_cached`` drops it) unless it holds finite [rows, dim] coordinates."""

    def read(path: Path) -> Embedding:
        from safetensors import safe_open

        with safe_open(str(path), framework="np") as f:
            note = (f.metadata() or {}).get("note", "")
            coords = f.get_tensor("coords")
        if coords.shape != (rows, dim):
            raise ValueError(f"holds coordinates of shape {tuple(coords.shape)}, expected ({rows}, {dim})")
        if not np.isfinite(coords).all():
            raise ValueError("holds NaN or Inf coordinates")
        return Embedding(np.ascontiguousarray(coords, dtype=np.float32), note)

    return read


def joint_projection(
    sets: Mapping[str, Features],
    method: str = "umap",
    layer: str | int = FINAL,
    dim: int = 2,
    seed: int = 0,
    cache_dir: str | Path | None = None,
    progress: ProgressFn | None = None,
    **params: Any,
) -> pd.DataFrame:
    """One fit over every model's features of ``layer``; a row per (model, sample) in input order.

    Columns: x, y (z), model, task, sample, label, classname, prediction, predicted_classname, correct.
    ``attrs["note"]`` says why the layout is not the plain fit asked for (tiny N, see ``fit_embedding``), or "".
    A cached entry that is damaged or of the wrong shape is treated as missing: refitted, with one warning.
    """
    if not sets:
        raise ConfigError("nothing to project: give at least one feature set")
    if dim not in (2, 3):
        raise ConfigError(f"projection dim must be 2 or 3, got {dim}")
    layer = layer_name(layer)
    p = resolved_params(method, params)
    rows = sum(len(fs.indices) for fs in sets.values())
    key = projection_key(sets, layer, method, dim, seed, p) if cache_dir is not None else None
    path = Path(cache_dir) / "projections" / f"{key}.safetensors" if key else None
    fit = read_cached(path, _cache_reader(rows, dim), "projection cache") if path is not None else None
    if fit is None:
        if progress is not None:
            progress(0.0, f"{method}: fitting {rows} points")
        x = np.concatenate([fs.layer(layer).numpy() for fs in sets.values()])
        fit = fit_embedding(x, method, dim, seed, **p)
        fit = Embedding(np.ascontiguousarray(fit.coords, dtype=np.float32), fit.note)  # as cached: a hit equals a fit
        if path is not None:
            save_state_dict({"coords": torch.from_numpy(fit.coords)}, path, metadata={"note": fit.note})
    if fit.note:
        log.warning("note: %s %d-D of %d points: %s", LABELS[method], dim, rows, fit.note)
    frame = pd.concat([fs.frame(name) for name, fs in sets.items()], ignore_index=True)
    axes = pd.DataFrame(fit.coords, columns=list(AXES[:dim]))
    if progress is not None:
        progress(1.0, f"{method}: done")
    out = pd.concat([axes, frame], axis=1)
    out.attrs["note"] = fit.note
    return out


def figure_title(title: str, note: str = "") -> str:
    """``title`` with the projection's note (a small-N fallback) as a smaller second line, so the figure says it."""
    if not note:
        return title
    return f"{title}<br><sup>{note}</sup>" if title else f"<sup>{note}</sup>"


def scatter_figure(df: pd.DataFrame, color: str = "model", title: str = ""):
    """A plotly scatter (3-D if there is a ``z`` column), one facet per task, hover with sample/label/prediction.

    The title carries ``df.attrs["note"]`` (set by ``joint_projection``) when there is one.
    """
    import plotly.express as px

    if color not in df.columns:
        raise ConfigError(f"cannot colour by {color!r}; columns: {', '.join(df.columns)}")
    hover = ["model", "sample", "classname", "label", "predicted_classname", "prediction", "correct"]
    symbol = "classname" if color == "model" else "model"
    if df[symbol].nunique() > 8:  # plotly cycles through few symbols; beyond that they stop meaning anything
        symbol = None
    title = figure_title(title, df.attrs.get("note", ""))
    kw = {"color": color, "symbol": symbol, "hover_data": [h for h in hover if h in df.columns], "title": title}
    if "z" in df.columns:
        return px.scatter_3d(df, x="x", y="y", z="z", **kw)
    facet = "task" if "task" in df.columns and df["task"].nunique() > 1 else None
    fig = px.scatter(df, x="x", y="y", facet_col=facet, facet_col_wrap=3 if facet else 0, **kw)
    if facet:  # each task is its own fit: its axes mean nothing for the others
        fig.update_xaxes(matches=None, showticklabels=False).update_yaxes(matches=None, showticklabels=False)
    return fig.update_traces(marker={"size": 5, "opacity": 0.8})


def write_html(df: pd.DataFrame, path: str | Path, color: str = "model", title: str = "") -> Path:
    """A self-contained interactive HTML file (plotly.js inlined: opens offline)."""
    fig = scatter_figure(df, color, title)
    return atomic_write(path, lambda tmp: fig.write_html(tmp, include_plotlyjs=True, full_html=True))
