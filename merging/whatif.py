"""The live what-if (issue #20): re-merge, re-score every task and re-project in well under a second.

A teacher moves the scaling coefficient λ of task arithmetic (Ilharco et al. 2023, arXiv 2212.04089) or the
density of a TIES re-merge (Yadav et al. 2023, arXiv 2306.01708) and sees every task's accuracy and one task's
features move. What makes it fast:

- the task vectors tau_k = theta_k - theta_0 are computed once and kept in memory; a merge is the same pure
  functions the methods use (``task_vectors.add_scaled``; TIES's trim, sign election and disjoint sum), so the
  merged state at λ is bit-identical to the ``task_arithmetic`` / ``ties`` methods' state;
- a fixed stratified subsample of ``n`` test images per task (``representations.sample_indices``) is preprocessed
  once and scored in one batched forward of one encoder module (``torch.func.functional_call``);
- each task's 2-D view is a PCA basis fitted once on the individual and pretrained models' final features of that
  subsample, then *applied* to the merged model's features: the references stay put and the merged points move.

Accuracies here are on the subsample, not the full test set: say so wherever they are shown.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call

from merging import task_vectors as tv
from merging.errors import ConfigError
from merging.metrics import mean_l1
from merging.representations import sample_indices
from merging.suites.base import Suite

StateDict = dict[str, torch.Tensor]
WHATIF_METHODS = ("task_arithmetic", "ties")
"""The merges the what-if re-computes live: the two whose one knob a student can feel (λ; TIES's density)."""
DEFAULT_N = 100
"""Test images per task in the subsample (issue #20: "e.g. 100 per task")."""
PROJECTION_LABEL = "PCA basis fitted once on the individual and pretrained features; merged features projected into it"


@dataclass(frozen=True)
class Basis:
    """A linear 2-D (or k-D) view: ``apply(x) = (x - mean) @ components.T``; fitted once, applied to any model."""

    mean: np.ndarray
    """[d]"""
    components: np.ndarray
    """[k, d], orthonormal rows"""

    def apply(self, x: np.ndarray | torch.Tensor) -> np.ndarray:
        """[N, d] features -> [N, k] coordinates."""
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        return (x.astype(np.float64) - self.mean) @ self.components.T


def fit_basis(x: np.ndarray | torch.Tensor, dim: int = 2) -> Basis:
    """PCA of the rows of ``x`` [N, d] by SVD of the centred matrix; each axis's sign is fixed so that its
    largest-magnitude loading is positive (the view does not flip between two fits of the same data)."""
    x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    x = x.astype(np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ConfigError(f"a PCA basis needs [N >= 2, d] features, got shape {tuple(x.shape)}")
    mean = x.mean(axis=0)
    _, _, vt = np.linalg.svd(x - mean, full_matrices=False)
    comps = vt[:dim]
    if len(comps) < dim:
        comps = np.vstack([comps, np.zeros((dim - len(comps), x.shape[1]))])
    signs = np.sign(comps[np.arange(dim), np.abs(comps).argmax(axis=1)])
    return Basis(mean, comps * np.where(signs == 0, 1.0, signs)[:, None])


@dataclass(frozen=True)
class WhatIfPoint:
    """One what-if: a merge's accuracy (%) and bias on the subsample and its projected final features."""

    method: str
    scaling: float
    density: float | None
    accuracy: dict[str, float]
    """{task: % correct on the subsample}"""
    l1: dict[str, float]
    """{task: mean L1 of the merged vs the individual model's final features} (Surgery's Bias_k, algorithms.md §2)"""
    points: dict[str, np.ndarray] = field(repr=False)
    """{task: [n, 2] coordinates in the task's fixed basis}"""
    predictions: dict[str, np.ndarray] = field(repr=False)
    """{task: [n] predicted classes}"""
    seconds: float = 0.0
    """Wall time of the merge, forward pass and projection (0 when served from memory)."""

    @property
    def average(self) -> float:
        return float(np.mean(list(self.accuracy.values())))


class WhatIf:
    """The suite's task vectors, a preprocessed subsample and the fixed bases, ready to score any λ or density.

    Build once per suite (about a second on mini8: nine forward passes of the subsample) and share: ``score``
    holds a lock around the forward pass (``functional_call`` swaps the module's weights), and the last
    ``memo`` results are kept, so a slider moved back to a value is answered from memory.
    """

    def __init__(self, suite: Suite, n: int = DEFAULT_N, seed: int = 0, device: str = "cpu", memo: int = 64):
        self.suite_name = suite.name
        self.tasks = list(suite.tasks)
        self.n, self.seed, self.device = n, seed, device
        self.pretrained = {k: v.to(device) for k, v in suite.pretrained.items()}
        self.keys = tv.float_keys(self.pretrained)
        self.vectors = [{k: v.to(device) for k, v in tau.items()} for tau in suite.task_vectors()]
        self.encoder = suite.build_encoder().to(device).eval().requires_grad_(False)
        self.heads = suite.make_heads().to(device).eval()
        self.indices = {t: sample_indices(suite.data[t].test_labels, n, seed) for t in self.tasks}
        self.labels = {t: suite.data[t].test_labels[self.indices[t]] for t in self.tasks}
        self.classnames = {t: list(suite.data[t].classnames) for t in self.tasks}
        parts = [suite.data[t].preprocess(suite.data[t].test_images[self.indices[t]]) for t in self.tasks]
        self.images = torch.cat(parts).to(device)
        bounds = np.cumsum([0, *(len(p) for p in parts)])
        self.rows = {t: slice(int(bounds[i]), int(bounds[i + 1])) for i, t in enumerate(self.tasks)}
        self._lock = threading.Lock()
        self._memo: OrderedDict[tuple, WhatIfPoint] = OrderedDict()
        self._memo_size = memo
        self._ties: OrderedDict[float, StateDict] = OrderedDict()
        pre = self._features(self.pretrained)
        self.reference_features = {
            "individual": {t: self._features(suite.finetuned[t], t)[t] for t in self.tasks},
            "pretrained": pre,
        }
        self.bases = {t: fit_basis(torch.cat([self.reference_features["individual"][t], pre[t]])) for t in self.tasks}
        self.reference_points = {m: {t: self.bases[t].apply(f[t]) for t in self.tasks} for m, f in self.reference_features.items()}
        scored = {m: {t: self._accuracy(f[t], t) for t in self.tasks} for m, f in self.reference_features.items()}
        self.reference_accuracy = {m: {t: s[0] for t, s in by_task.items()} for m, by_task in scored.items()}
        self.reference_predictions = {m: {t: s[1] for t, s in by_task.items()} for m, by_task in scored.items()}

    # -- merging ------------------------------------------------------------------------------------------------
    def merged_state(self, method: str = "task_arithmetic", scaling: float = 0.3, density: float = 0.2) -> StateDict:
        """theta_0 + λ sum_k tau_k (task arithmetic) or theta_0 + λ * disjoint_sum(trim(tau, density)) (TIES)."""
        if method == "task_arithmetic":
            return tv.add_scaled(self.pretrained, self.vectors, [float(scaling)] * len(self.vectors))
        if method == "ties":
            return tv.add_scaled(self.pretrained, [self.ties_sum(density)], [float(scaling)])
        raise ConfigError(f"the what-if re-merges {' and '.join(WHATIF_METHODS)}, not {method!r}")

    def ties_sum(self, density: float) -> StateDict:
        """TIES's disjoint sum of the trimmed, sign-elected task vectors at ``density`` (global trim, as ``ties``'s
        default ``per_tensor=False``); the last few densities are kept in memory (the trim is most of the cost)."""
        density = float(density)
        if density in self._ties:
            self._ties.move_to_end(density)
            return self._ties[density]
        stacked = torch.stack([tv.flatten(v, self.keys) for v in self.vectors])
        mask = torch.stack([tv.trim_mask(row, density) for row in stacked])
        trimmed = stacked * mask
        rows = tv.agreeing(trimmed, tv.elect_sign(trimmed))
        per_task = [tv.unflatten(row, self.vectors[i], self.keys) for i, row in enumerate(rows)]
        summed = {k: sum(v[k] for v in per_task) for k in self.keys}
        self._ties[density] = summed
        while len(self._ties) > 4:
            self._ties.popitem(last=False)
        return summed

    # -- scoring ------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _features(self, state: Mapping[str, torch.Tensor], task: str | None = None) -> dict[str, torch.Tensor]:
        """Final features of ``state`` on every task's subsample (or only ``task``'s): {task: [n, d]}."""
        images = self.images if task is None else self.images[self.rows[task]]
        state = {k: v.to(self.device) for k, v in state.items()}
        with self._lock:
            z = functional_call(self.encoder, state, (images,)).float().cpu()
        if task is not None:
            return {task: z}
        return {t: z[self.rows[t]] for t in self.tasks}

    @torch.no_grad()
    def _accuracy(self, z: torch.Tensor, task: str) -> tuple[float, np.ndarray]:
        logits = self.heads[task](z.to(self.device)).float()
        if not torch.isfinite(logits).all():
            raise ConfigError(f"the merged model's logits on task {task!r} hold NaN or Inf values: use a smaller scaling coefficient λ")
        pred = logits.argmax(-1).cpu()
        return 100.0 * float((pred == self.labels[task]).double().mean()), pred.numpy()

    def score_state(self, state: Mapping[str, torch.Tensor], method: str, scaling: float, density: float | None) -> WhatIfPoint:
        """Score any merged encoder state on every task's subsample and project it into the fixed bases."""
        t0 = time.perf_counter()
        z = self._features(state)
        acc, pred = {}, {}
        for t in self.tasks:
            acc[t], pred[t] = self._accuracy(z[t], t)
        l1 = {t: mean_l1(self.reference_features["individual"][t], z[t]) for t in self.tasks}
        points = {t: self.bases[t].apply(z[t]) for t in self.tasks}
        return WhatIfPoint(method, float(scaling), density, acc, l1, points, pred, time.perf_counter() - t0)

    def score(self, method: str = "task_arithmetic", scaling: float = 0.3, density: float = 0.2) -> WhatIfPoint:
        """Merge with ``method`` at scaling coefficient λ = ``scaling`` (and TIES ``density``), score every task.

        ``seconds`` includes the merge; a repeated request is answered from memory with ``seconds`` 0.
        """
        key = (method, round(float(scaling), 6), round(float(density), 6) if method == "ties" else None)
        if key in self._memo:
            self._memo.move_to_end(key)
            hit = self._memo[key]
            return WhatIfPoint(hit.method, hit.scaling, hit.density, hit.accuracy, hit.l1, hit.points, hit.predictions, 0.0)
        t0 = time.perf_counter()
        state = self.merged_state(method, scaling, density)
        point = self.score_state(state, method, scaling, key[2])
        point = WhatIfPoint(point.method, point.scaling, point.density, point.accuracy, point.l1, point.points, point.predictions,
                            time.perf_counter() - t0)
        self._memo[key] = point
        while len(self._memo) > self._memo_size:
            self._memo.popitem(last=False)
        return point

    def score_added(self, task: str, scaling: float = 1.0) -> WhatIfPoint:
        """theta_0 + ``scaling`` * tau_task alone (one task vector added to the pretrained model), scored on every task."""
        if task not in self.tasks:
            raise ConfigError(f"unknown task {task!r}; this suite has: {', '.join(self.tasks)}")
        key = ("added:" + task, round(float(scaling), 6), None)
        if key not in self._memo:
            scales = [float(scaling) if t == task else 0.0 for t in self.tasks]
            self._memo[key] = self.score_state(tv.add_scaled(self.pretrained, self.vectors, scales), key[0], scaling, None)
        return self._memo[key]

    def frame(self, point: WhatIfPoint, task: str) -> pd.DataFrame:
        """Tidy rows of ``task``'s projected points: the individual and pretrained references, then the merge.

        Columns: x, y, model, sample, label, classname, prediction, correct.
        """
        rows = []
        labels = self.labels[task].numpy()
        for model, coords, pred in (
            ("individual", self.reference_points["individual"][task], self.reference_predictions["individual"][task]),
            ("pretrained", self.reference_points["pretrained"][task], self.reference_predictions["pretrained"][task]),
            ("merged", point.points[task], point.predictions[task]),
        ):
            rows.append(pd.DataFrame({
                "x": coords[:, 0], "y": coords[:, 1], "model": model, "sample": self.indices[task].numpy(), "label": labels,
                "classname": [self.classnames[task][i] for i in labels], "prediction": pred, "correct": pred == labels,
            }))  # fmt: skip
        return pd.concat(rows, ignore_index=True)


def sweep(engine: WhatIf, method: str, values: Sequence[float], density: float = 0.2, scaling: float = 0.3,
          progress: Callable[[float, str], None] | None = None) -> pd.DataFrame:
    """Score a list of λ (``method="task_arithmetic"``) or, for ``"ties:density"``, of densities at ``scaling``.

    Returns one row per value: value, seconds, average and one accuracy column per task (subsample %).
    """
    rows = []
    for i, v in enumerate(values):
        if method == "ties:density":
            p = engine.score("ties", scaling, v)
        else:
            p = engine.score(method, v, density)
        rows.append({"value": v, "seconds": p.seconds, "average": p.average, **p.accuracy})
        if progress is not None:
            progress((i + 1) / len(values), f"{method} {v:g}")
    return pd.DataFrame(rows)


def task_vector_sizes(suite: Suite, task: str) -> pd.DataFrame:
    """The size of one task vector tau_t = theta_t - theta_0 per layer of the ViT, in network order.

    Rows: ``embedding`` (patch conv, class and positional embeddings, ln_pre), ``block i`` (transformer.resblocks.i),
    ``output`` (ln_post, proj). Columns: layer, norm (L2 norm of tau over the layer's tensors), relative (that norm
    divided by ||theta_0|| over the same tensors), parameters.
    """
    if task not in suite.tasks:
        raise ConfigError(f"unknown task {task!r}; suite {suite.name!r} has: {', '.join(suite.tasks)}")
    tau = tv.task_vectors(suite.pretrained, [suite.finetuned[task]])[0]

    def group(key: str) -> tuple[int, str]:
        if key.startswith("transformer.resblocks."):
            i = int(key.split(".")[2])
            return 1 + i, f"block {i}"
        if key.startswith(("ln_post", "proj")):
            return 10_000, "output"
        return 0, "embedding"

    sums: dict[tuple[int, str], list[float]] = {}
    for k, v in tau.items():
        g = sums.setdefault(group(k), [0.0, 0.0, 0])
        g[0] += float(v.double().pow(2).sum())
        g[1] += float(suite.pretrained[k].double().pow(2).sum())
        g[2] += v.numel()
    rows = [{"layer": name, "norm": s[0] ** 0.5, "relative": (s[0] / s[1]) ** 0.5 if s[1] > 0 else float("nan"), "parameters": int(s[2])}
            for (_, name), s in sorted(sums.items())]
    return pd.DataFrame(rows)


def run_config(suite_name: str, method: str, scaling: float, density: float | None = None):
    """The ``RunConfig`` of the cached run a what-if setting lands on (the same merge on the whole test set)."""
    from merging.runs import RunConfig

    params: dict = {"scaling": round(float(scaling), 6)}
    if method == "ties":
        params["density"] = round(float(density if density is not None else 0.2), 6)
    return RunConfig(suite_name, method, params)


def full_test_result(suite: Suite, suite_name: str, method: str, scaling: float, density: float | None = None,
                     cache_dir: str = "cache", device: str | None = None) -> dict | None:
    """The finished run (full test set) of the same merge if the cache holds it, else None; computes nothing."""
    from merging.runs import cached_result

    return cached_result(run_config(suite_name, method, scaling, density), suite, cache_dir, device)
