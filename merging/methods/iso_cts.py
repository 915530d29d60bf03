"""Iso-CTS, isotropic merging with common and task-specific subspaces (Marczak et al., ICML 2025, "No Task Left Behind",
arXiv 2502.04959, the Iso-CTS method section; recipe: algorithms_frontier.md §3).

Official code: github.com/danielm1405/iso-merging at d34010a, ``src/utils/iso.py`` ``iso_cts`` (README command and
FusionBench: ``common_space_fraction`` 0.8). Per matrix key (``merging.svd.is_matrix``; k = min(m, n)): the top c
singular triplets of M = Σ_k τ_k form the common space; each task's matrix with the common *left* space projected out
gives its top n triplets (task-major slots 0 … T·n − 1); the common triplets take the last c slots; U and V are
orthogonalised by polar factors and every slot gets one isotropic value, the mean of all k collected singular values.
Every other float tensor gets the mean of its task vectors; θ = θ₀ + α·merged.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merging import svd
from merging.errors import ConfigError
from merging.methods.base import StateDict, StaticMergeMethod, hyperparameter
from merging.modifiers import TaskVectorModifiers, merge_with_modifiers


def subspace_sizes(k: int, tasks: int, common_space_fraction: float) -> tuple[int, int]:
    """(c, n): common dims and dims per task, exactly as the official code computes them (algorithms_frontier.md §3):
    c₀ = int(k·F); c = k − round((k − c₀)/T)·T with Python's round (half to even); n = (k − c)/T. So c + T·n = k.
    E.g. k=768, T=8, F=0.8 -> (616, 19); k=17, T=4, F=0.6 -> (9, 2). c is negative when rounding up overshoots
    (tiny k, small F); the caller refuses that."""
    c0 = int(k * common_space_fraction)
    c = k - round((k - c0) / tasks) * tasks
    return c, int((k - c) / tasks)


def iso_cts_merge_matrix(key: str, taus: torch.Tensor, common_space_fraction: float) -> torch.Tensor:
    """Merge one key's stacked task matrices [T, m, n] into one [m, n] task matrix (algorithms_frontier.md §3, steps 1-5).

    A frozen (exactly zero) task, or one lying wholly in the common space, still fills its n slots (with the basis
    ``svd.thin_svd`` gives a zero matrix) and gets the isotropic value like every other slot.
    """
    t, m, n_cols = taus.shape
    k = min(m, n_cols)
    c, n = subspace_sizes(k, t, common_space_fraction)
    if c < 0:
        raise ConfigError(f"iso_cts: tensor {key!r} ({m}x{n_cols}, k={k}) with {t} tasks and common_space_fraction={common_space_fraction:g} "
                          f"gives a negative common space ({c}); raise common_space_fraction")
    u, s, vh = svd.thin_svd(taus.sum(dim=0))
    u_c, s_c, vh_c = u[:, :c], s[:c], vh[:c]
    specific = taus - u_c @ (u_c.T @ taus)
    u_t, s_t, vh_t = svd.thin_svd(specific)
    big_u = torch.cat([u_t[:, :, :n].permute(1, 0, 2).reshape(m, t * n), u_c], dim=1)
    big_s = torch.cat([s_t[:, :n].reshape(-1), s_c])
    big_v = torch.cat([vh_t[:, :n, :].reshape(t * n, n_cols), vh_c], dim=0)
    return big_s.mean() * (svd.polar(big_u) @ svd.polar(big_v))


def iso_cts(pretrained: Mapping[str, torch.Tensor], finetuned: list[Mapping[str, torch.Tensor]], scaling: float, common_space_fraction: float) -> StateDict:
    """Iso-CTS without the framework: θ = θ₀ + α·(common + task-specific isotropic merge on matrices, mean elsewhere)."""
    return svd.merge_by_key(pretrained, finetuned, scaling, lambda key, taus: iso_cts_merge_matrix(key, taus, common_space_fraction))


@dataclass(frozen=True)
class IsoCtsOwnParams:
    scaling: float = hyperparameter(1.0, "Scaling coefficient α applied once to the merged task vector, θ = θ₀ + α·merged "
                                         "(algorithms_frontier.md §3; FusionBench scaling_factor 1.0, its docs run 1.5; the official "
                                         "code picks it on validation from 0.1…3.0); any real number, negative subtracts.", unit="α")
    common_space_fraction: float = hyperparameter(0.8, "Fraction F of each matrix's k = min(m, n) singular directions given to the common "
                                                       "subspace of the summed task matrices, the rest split equally among the tasks "
                                                       "(algorithms_frontier.md §3; 0.8 in the official README command and FusionBench); "
                                                       "1 gives Iso-C.", unit="fraction", low=0.0, high=1.0)


@dataclass(frozen=True)
class IsoCtsParams(TaskVectorModifiers, IsoCtsOwnParams):
    """Iso-CTS's own hyperparameters, then DARE and LiNeS (``merging.modifiers``; §8, §9).

    With ``lines`` on, τ_MTL is the Iso-CTS merged task vector (mean on non-matrices) and ``scaling`` is unused; LiNeS's paper does
    not run Iso-CTS.
    """


class IsoCts(StaticMergeMethod):
    name = "iso_cts"
    title = "Iso-CTS (isotropic merging, common and task-specific subspaces)"
    paper_url = "https://arxiv.org/abs/2502.04959"
    Params = IsoCtsParams

    def merge_state_dicts(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]], params: IsoCtsParams) -> StateDict:
        def merge(p: Mapping[str, torch.Tensor], f: list[Mapping[str, torch.Tensor]], s: float) -> StateDict:
            return iso_cts(p, f, s, params.common_space_fraction)

        return merge_with_modifiers(pretrained, finetuned, params, merge, params.scaling)
