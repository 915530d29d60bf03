"""CART, centred arithmetic with rank-reduced task vectors ("Revisiting Weight Averaging for Model Merging", Choi et al.,
arXiv 2412.12153, the CART method section; recipe: algorithms_frontier.md §4).

Official code: github.com/JH-GEECS/CART at 964cfd7, ``src/merging.py`` ``StaticMergeModule._merge_weights("CART")`` and
``_get_truncated_task_vectors``; defaults from ``configs/CART/ViT-b-32_8_CART.yaml`` (8 tasks: ``initial_rank_ratio``
0.12, ``prior`` 2.0). θ_avg = θ₀ + mean_k τ_k (weight averaging); centred task vectors τ̄_k = θ_k − θ_avg; on the
low-rank keys (``is_low_rank_key``) each τ̄_k keeps its top r = max(1, int(ρ·k)) singular triplets and
θ = θ_avg + λ·Σ_k LowRank_r(τ̄_k). On every other key the official code adds λ·Σ_k τ̄_k, which is exactly zero, so
those keys are θ_avg here. Non-float entries are copied from θ₀; each float entry keeps its dtype.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merging import svd
from merging.errors import ConfigError
from merging.methods.base import StateDict, StaticMergeMethod, hyperparameter
from merging.modifiers import TaskVectorModifiers, merge_with_modifiers


def is_low_rank_key(key: str, tensor: torch.Tensor) -> bool:
    """The official name test (``_get_truncated_task_vectors``): the key contains ``attn`` or ``mlp`` and neither ``ln``
    nor ``bias``; on open_clip that is ``attn.in_proj_weight``, ``attn.out_proj.weight``, ``mlp.c_fc.weight`` and
    ``mlp.c_proj.weight`` (not ``positional_embedding``, ``proj`` or ``conv1``). A float tensor that passes the name test
    but is not 2-D (no open_clip key is) keeps its full centred vectors, where the official code would fail."""
    return tensor.is_floating_point() and tensor.dim() == 2 and ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key)


def low_rank_sum(centred: torch.Tensor, rank_ratio: float) -> torch.Tensor:
    """Σ_k U_r diag(s_r) V_rᵀ of the stacked centred task matrices [T, m, n], r = max(1, int(ρ·k)); ρ = 0 gives zero,
    as the official code zeroes U, s and V then (so CART with ρ = 0 or ρ = 1 is weight averaging)."""
    if rank_ratio == 0.0:
        return centred.new_zeros(centred.shape[1:])
    u, s, vh = svd.thin_svd(centred)
    r = max(1, int(rank_ratio * s.shape[-1]))
    return torch.einsum("tmr,tr,trn->mn", u[:, :, :r], s[:, :r], vh[:, :r, :])


def cart(pretrained: Mapping[str, torch.Tensor], finetuned: list[Mapping[str, torch.Tensor]], scaling: float, rank_ratio: float) -> StateDict:
    """CART without the framework: θ = θ_avg + λ·Σ_k LowRank_r(τ_k − mean_j τ_j) on the low-rank keys, θ_avg elsewhere."""
    if not finetuned:
        raise ConfigError("no fine-tuned models to merge: give at least one task")
    out: StateDict = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            out[key] = base.clone()
            continue
        taus = svd.stacked_task_vectors(pretrained, finetuned, key)
        merged = base.to(taus.dtype).clone()
        for tau in taus:  # θ_avg accumulated as ``task_vectors.weight_averaging`` does: those keys equal it bit for bit
            merged += (1.0 / len(taus)) * tau
        if is_low_rank_key(key, base):
            with svd.named(key):
                merged = merged + scaling * low_rank_sum(taus - taus.mean(dim=0), rank_ratio)
        out[key] = merged.to(base.dtype)
    return out


@dataclass(frozen=True)
class CartOwnParams:
    scaling: float = hyperparameter(2.0, "Scaling coefficient λ on the summed low-rank centred task vectors, θ = θ_avg + λ·Σ_k LowRank(τ̄_k) "
                                         "(official config key prior: 2.0 for 8 ViT-B/32 tasks, 1.5 for 14, 1.9 for 20; "
                                         "algorithms_frontier.md §4); any real number.", unit="λ")
    rank_ratio: float = hyperparameter(0.12, "Fraction ρ of each matrix's k = min(m, n) singular triplets kept per centred task vector, "
                                             "r = max(1, int(ρ·k)) (official config key initial_rank_ratio: 0.12 for 8 ViT-B/32 tasks, "
                                             "0.16 for 14, 0.32 for 20; algorithms_frontier.md §4); 0 and 1 both give weight averaging.",
                                       unit="fraction", low=0.0, high=1.0)


@dataclass(frozen=True)
class CartParams(TaskVectorModifiers, CartOwnParams):
    """CART's own hyperparameters, then DARE and LiNeS (``merging.modifiers``; §8, §9).

    CART has no final coefficient (θ = θ₀ + τ_MTL with τ_MTL = mean_k τ_k + λ·Σ_k LowRank(τ̄_k)): with ``lines`` on, LiNeS scales
    that whole τ_MTL by depth and λ stays inside it; LiNeS's paper does not run CART.
    """


class Cart(StaticMergeMethod):
    name = "cart"
    title = "CART (centred arithmetic with low rank)"
    paper_url = "https://arxiv.org/abs/2412.12153"
    Params = CartParams

    def merge_state_dicts(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]], params: CartParams) -> StateDict:
        def merge(p: Mapping[str, torch.Tensor], f: list[Mapping[str, torch.Tensor]], final: float) -> StateDict:
            return cart(p, f, params.scaling, params.rank_ratio)  # no final coefficient: always called with 1.0

        return merge_with_modifiers(pretrained, finetuned, params, merge, 1.0)
