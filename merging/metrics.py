"""Representation-bias metrics between two models' features of the same samples (anchors.md §6).

Mean L1 is Surgery's objective and the paper's Bias_k (algorithms.md §2); L2 and cosine are its
per-sample siblings; linear CKA (Kornblith et al. 2019, arXiv 1905.00414) compares the geometry up to
rotation and scale; kNN overlap asks whether each sample keeps its neighbours. Trustworthiness
(how faithful a 2-D projection is) and silhouette (how well classes separate) come from scikit-learn.
Rows of ``a`` and ``b`` must be the same samples in the same order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from merging.errors import ConfigError, DataError
from merging.features import FINAL, Features, layer_name

Array = np.ndarray | torch.Tensor
PAIR_METRICS = ("l1", "l2", "cosine", "cka", "knn_overlap")


def _np(x: Array) -> np.ndarray:
    return (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)).astype(np.float64, copy=False)


def _pair(a: Array, b: Array) -> tuple[np.ndarray, np.ndarray]:
    a, b = _np(a), _np(b)
    if a.ndim != 2 or b.ndim != 2 or len(a) != len(b):
        raise DataError(f"need two [N, d] feature matrices with the same N, got {a.shape} and {b.shape}")
    return a, b


def mean_l1(a: Array, b: Array) -> float:
    """(1 / (N d)) sum |a - b|: Surgery's L1 objective and the paper's Bias_k (algorithms.md §2)."""
    a, b = _pair(a, b)
    return float(np.abs(a - b).mean())


def mean_l2(a: Array, b: Array) -> float:
    """Mean over samples of the Euclidean distance ||a_i - b_i||."""
    a, b = _pair(a, b)
    return float(np.linalg.norm(a - b, axis=1).mean())


def mean_cosine(a: Array, b: Array) -> float:
    """Mean over samples of cos(a_i, b_i): the direction the heads see (they normalize, algorithms.md §0)."""
    a, b = _pair(a, b)
    denom = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return float((np.einsum("nd,nd->n", a, b) / np.maximum(denom, 1e-12)).mean())


def linear_cka(a: Array, b: Array) -> float:
    """Linear CKA = ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F) on column-centred X, Y (Kornblith 2019, eq. 7).

    Invariant to orthogonal transforms and isotropic scaling of either side; needs no equal widths.
    """
    x, y = _pair(a, b)
    x = x - x.mean(axis=0)
    y = y - y.mean(axis=0)
    if len(x) < x.shape[1] or len(y) < y.shape[1]:  # the N x N Gram form is cheaper when N < d
        kx, ky = x @ x.T, y @ y.T
        num, den = float((kx * ky).sum()), float(np.linalg.norm(kx) * np.linalg.norm(ky))
    else:
        num, den = float(np.linalg.norm(y.T @ x) ** 2), float(np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))
    return num / den if den > 0 else math.nan


def _neighbours(x: np.ndarray, k: int) -> np.ndarray:
    from sklearn.neighbors import NearestNeighbors

    return NearestNeighbors(n_neighbors=k).fit(x).kneighbors(return_distance=False)  # the query point itself is excluded


def knn_overlap(a: Array, b: Array, k: int = 10) -> float:
    """Mean over samples of the Jaccard index of its k nearest neighbours in ``a``'s and in ``b``'s space."""
    a, b = _pair(a, b)
    k = min(k, len(a) - 1)
    if k < 1:
        raise DataError("kNN overlap needs at least 2 samples")
    na, nb = _neighbours(a, k), _neighbours(b, k)
    inter = np.array([len(set(ra) & set(rb)) for ra, rb in zip(na.tolist(), nb.tolist(), strict=True)])
    return float((inter / (2 * k - inter)).mean())


def trustworthiness(x: Array, embedded: Array, k: int = 5) -> float:
    """sklearn's trustworthiness of a low-dim embedding (1 = no false neighbours); k clipped below N/2."""
    from sklearn.manifold import trustworthiness as sk_trust

    x, e = _pair(x, embedded)
    k = min(k, (len(x) - 1) // 2)
    if k < 1:
        return math.nan
    return float(sk_trust(x, e, n_neighbors=k))


def silhouette(x: Array, labels: Array) -> float:
    """sklearn's silhouette score of the classes in feature space (NaN unless 2 <= #classes <= N-1)."""
    from sklearn.metrics import silhouette_score

    x = _np(x)
    labels = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels)
    if not 2 <= len(np.unique(labels)) <= len(x) - 1:
        return math.nan
    return float(silhouette_score(x, labels))


def pair_metrics(a: Array, b: Array, k: int = 10) -> dict[str, float]:
    """Every pairwise metric of two aligned feature matrices."""
    return {
        "l1": mean_l1(a, b),
        "l2": mean_l2(a, b),
        "cosine": mean_cosine(a, b),
        "cka": linear_cka(a, b),
        "knn_overlap": knn_overlap(a, b, k),
    }


def _check_aligned(a: Features, b: Features) -> None:
    if a.task != b.task or not torch.equal(a.indices, b.indices):
        raise DataError(f"feature sets {a.key or a.task!r} and {b.key or b.task!r} are not the same samples of the same task")


def _projected(projection: pd.DataFrame, model: str, fs: Features) -> np.ndarray | None:
    rows = projection[(projection["model"] == model) & (projection["task"] == fs.task)]
    if len(rows) != len(fs.indices):
        return None
    axes = [c for c in ("x", "y", "z") if c in rows.columns]
    return rows.set_index("sample").loc[fs.indices.tolist(), axes].to_numpy()


def bias_table(
    sets: Mapping[str, Features],
    reference: str,
    layers: Sequence[str | int] = (FINAL,),
    projection: pd.DataFrame | None = None,
    k: int = 10,
) -> pd.DataFrame:
    """Tidy metrics of every model against ``reference`` on one task: columns task, layer, reference, model, metric, value.

    Per-model rows (the reference's too): silhouette, accuracy on these samples, and, given a joint
    ``projection`` of the final features, its trustworthiness.
    """
    if reference not in sets:
        raise ConfigError(f"reference {reference!r} is not among the models: {', '.join(sets)}")
    ref = sets[reference]
    rows = []
    for name, fs in sets.items():
        _check_aligned(ref, fs)
        for layer in layers:
            lname = layer_name(layer)
            x = fs.layer(lname)
            found = {"silhouette": silhouette(x, fs.labels)}
            if name != reference:
                found.update(pair_metrics(ref.layer(lname), x, k))
            if lname == FINAL:
                found["accuracy"] = fs.accuracy
                coords = _projected(projection, name, fs) if projection is not None else None
                if coords is not None:
                    found["trustworthiness"] = trustworthiness(x, coords)
            rows += [{"task": fs.task, "layer": lname, "reference": reference, "model": name, "metric": m, "value": v} for m, v in found.items()]
    return pd.DataFrame(rows, columns=["task", "layer", "reference", "model", "metric", "value"])


def wide(table: pd.DataFrame) -> pd.DataFrame:
    """The tidy table as rows (task, layer, model) x metric columns, for printing."""
    out = table.pivot_table(index=["task", "layer", "model"], columns="metric", values="value", sort=False)
    order = [m for m in ("accuracy", *PAIR_METRICS, "silhouette", "trustworthiness") if m in out.columns]
    return out[order]
