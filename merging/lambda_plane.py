"""The λ plane of a task pair (issue 19, view 2): accuracy and weight disentanglement over a grid of (λᵢ, λⱼ).

For θ(λᵢ, λⱼ) = θ₀ + λᵢτᵢ + λⱼτⱼ on a G×G grid (default 11×11 on [0, 1.5]), each task's accuracy on a stratified
sample of its test images, and the weight-disentanglement error of Ortiz-Jiménez, Favero and Frossard, "Task
Arithmetic in the Tangent Space", NeurIPS 2023 (https://arxiv.org/abs/2305.12827, eq. 3):

    ξ(λᵢ, λⱼ) = Σ_{t∈{i,j}} E_{x∼t} [ f(x; θ₀ + λₜτₜ) ≠ f(x; θ(λᵢ, λⱼ)) ]

(the prediction-disagreement distance), reported per task (ξᵢ, ξⱼ) and summed. ξᵢ = 0 on the λᵢ axis (λⱼ = 0) by
construction; the single-task reference θ₀ + λₜτₜ is itself a grid point on task t's axis, so no extra forward is
needed. Every grid point runs the one encoder module through ``torch.func.functional_call`` (no module copies); the
merged weights are formed per point on the fly, one forward over both tasks' images. Cached by suite fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.func import functional_call

from merging.device import default_device
from merging.errors import ConfigError
from merging.io import load_json, read_cached, save_json
from merging.progress import ProgressFn, track
from merging.representations import sample_indices
from merging.suites.base import Suite

LAMBDA_VERSION = "1"
TA_POINT = 0.3
"""Task arithmetic's usual λ (Ilharco et al. 2023), marked on the plane."""


def lambda_grid(points: int = 11, high: float = 1.5) -> list[float]:
    """``points`` evenly spaced λ from 0 to ``high`` (11 on [0, 1.5]: steps of 0.15, so 0.3 is on the grid)."""
    if points < 2 or not math.isfinite(high) or high <= 0:
        raise ConfigError(f"the λ grid needs >= 2 points and a finite upper end > 0; got {points} points up to {high!r}")
    return [round(float(x), 10) for x in np.linspace(0.0, high, points)]


@dataclass
class LambdaPlane:
    """Per task t of the pair: ``accuracy[t]`` (%) and ``disagreement[t]`` (ξₜ, a fraction) as [G, G] arrays indexed
    [λᵢ index, λⱼ index]."""

    tasks: tuple[str, str]
    grid: list[float]
    n: int
    accuracy: dict[str, np.ndarray]
    disagreement: dict[str, np.ndarray]

    @property
    def mean_accuracy(self) -> np.ndarray:
        return (self.accuracy[self.tasks[0]] + self.accuracy[self.tasks[1]]) / 2

    @property
    def disentanglement_error(self) -> np.ndarray:
        """ξ = ξᵢ + ξⱼ (eq. 3 of Ortiz-Jiménez et al. sums over the two tasks): in [0, 2]."""
        return self.disagreement[self.tasks[0]] + self.disagreement[self.tasks[1]]

    def best(self) -> tuple[float, float]:
        """The (λᵢ, λⱼ) of the highest mean accuracy over the pair (a description of the plane, not a choice)."""
        a, b = np.unravel_index(int(np.argmax(self.mean_accuracy)), self.mean_accuracy.shape)
        return self.grid[a], self.grid[b]

    def frame(self) -> pd.DataFrame:
        """Tidy: one row per grid point with both tasks' accuracy, ξᵢ, ξⱼ and ξ."""
        i, j = self.tasks
        li, lj = np.meshgrid(self.grid, self.grid, indexing="ij")
        return pd.DataFrame({"lambda_i": li.ravel(), "lambda_j": lj.ravel(), "task_i": i, "task_j": j,
                             "accuracy_i": self.accuracy[i].ravel(), "accuracy_j": self.accuracy[j].ravel(),
                             "mean_accuracy": self.mean_accuracy.ravel(), "disagreement_i": self.disagreement[i].ravel(),
                             "disagreement_j": self.disagreement[j].ravel(), "disentanglement_error": self.disentanglement_error.ravel()})

    def to_json(self) -> dict:
        return {"tasks": list(self.tasks), "grid": self.grid, "n": self.n, "accuracy": {t: a.tolist() for t, a in self.accuracy.items()},
                "disagreement": {t: a.tolist() for t, a in self.disagreement.items()}}

    @classmethod
    def from_json(cls, d: dict) -> LambdaPlane:
        return cls(tuple(d["tasks"]), list(d["grid"]), int(d["n"]), {t: np.asarray(a, float) for t, a in d["accuracy"].items()},
                   {t: np.asarray(a, float) for t, a in d["disagreement"].items()})


@torch.no_grad()
def compute_lambda_plane(suite: Suite, task_i: str, task_j: str, grid: Sequence[float] | None = None, n: int | None = 200, seed: int = 0,
                         device: str | None = None, progress: ProgressFn | None = None) -> LambdaPlane:
    """The plane, uncached: one functional forward of both tasks' sampled test images per grid point."""
    suite.check_tasks([task_i, task_j])
    if task_i == task_j:
        raise ConfigError(f"the λ plane needs two different tasks, got {task_i!r} twice; pick another second task from: {', '.join(suite.tasks)}")
    grid = list(grid) if grid is not None else lambda_grid()
    device = device or default_device()
    encoder = suite.build_encoder().to(device).eval().requires_grad_(False)
    heads = suite.make_heads().to(device)
    tau_i, tau_j = suite.task_vectors([task_i, task_j])
    base = {k: v.to(device) for k, v in suite.pretrained.items()}
    tau_i, tau_j = ({k: v.to(device).float() for k, v in tau.items()} for tau in (tau_i, tau_j))
    images, labels, sizes = [], {}, {}
    for t in (task_i, task_j):
        data = suite.data[t]
        idx = sample_indices(data.test_labels, n, seed)
        images.append(data.preprocess(data.test_images[idx]))
        labels[t], sizes[t] = data.test_labels[idx].to(device), len(idx)
    x = torch.cat(images).to(device)
    g = len(grid)
    preds = {t: torch.empty(g, g, sizes[t], dtype=torch.long, device=device) for t in (task_i, task_j)}
    points = [(a, b) for a in range(g) for b in range(g)]
    for a, b in track(points, desc="λ plane", progress=progress):
        params = {k: (v + grid[a] * tau_i[k] + grid[b] * tau_j[k]).to(v.dtype) if k in tau_i else v for k, v in base.items()}
        z_i, z_j = functional_call(encoder, params, (x,)).split([sizes[task_i], sizes[task_j]])
        preds[task_i][a, b] = heads[task_i](z_i).argmax(-1)
        preds[task_j][a, b] = heads[task_j](z_j).argmax(-1)
    accuracy = {t: 100.0 * (preds[t] == labels[t]).double().mean(-1).cpu().numpy() for t in preds}
    alone = {task_i: preds[task_i][:, :1], task_j: preds[task_j][:1, :]}  # θ₀ + λᵢτᵢ is (λᵢ, 0); θ₀ + λⱼτⱼ is (0, λⱼ)
    disagreement = {t: (preds[t] != alone[t]).double().mean(-1).cpu().numpy() for t in preds}
    return LambdaPlane((task_i, task_j), grid, sizes[task_i] + sizes[task_j], accuracy, disagreement)


def _source_digest() -> str:
    return hashlib.sha256(Path(__file__).read_bytes()).hexdigest()[:12]


def lambda_plane_path(suite: Suite, task_i: str, task_j: str, grid: Sequence[float], n: int | None, seed: int, cache_dir: str | Path) -> Path:
    blob = {"v": LAMBDA_VERSION, "suite": suite.fingerprint, "tasks": [task_i, task_j], "grid": list(grid), "n": n, "seed": seed, "code": _source_digest()}
    return Path(cache_dir) / "why" / f"lambda-{hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]}.json"


def lambda_plane(suite: Suite, task_i: str, task_j: str, grid: Sequence[float] | None = None, n: int | None = 200, seed: int = 0,
                 cache_dir: str | Path = "cache", device: str | None = None, progress: ProgressFn | None = None) -> LambdaPlane:
    """``compute_lambda_plane`` cached under ``cache/why/`` by the suite's fingerprint, the pair, grid, sample and code."""
    grid = list(grid) if grid is not None else lambda_grid()
    path = lambda_plane_path(suite, task_i, task_j, grid, n, seed, cache_dir)
    cached = read_cached(path, lambda p: LambdaPlane.from_json(load_json(p)), "λ-plane cache")
    if cached is not None:
        return cached
    plane = compute_lambda_plane(suite, task_i, task_j, grid, n, seed, device, progress)
    save_json(plane.to_json(), path)
    return plane
