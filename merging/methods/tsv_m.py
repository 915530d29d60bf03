"""TSV-M, Task Singular Vectors: Merge (Gargiulo et al., CVPR 2025, arXiv 2412.00081, the "TSV-Merge" method section;
recipe: algorithms_frontier.md §1).

Official code: github.com/AntoAndGar/task_singular_vectors at a6c9718, ``src/utils/TSVM_utils.py``
``compute_and_sum_svd_mem_reduction`` (the ``TSVM`` config, not the eigendecomposition variant ``TSVM_2``).
Per matrix key (``merging.svd.is_matrix``; k = min(m, n)): each task keeps its top r = int(k/T) singular triplets
in task-major slots of a zero U [m, k], s [k], V [k, n] (unused slots stay zero); U and V are orthogonalised by
their polar factors and merged = polar(U) diag(s) polar(V), the original singular values kept. Every other float
tensor gets the mean of its task vectors; θ = θ₀ + α·merged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merging import svd
from merging.methods.base import StateDict, StaticMergeMethod, hyperparameter
from merging.modifiers import TaskVectorModifiers, merge_with_modifiers


def tsv_merge_matrix(key: str, taus: torch.Tensor) -> torch.Tensor:
    """Merge one key's stacked task matrices [T, m, n] into one [m, n] task matrix (algorithms_frontier.md §1, steps 1-4).

    r = int(k · (1/T)), as the official code writes it; task i fills slots i·r … (i+1)·r − 1, so with T·r < k
    the last slots stay zero and carry no weight. A frozen (exactly zero) task keeps its slots with the identity
    basis ``svd.thin_svd`` gives it: zero weight, but it still shapes the polar factors.
    """
    t, m, n = taus.shape
    k = min(m, n)
    r = int(k * (1 / t))
    u, s, vh = svd.thin_svd(taus)
    slots_u = u[:, :, :r].permute(1, 0, 2).reshape(m, t * r)
    slots_v = vh[:, :r, :].reshape(t * r, n)
    big_u = taus.new_zeros(m, k)
    big_s = taus.new_zeros(k)
    big_v = taus.new_zeros(k, n)
    big_u[:, : t * r] = slots_u
    big_s[: t * r] = s[:, :r].reshape(-1)
    big_v[: t * r] = slots_v
    return svd.polar(big_u) @ torch.diag(big_s) @ svd.polar(big_v)


def tsv_m(pretrained: Mapping[str, torch.Tensor], finetuned: list[Mapping[str, torch.Tensor]], scaling: float) -> StateDict:
    """TSV-M without the framework: θ = θ₀ + α·(TSV-merged matrices, mean elsewhere)."""
    return svd.merge_by_key(pretrained, finetuned, scaling, tsv_merge_matrix)


@dataclass(frozen=True)
class TsvMOwnParams:
    scaling: float = hyperparameter(1.0, "Scaling coefficient α applied once to the merged task vector, θ = θ₀ + α·merged "
                                         "(algorithms_frontier.md §1; FusionBench alpha 1; the official code picks it on validation "
                                         "from 0.1…3.0); any real number, negative subtracts.", unit="α")


@dataclass(frozen=True)
class TsvMParams(TaskVectorModifiers, TsvMOwnParams):
    """TSV-M's own hyperparameters, then DARE and LiNeS (``merging.modifiers``; §8, §9).

    With ``lines`` on, τ_MTL is the TSV-merged task vector (mean on non-matrices) and ``scaling`` is unused; LiNeS's paper does not
    run TSV-M.
    """


class TsvM(StaticMergeMethod):
    name = "tsv_m"
    title = "TSV-M (Task Singular Vectors: Merge)"
    paper_url = "https://arxiv.org/abs/2412.00081"
    Params = TsvMParams

    def merge_state_dicts(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]], params: TsvMParams) -> StateDict:
        return merge_with_modifiers(pretrained, finetuned, params, tsv_m, params.scaling)
