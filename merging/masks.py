"""TALL masks and the consensus mask: the one place both rules live (algorithms_frontier.md §6).

Wang, Dimitriadis, Ortiz-Jiménez, Fleuret and Frossard, "Localizing Task Information for Improved Model
Merging and Compression", ICML 2024 (https://arxiv.org/abs/2405.07813); official code
``nik-dim/tall_masks`` at d10af8b (``src/utils/tallmask_utils.py``, ``src/eval/aggregation.py``).

- The multi-task vector τ_MTL is the plain sum of the task vectors (Task Arithmetic) or the TIES disjoint
  *sum* with 20 % density (``ties_merging(reset_thresh=20, merge_func="dis-sum")``), over every float entry.
- Task t's **TALL mask** keeps entry j when |τ_t[j]| > λ_t·|τ_MTL[j] − τ_t[j]| (strict, as
  ``generate_task_masks``). The official code compares |θ₀ − θ_t| with |(θ₀ + τ_MTL) − θ_t|, the same
  quantities computed in weight space; here they are computed from the task vectors directly, which can
  only flip an entry whose two sides are equal to within the rounding of the weights.
- The **consensus mask** keeps the entries at least ``k`` TALL masks keep (``construct_consensus_mask``,
  ``prun_thre_k``): k = 2 drops the "catastrophic" (kept by no task) and "selfish" (kept by one) weights,
  k = 0 keeps everything (plain TA or TIES) and k > T keeps nothing (the pretrained model).

The later ``tall_masks`` storage-lane method reuses ``tall_mask``/``tall_masks`` and ``multi_task_vector``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Literal

import torch

from merging import task_vectors as tv
from merging.errors import ConfigError

StateDict = dict[str, torch.Tensor]
VectorKind = Literal["task_arithmetic", "ties"]


def multi_task_vector(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    kind: VectorKind = "task_arithmetic",
    density: float = 0.2,
) -> tuple[list[StateDict], StateDict]:
    """The task vectors τ_t and τ_MTL over the float keys: their sum, or the TIES disjoint sum (global trim
    to ``density``, sign election, sum of the agreeing entries), as ``create_task_vector`` builds them.

    The masks compare τ_MTL with the *untrimmed* τ_t in both cases (the official TIES branch leaves
    ``tv_flat_checks`` untouched)."""
    vectors = tv.task_vectors(pretrained, finetuned)
    if kind == "task_arithmetic":
        multi = {k: torch.stack([v[k] for v in vectors]).sum(0) for k in vectors[0]}
    elif kind == "ties":
        kept = tv.ties_vectors(pretrained, finetuned, density)
        multi = {k: torch.stack([v[k] for v in kept]).sum(0) for k in kept[0]}
    else:
        raise ConfigError(f"unknown multi-task vector {kind!r}; allowed: task_arithmetic, ties")
    return vectors, multi


def _lambdas(lambdas: float | Sequence[float], n_tasks: int) -> list[float]:
    """One λ per task: a single value is used for every task; each must be a finite number >= 0."""
    values = [float(lambdas)] * n_tasks if isinstance(lambdas, int | float) else [float(x) for x in lambdas]
    if len(values) != n_tasks:
        raise ConfigError(f"tall_lambda: got {len(values)} values for {n_tasks} tasks; give one value or one per task")
    for lam in values:
        if not math.isfinite(lam) or lam < 0:
            raise ConfigError(f"tall_lambda = {lam!r} must be a finite number >= 0 (the paper's grid is 0.2..0.6)")
    return values


def tall_mask_tensor(vector: torch.Tensor, multi: torch.Tensor, lam: float) -> torch.Tensor:
    """The TALL rule on one tensor: |τ_t| > λ·|τ_MTL − τ_t| (strict), a bool tensor of the same shape."""
    return vector.abs() > (multi - vector).abs() * lam


def tall_mask(vector: Mapping[str, torch.Tensor], multi: Mapping[str, torch.Tensor], lam: float) -> dict[str, torch.Tensor]:
    """Task t's TALL mask over every key of its task vector."""
    return {k: tall_mask_tensor(vector[k], multi[k], lam) for k in vector}


def tall_masks(vectors: Sequence[Mapping[str, torch.Tensor]], multi: Mapping[str, torch.Tensor], lambdas: float | Sequence[float]) -> list[dict[str, torch.Tensor]]:
    """Every task's TALL mask; ``lambdas`` is one λ for all tasks or one per task (the paper picks λ_t per task)."""
    return [tall_mask(v, multi, lam) for v, lam in zip(vectors, _lambdas(lambdas, len(vectors)), strict=True)]


def mask_counts(vectors: Sequence[Mapping[str, torch.Tensor]], multi: Mapping[str, torch.Tensor], lambdas: float | Sequence[float]) -> dict[str, torch.Tensor]:
    """How many tasks' TALL masks keep each entry (int tensors), key by key, without holding T masks at once."""
    lams = _lambdas(lambdas, len(vectors))
    counts: dict[str, torch.Tensor] = {}
    for k in multi:
        count = torch.zeros(multi[k].shape, dtype=torch.int32, device=multi[k].device)
        for v, lam in zip(vectors, lams, strict=True):
            count += tall_mask_tensor(v[k], multi[k], lam)
        counts[k] = count
    return counts


def consensus_mask(vectors: Sequence[Mapping[str, torch.Tensor]], multi: Mapping[str, torch.Tensor], lambdas: float | Sequence[float], k: int) -> dict[str, torch.Tensor]:
    """The entries at least ``k`` tasks' TALL masks keep (count >= k, as ``construct_consensus_mask``)."""
    if k < 0:
        raise ConfigError(f"k = {k!r} must be >= 0 (the number of tasks whose TALL mask must keep an entry)")
    return {key: count >= k for key, count in mask_counts(vectors, multi, lambdas).items()}
