"""Joint 2-D/3-D projections (PCA, t-SNE, UMAP) of several models' features, and an interactive HTML scatter.

The papers show representation bias as t-SNE of individual vs merged features (algorithms.md §2). The
views are only comparable when every feature set is embedded in ONE fit (anchors.md §6), so
``joint_projection`` stacks the sets, reduces to at most 50 dims with PCA before t-SNE/UMAP (the
standard speed-up), fits once, and returns one row per (model, sample). Results are cached by the
input feature-set keys, the method and its parameters.

umap-learn compiles with numba on first use (tens of seconds): ``NUMBA_CACHE_DIR`` defaults to the
project's ``cache/numba`` so the compiled code is reused across processes, umap is imported lazily,
and ``warm_up_in_background`` lets an app pay the compile cost while the user is still choosing.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import threading
import time
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from merging.errors import ConfigError, DataError
from merging.features import FINAL, Features, layer_name
from merging.io import atomic_write, load_state_dict, save_state_dict
from merging.progress import ProgressFn

log = logging.getLogger(__name__)
PROJECTIONS = ("pca", "tsne", "umap")
PCA_DIMS = 50
PROJECTION_VERSION = "1"
NUMBA_CACHE = Path(__file__).resolve().parents[1] / "cache" / "numba"
DEFAULTS: dict[str, dict[str, Any]] = {
    "pca": {},
    "tsne": {"perplexity": 30.0, "n_jobs": 1},
    "umap": {"n_neighbors": 15, "min_dist": 0.1},
}


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
    _check_method(method)
    unknown = set(params or {}) - set(DEFAULTS[method])
    if unknown:
        allowed = ", ".join(DEFAULTS[method]) or "none"
        raise ConfigError(f"unknown parameter(s) {sorted(unknown)} for projection {method!r}; allowed: {allowed}")
    return {**DEFAULTS[method], **(params or {})}


def reduce_pca(x: np.ndarray, dims: int = PCA_DIMS, seed: int = 0) -> np.ndarray:
    """PCA to at most ``dims`` components (no-op when already that small)."""
    from sklearn.decomposition import PCA

    if x.shape[1] <= dims:
        return x
    return PCA(n_components=min(dims, len(x)), random_state=seed).fit_transform(x)


def embed(x: np.ndarray, method: str = "umap", dim: int = 2, seed: int = 0, **params: Any) -> np.ndarray:
    """Project rows of ``x`` [N, d] to ``dim`` (2 or 3) dims; deterministic by ``seed``.

    Small N is handled by clipping t-SNE's perplexity to (N-1)/3 and UMAP's n_neighbors to N-1.
    """
    if dim not in (2, 3):
        raise ConfigError(f"projection dim must be 2 or 3, got {dim}")
    p = resolved_params(method, params)
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = len(x)
    if n < 4:
        raise DataError(f"need at least 4 points to project, got {n}")
    if not np.isfinite(x).all():
        raise DataError("features hold NaN or Inf values; cannot project them")
    if method == "pca":
        from sklearn.decomposition import PCA

        out = PCA(n_components=min(dim, *x.shape), random_state=seed).fit_transform(x)
        return np.pad(out, ((0, 0), (0, dim - out.shape[1])))
    x = reduce_pca(x, PCA_DIMS, seed)
    if method == "tsne":
        from openTSNE import TSNE

        tsne = TSNE(
            n_components=dim,
            perplexity=min(float(p["perplexity"]), (n - 1) / 3.0),
            random_state=seed,
            n_jobs=int(p["n_jobs"]),
            negative_gradient_method="auto" if dim == 2 else "bh",  # auto: BH below 10k points, FFT above (2-D only)
            verbose=False,
        )
        return np.asarray(tsne.fit(x))
    umap = import_umap()
    with warnings.catch_warnings(record=True) as caught:  # e.g. a disconnected kNN graph: umap still embeds every component
        warnings.simplefilter("always")
        reducer = umap.UMAP(
            n_components=dim,
            n_neighbors=max(2, min(int(p["n_neighbors"]), n - 1)),
            min_dist=float(p["min_dist"]),
            random_state=seed,
            transform_seed=seed,
        )
        out = np.asarray(reducer.fit_transform(x))
    for message in dict.fromkeys(str(w.message) for w in caught):
        log.info("umap: %s", message)
    return out


def projection_key(sets: Mapping[str, Features], layer: str, method: str, dim: int, seed: int, params: Mapping[str, Any]) -> str | None:
    """Hash of the input feature-set keys (in order) and the projection settings; None if a set is uncached."""
    keys = [fs.layer_key(layer) for fs in sets.values()]
    if not all(keys):
        return None
    blob = {"inputs": keys, "method": method, "dim": dim, "seed": seed, "params": dict(params), "version": PROJECTION_VERSION}
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:20]


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
    """
    if not sets:
        raise ConfigError("nothing to project: give at least one feature set")
    layer = layer_name(layer)
    p = resolved_params(method, params)
    key = projection_key(sets, layer, method, dim, seed, p) if cache_dir is not None else None
    path = Path(cache_dir) / "projections" / f"{key}.safetensors" if key else None
    if path is not None and path.is_file():
        coords = load_state_dict(path, check_finite=False)["coords"].numpy()
    else:
        if progress is not None:
            progress(0.0, f"{method}: fitting {sum(len(fs.indices) for fs in sets.values())} points")
        x = np.concatenate([fs.layer(layer).numpy() for fs in sets.values()])
        coords = np.ascontiguousarray(embed(x, method, dim, seed, **p), dtype=np.float32)  # as cached: a hit equals a fit
        if path is not None:
            save_state_dict({"coords": torch.from_numpy(coords)}, path)
    frame = pd.concat([fs.frame(name) for name, fs in sets.items()], ignore_index=True)
    axes = pd.DataFrame(coords[:, :dim], columns=["x", "y", "z"][:dim])
    if progress is not None:
        progress(1.0, f"{method}: done")
    return pd.concat([axes, frame], axis=1)


def scatter_figure(df: pd.DataFrame, color: str = "model", title: str = ""):
    """A plotly scatter (3-D if there is a ``z`` column), one facet per task, hover with sample/label/prediction."""
    import plotly.express as px

    if color not in df.columns:
        raise ConfigError(f"cannot colour by {color!r}; columns: {', '.join(df.columns)}")
    hover = ["model", "sample", "classname", "label", "predicted_classname", "prediction", "correct"]
    symbol = "classname" if color == "model" else "model"
    if df[symbol].nunique() > 8:  # plotly cycles through few symbols; beyond that they stop meaning anything
        symbol = None
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
