"""Run-level artifacts: what is computed from a finished run and kept next to it in the cache.

The layer above ``runs``: a run's features (``representations`` extracts them, this module finds the
run's model and caches them by run key), whether they are cached (asked by the app instead of knowing
file names), and a run's cross-task matrix. Metrics and projections stay pure (tensors in, tables out).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from merging.cross_task import cross_task_matrix
from merging.errors import ConfigError
from merging.features import Features
from merging.io import atomic_write, read_cached
from merging.progress import ProgressFn, scaled
from merging.representations import cached_features, features_present, sample_indices
from merging.runs import load_model, run_dir
from merging.suites.base import Suite

CROSS_TASK_FILE = "cross_task.csv"


def run_features(
    result: dict,
    suite: Suite,
    tasks: Sequence[str] | None = None,
    n: int | None = None,
    seed: int = 0,
    layers: bool = False,
    cache_dir: str | Path = "cache",
    batch_size: int = 256,
    device: str | None = None,
    progress: ProgressFn | None = None,
    amp: bool = False,
) -> dict[str, Features]:
    """Features of a finished run (``merging.runs.run``'s result) on each task's stratified sample of ``n`` test images.

    The run's model is rebuilt at most once, and only if some task's features are not cached yet.
    """
    tasks = list(tasks) if tasks is not None else list(result["tasks"])
    unknown = [t for t in tasks if t not in result["tasks"]]
    if unknown:
        raise ConfigError(f"run {result['key']} has no task(s) {unknown}; it covers: {', '.join(result['tasks'])}")
    loader = functools.cache(lambda: load_model(result, suite, cache_dir))
    out = {}
    for i, task in enumerate(tasks):
        indices = sample_indices(suite.data[task].test_labels, n, seed)
        out[task] = cached_features(
            loader, result["key"], suite, task, indices, layers, cache_dir, batch_size, device,
            scaled(progress, i / len(tasks), (i + 1) / len(tasks), f"{task}: "), amp,
        )  # fmt: skip
    return out


def features_cached(result: dict, suite: Suite, n: int | None = None, layers: bool = False, cache_dir: str | Path = "cache",
                    seed: int = 0, tasks: Sequence[str] | None = None) -> bool:
    """Whether every task's features of a finished run (``run_features``' sample sets) are in the cache."""
    return all(features_present(cache_dir, result["key"], t, sample_indices(suite.data[t].test_labels, n, seed), layers)
               for t in (tasks if tasks is not None else result["tasks"]))


def cross_task_cached(result: dict, cache_dir: str | Path = "cache") -> bool:
    """Whether ``cached_cross_task_matrix`` would read the run's matrix rather than compute it (asked by the app)."""
    return (run_dir(cache_dir, result["key"]) / CROSS_TASK_FILE).is_file()


def cached_cross_task_matrix(result: dict, suite: Suite, cache_dir: str | Path = "cache", device: str | None = None) -> pd.DataFrame:
    """The matrix of a finished run, computed once and kept next to its ``result.json``."""
    path = run_dir(cache_dir, result["key"]) / CROSS_TASK_FILE
    expected = list(result["tasks"])

    def read(p: Path) -> pd.DataFrame:
        table = pd.read_csv(p, index_col=0)
        if list(table.index) != expected or list(table.columns) != expected or not np.isfinite(table.to_numpy(dtype=float)).all():
            raise ValueError(f"not a {len(expected)}x{len(expected)} matrix of the run's tasks")
        return table.rename_axis(index="encoder", columns="head")

    cached = read_cached(path, read, "cross-task matrix cache")
    if cached is not None:
        return cached
    table = cross_task_matrix(load_model(result, suite, cache_dir), suite, result["tasks"], device=device)
    atomic_write(path, lambda tmp: table.to_csv(tmp))
    return table
