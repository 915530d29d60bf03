"""WUDI-Merging (Cheng et al., "Whoever Started the Interference Should End It", ICML 2025,
https://arxiv.org/abs/2503.08099; algorithms_frontier.md §5).

Official code ``nathanielyvo/WUDI-Merging`` at dc3cd12 (``vit/wudi_main.py``: ``decompose_task_vectors``,
``get_redundant_task_vector``; ``vit/args.py``: ``--iter`` 300; ``vit/task_vectors.py``: ``apply_to``):

- Only the block linear weights are merged: keys containing ``attn.in_proj_weight``, ``attn.out_proj.weight``,
  ``mlp.c_fc.weight`` or ``mlp.c_proj.weight`` (the official substring test; q, k, v fused in one matrix).
  Every other key keeps θ₀: the merged task vector has no entry there and ``apply_to`` leaves it pretrained.
- Per key, τ_m starts at Σ_t τ_t and Adam (lr 1e-5, default betas and eps, weight decay 0, a fresh optimizer
  per key) runs 300 steps on L(τ_m) = Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F; then θ = θ₀ + 1·τ_m.
- A task whose matrix is exactly zero makes its term 0/0 (NaN in the official code); its term is zero, so
  it is left out of the loss (§5).

The gradient is computed in closed form, not by autograd: with A = Σ_t τ_tᵀτ_t/‖τ_t‖² (n×n) and
C = Σ_t (S − τ_t) τ_tᵀτ_t/‖τ_t‖² (S = Σ_t τ_t), ∇L(S + Δ) = 2(C + ΔA). Adam's steps depend only on the
gradients, so optimising Δ from 0 follows the official trajectory (up to rounding) at one m×n×n product per
step instead of 2T m×m×n ones (forward and backward): about 20x fewer multiply-adds over a ViT-B/32 block
(64x on ``mlp.c_fc``, 4x on ``mlp.c_proj``). Nothing is random: the result is a function of the checkpoints
alone (no seed is needed or used).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from merging import task_vectors as tv
from merging.device import default_device
from merging.errors import ConfigError
from merging.methods.base import StateDict, StaticMergeMethod, hyperparameter
from merging.modifiers import TaskVectorModifiers, merge_with_modifiers
from merging.progress import track

WUDI_KEYS = ("attn.in_proj_weight", "attn.out_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
"""Substrings of the keys WUDI optimises (``decompose_task_vectors``): the four linear weights of each block."""


@dataclass(frozen=True)
class WudiOwnParams:
    steps: int = hyperparameter(300, "Adam steps per block linear weight (--iter default 300 in the official vit/args.py; "
                                     "0 returns the initialisation, the sum of the task vectors).", unit="steps", low=0)
    lr: float = hyperparameter(1e-5, "Adam learning rate on the merged task vector (1e-5, betas (0.9, 0.999), no weight decay, "
                                     "in the official get_redundant_task_vector).", unit="lr", low=0.0, low_open=True)
    scaling: float = hyperparameter(1.0, "Coefficient on the optimised task vector; the official code applies it with "
                                         "scaling_coef = 1 (WUDI has no rescaling).", unit="λ")


@dataclass(frozen=True)
class WudiParams(TaskVectorModifiers, WudiOwnParams):
    """WUDI's own hyperparameters, then DARE and LiNeS (``merging.modifiers``; §8, §9).

    With ``lines`` on, τ_MTL is the optimised τ_m (zero outside the block linear weights) and ``scaling`` is unused; DARE changes
    the task vectors WUDI's loss is built on. Neither paper runs WUDI.
    """


def is_wudi_key(key: str) -> bool:
    """Whether WUDI optimises this key (the official substring test)."""
    return any(s in key for s in WUDI_KEYS)


def _tasks_in_loss(vectors: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zero task matrices and their loss weights 1/‖τ_t‖²_F (zero-norm tasks are dropped, §5)."""
    norms = vectors.reshape(vectors.shape[0], -1).square().sum(-1)
    live = norms > 0
    return vectors[live], 1.0 / norms[live]


def wudi_objective(merged: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """L(τ_m) = Σ_t ‖(τ_m − τ_t) τ_tᵀ‖²_F / ‖τ_t‖²_F over the non-zero tasks (``vectors``: [T, m, n])."""
    live, weights = _tasks_in_loss(vectors)
    inner = (merged.unsqueeze(0) - live) @ live.transpose(1, 2)
    return (inner.square().sum((1, 2)) * weights).sum()


def wudi_solve(vectors: torch.Tensor, steps: int = 300, lr: float = 1e-5) -> torch.Tensor:
    """τ_m for one weight matrix: ``steps`` Adam steps on ``wudi_objective`` from Σ_t τ_t (``vectors``: [T, m, n]).

    Runs on ``vectors``' device and dtype (give float32 or float64)."""
    if vectors.dim() != 3:
        raise ConfigError(f"WUDI needs task matrices stacked as [T, m, n], got shape {tuple(vectors.shape)}")
    if steps < 0 or not lr > 0:
        raise ConfigError(f"WUDI needs steps >= 0 and lr > 0, got steps={steps!r}, lr={lr!r}")
    start = vectors.sum(0)
    live, weights = _tasks_in_loss(vectors)
    if steps == 0 or live.shape[0] == 0:
        return start
    grams = live.transpose(1, 2) @ live  # τ_tᵀτ_t, [T', n, n]
    a = (grams * weights[:, None, None]).sum(0)
    c = ((start.unsqueeze(0) - live) @ grams * weights[:, None, None]).sum(0)
    del grams
    delta = torch.zeros_like(start, requires_grad=True)
    optimizer = torch.optim.Adam([delta], lr=lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    for _ in range(steps):
        with torch.no_grad():
            delta.grad = 2.0 * torch.addmm(c, delta, a)
        optimizer.step()
    return start + delta.detach()


def wudi_merge(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    steps: int = 300,
    lr: float = 1e-5,
    scaling: float = 1.0,
    device: str | torch.device = "cpu",
) -> StateDict:
    """θ₀ + scaling·τ_m on the block linear weights (each solved on ``device``), θ₀ on every other key."""
    if not finetuned:
        raise ConfigError("wudi needs at least one fine-tuned model")
    keys = [k for k in tv.float_keys(pretrained) if is_wudi_key(k)]
    if not keys:
        raise ConfigError(f"wudi found no block linear weight to merge: no float key contains any of {', '.join(WUDI_KEYS)} "
                          "(open_clip layout expected)")
    for k in keys:
        if pretrained[k].dim() != 2:
            raise ConfigError(f"wudi: {k!r} has shape {tuple(pretrained[k].shape)}, expected a 2-D weight matrix")
    out = {k: v.clone() for k, v in pretrained.items()}
    for k in track(keys, desc="WUDI"):
        work = torch.float64 if pretrained[k].dtype == torch.float64 else torch.float32
        base = pretrained[k].to(work)
        stacked = torch.stack([ft[k].to(work) - base for ft in finetuned]).to(device)
        out[k] = (base + scaling * wudi_solve(stacked, steps, lr).cpu()).to(pretrained[k].dtype)
    return out


class Wudi(StaticMergeMethod):
    name = "wudi"
    title = "WUDI-Merging"
    paper_url = "https://arxiv.org/abs/2503.08099"
    Params = WudiParams

    def merge_state_dicts(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]], params: WudiParams) -> StateDict:
        device = default_device()  # build has no device; the solve runs on CUDA when available (seconds for ViT-B/32, minutes on a CPU)
        def merge(p: Mapping[str, torch.Tensor], f: list[Mapping[str, torch.Tensor]], s: float) -> StateDict:
            return wudi_merge(p, f, params.steps, params.lr, s, device)

        return merge_with_modifiers(pretrained, finetuned, params, merge, params.scaling)
