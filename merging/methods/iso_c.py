"""Iso-C, isotropic merging in the common subspace (Marczak et al., ICML 2025, "No Task Left Behind", arXiv 2502.04959,
the Iso-C method section; recipe: algorithms_frontier.md §2).

Official code: github.com/danielm1405/iso-merging at d34010a, ``src/utils/iso.py`` ``iso_c``. Per matrix key
(``merging.svd.is_matrix``): M = Σ_k τ_k (the sum, not the mean), thin SVD M = U diag(σ) Vᵀ, every σ_i replaced by
the mean of all k of them (zeros included): merged = σ̄·U Vᵀ, a flat spectrum. Every other float tensor gets the mean
of its task vectors; θ = θ₀ + α·merged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merging import svd
from merging.methods.base import StateDict, StaticMergeMethod, hyperparameter
from merging.modifiers import TaskVectorModifiers, merge_with_modifiers


def iso_c_merge_matrix(key: str, taus: torch.Tensor) -> torch.Tensor:
    """σ̄·U Vᵀ of the summed task matrices [T, m, n] -> [m, n]: the sum's singular directions with one isotropic
    value, the mean of its k singular values (algorithms_frontier.md §2)."""
    u, s, vh = svd.thin_svd(taus.sum(dim=0))
    return s.mean() * (u @ vh)


def iso_c(pretrained: Mapping[str, torch.Tensor], finetuned: list[Mapping[str, torch.Tensor]], scaling: float) -> StateDict:
    """Iso-C without the framework: θ = θ₀ + α·(isotropic sum on matrices, mean elsewhere)."""
    return svd.merge_by_key(pretrained, finetuned, scaling, iso_c_merge_matrix)


@dataclass(frozen=True)
class IsoCOwnParams:
    scaling: float = hyperparameter(1.0, "Scaling coefficient α applied once to the merged task vector, θ = θ₀ + α·merged "
                                         "(algorithms_frontier.md §2; FusionBench scaling_factor 1.0, its docs run 1.5; the official "
                                         "code picks it on validation from 0.1…3.0); any real number, negative subtracts.", unit="α")


@dataclass(frozen=True)
class IsoCParams(TaskVectorModifiers, IsoCOwnParams):
    """Iso-C's own hyperparameters, then DARE and LiNeS (``merging.modifiers``; §8, §9).

    With ``lines`` on, τ_MTL is the Iso-C merged task vector (mean on non-matrices) and ``scaling`` is unused; LiNeS's paper does
    not run Iso-C.
    """


class IsoC(StaticMergeMethod):
    name = "iso_c"
    title = "Iso-C (isotropic merging, common subspace)"
    paper_url = "https://arxiv.org/abs/2502.04959"
    Params = IsoCParams

    def merge_state_dicts(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]], params: IsoCParams) -> StateDict:
        return merge_with_modifiers(pretrained, finetuned, params, iso_c, params.scaling)
