"""Does a metric predict the merge? (issue 19, view 5): pairwise metrics of every task pair against the normalized
accuracy of that pair's task-arithmetic merge, with Pearson and Spearman r.

Per unordered pair (i, j):
- ``tv_cosine``: cosine of the task vectors τᵢ, τⱼ over the whole model (Ilharco et al. 2023);
- ``subspace_overlap``: per weight matrix, ‖Uᵢᵀ Uⱼ‖²_F / k for the top-k left singular vectors of each update
  (k = ``top_fraction`` of the rank, at least 1), averaged over matrices: 1 when the two updates act on the same
  subspace, about k/m for random ones (the subspace alignment of Marczak et al., "No Task Left Behind", ICML 2025,
  https://arxiv.org/abs/2502.04959);
- ``cross_task_accuracy``: how well each individual encoder serves the other task's head, normalized by that task's
  own model: the mean of acc(encoder i, head j, task j) / acc(j) and the reverse (SyMerge, arXiv 2412.19098, reports
  r = 0.863 for cross-task accuracy over 20 tasks);
- ``representation_cka``: linear CKA (Kornblith et al. 2019) of the two individual models' features of the same
  images, on task j's images and on task i's, averaged.
The target is the pair's task-arithmetic merge (default λ = 0.3, a cached run on the two tasks) normalized by the
individual models: mean over the pair of acc_merge(t) / acc_individual(t), in percent.
"""

from __future__ import annotations

import hashlib
import itertools
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from merging.errors import ConfigError
from merging.geometry import cosine_matrix
from merging.io import atomic_write, read_cached
from merging.metrics import linear_cka
from merging.progress import ProgressFn, scaled, track
from merging.representations import sample_indices
from merging.suites.base import Suite
from merging.svd import is_matrix

PAIR_VERSION = "1"
METRICS = ("tv_cosine", "subspace_overlap", "cross_task_accuracy", "representation_cka")


def subspace_overlaps(vectors: Sequence[dict[str, torch.Tensor]], keys: Sequence[str], top_fraction: float = 0.05) -> np.ndarray:
    """[T, T] mean over ``keys`` of ‖Uᵢᵀ Uⱼ‖²_F / k, Uₜ the top-k left singular vectors of task t's update of that matrix."""
    n = len(vectors)
    total = np.zeros((n, n))
    for k in keys:
        stacked = torch.stack([v[k].float() for v in vectors])
        u = torch.linalg.svd(stacked, full_matrices=False)[0]
        top = max(1, round(top_fraction * u.shape[-1]))
        basis = u[..., :top]
        total += (torch.einsum("imk,jml->ijkl", basis, basis) ** 2).sum((-1, -2)).double().numpy() / top
    return total / max(1, len(keys))


@torch.no_grad()
def cross_features_cka(suite: Suite, n: int | None = 200, seed: int = 0, device: str = "cpu") -> pd.DataFrame:
    """[T, T] linear CKA of individual models i and j's features of task j's sampled test images (rows: i, columns: j)."""
    from merging.methods.surgery import individual_model

    model = individual_model(suite, suite.tasks).to(device).eval()
    tasks = suite.tasks
    out = pd.DataFrame(1.0, index=tasks, columns=tasks)
    for j in tasks:
        data = suite.data[j]
        x = data.preprocess(data.test_images[sample_indices(data.test_labels, n, seed)]).to(device)
        feats = {i: model.encode(x, i).cpu() for i in tasks}
        for i in tasks:
            out.loc[i, j] = linear_cka(feats[i], feats[j])
    return out


def pair_table_path(suite: Suite, n: int | None = 200, seed: int = 0, scaling: float = 0.3, top_fraction: float = 0.05,
                    cache_dir: str | Path = "cache") -> Path:
    """Where ``pair_table`` keeps its table: keyed by the suite's fingerprint, the settings and this module's source."""
    blob = {"v": PAIR_VERSION, "suite": suite.fingerprint, "n": n, "seed": seed, "scaling": scaling, "top": top_fraction,
            "code": hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]}
    return Path(cache_dir) / "why" / f"pairs-{hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]}.csv"


def pair_table(suite: Suite, n: int | None = 200, seed: int = 0, scaling: float = 0.3, top_fraction: float = 0.05, cache_dir: str | Path = "cache",
               device: str | None = None, progress: ProgressFn | None = None) -> pd.DataFrame:
    """One row per task pair: ``pair, task_i, task_j``, every metric of ``METRICS`` and ``normalized_accuracy`` (%) of
    the pair's task-arithmetic merge at ``scaling``. Runs are cached runs; the table is cached under ``cache/why/``."""
    from merging.artifacts import cached_cross_task_matrix
    from merging.runs import RunConfig, run

    if len(suite.tasks) < 3:
        raise ConfigError(f"suite {suite.name!r} has {len(suite.tasks)} tasks: a correlation over pairs needs at least 3 tasks (3 pairs)")
    path = pair_table_path(suite, n, seed, scaling, top_fraction, cache_dir)
    cached = read_cached(path, _read_table, "pair-metrics cache")
    if cached is not None:
        return cached
    tasks = suite.tasks
    device = device or "cpu"
    vectors = suite.task_vectors()
    cos = cosine_matrix(vectors)
    keys = [k for k, v in suite.pretrained.items() if is_matrix(k, v) and min(v.shape) > 1]
    overlap = subspace_overlaps(vectors, keys, top_fraction)
    individual = run(RunConfig(suite.name, "individual"), suite, cache_dir, device)
    cross = cached_cross_task_matrix(individual, suite, cache_dir, device)
    cka = cross_features_cka(suite, n, seed, device)
    own = individual["accuracy"]
    rows = []
    pairs = list(itertools.combinations(range(len(tasks)), 2))
    for a, b in track(pairs, desc="pairwise task arithmetic", progress=scaled(progress, 0.0, 1.0)):
        i, j = tasks[a], tasks[b]
        merged = run(RunConfig(suite.name, "task_arithmetic", {"scaling": scaling}, tasks=(i, j)), suite, cache_dir, device)
        rows.append({
            "pair": f"{i} + {j}", "task_i": i, "task_j": j,
            "tv_cosine": float(cos[a, b]),
            "subspace_overlap": float(overlap[a, b]),
            "cross_task_accuracy": 100.0 * (cross.loc[i, j] / own[j] + cross.loc[j, i] / own[i]) / 2,
            "representation_cka": (float(cka.loc[i, j]) + float(cka.loc[j, i])) / 2,
            "normalized_accuracy": 100.0 * (merged["accuracy"][i] / own[i] + merged["accuracy"][j] / own[j]) / 2,
        })  # fmt: skip
    table = pd.DataFrame(rows)
    atomic_write(path, lambda tmp: table.to_csv(tmp, index=False))
    return table


def _read_table(path: Path) -> pd.DataFrame:
    table = pd.read_csv(path)
    if not {"pair", *METRICS, "normalized_accuracy"} <= set(table.columns) or table[list(METRICS)].isna().all().any():
        raise ValueError("not a pair-metrics table")
    return table


def correlations(table: pd.DataFrame, target: str = "normalized_accuracy") -> pd.DataFrame:
    """``metric, pearson_r, pearson_p, spearman_r, spearman_p, pairs`` of every metric against ``target`` (scipy.stats)."""
    from scipy import stats

    rows = []
    for m in METRICS:
        x, y = table[m].to_numpy(float), table[target].to_numpy(float)
        ok = np.isfinite(x) & np.isfinite(y)
        if ok.sum() < 3 or np.ptp(x[ok]) == 0 or np.ptp(y[ok]) == 0:
            rows.append((m, np.nan, np.nan, np.nan, np.nan, int(ok.sum())))
            continue
        p, s = stats.pearsonr(x[ok], y[ok]), stats.spearmanr(x[ok], y[ok])
        rows.append((m, float(p.statistic), float(p.pvalue), float(s.statistic), float(s.pvalue), int(ok.sum())))
    return pd.DataFrame(rows, columns=["metric", "pearson_r", "pearson_p", "spearman_r", "spearman_p", "pairs"])
