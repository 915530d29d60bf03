"""DARE and LiNeS: modifiers of the task vectors that a static merge takes as options, not methods of their own
(issue #21; algorithms_frontier.md §8, §9).

- **DARE** (Drop And REscale; Yu et al., "Language Models are Super Mario", ICML 2024, https://arxiv.org/abs/2311.03099;
  official ``yule-BUAA/MergeLM`` ``model_merging_methods/mask_weights_utils.py`` ``mask_input_with_mask_rate`` with
  ``mask_strategy="random"``, ``use_rescale=True``, ``weight_format="delta_weight"``). Before the merge, every entry of
  every task vector τ_k (all float tensors: MergeLM's ``TaskVector`` takes every parameter not excluded by a name regex,
  and the vision runs exclude none) is dropped with probability p and the survivors are divided by 1 − p:
  τ̃_k = τ_k ⊙ (1 − m_k) / (1 − p), m_k ~ Bernoulli(p) entrywise. As MergeLM's ``mask_model_weights``, the method then
  receives θ̃_k = θ₀ + τ̃_k in place of θ_k and forms its own task vectors from them. E[τ̃_k] = τ_k; p = 0 is the identity.
- **LiNeS** (Layer-increasing Network Scaling; Wang et al., ICLR 2025, https://arxiv.org/abs/2410.17146; official
  ``wang-kee/LiNeS`` ``src/eval/eval.py`` ``LiNeS_scaling`` and ``evaluate``, ``src/eval/aggregation.py``
  ``create_task_vector``). After the merge, the method's multi-task vector τ_MTL (its merged task vector before any final
  coefficient) is scaled by depth: a key of block l of L gets λ(l) = α + β·l/(L − 1); every key outside the blocks
  (``class_embedding``, ``positional_embedding``, ``conv1``, ``ln_pre``, ``ln_post``, ``proj``) gets α. Then
  θ = θ₀ + λ·τ_MTL: LiNeS *replaces* the method's final scaling coefficient, as in the official ``evaluate`` (it applies
  the scaled vector with ``scaling_coef=1.0``). Multi-task α = (‖Σ_k τ_k‖₁ / ‖τ_MTL‖₁)·(1/T), so 1/T for task arithmetic.

Both act on the float keys only; other entries come from θ₀ as in every merge. A method takes them with one line: its
``Params`` inherits ``TaskVectorModifiers`` and its ``merge_state_dicts`` returns ``merge_with_modifiers(...)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from merging import task_vectors as tv
from merging.errors import ConfigError

StateDict = dict[str, torch.Tensor]
ScaledMerge = Callable[[Mapping[str, torch.Tensor], list[Mapping[str, torch.Tensor]], float], StateDict]
"""``(θ₀, [θ_k], α) -> θ₀ + α·τ_MTL``: a method's merge with its final coefficient α as the argument; every other
hyperparameter is bound. It must act on task vectors only (θ_k − θ₀), as every merge here does."""

BLOCK_KEY = re.compile(r"(?:^|\.)transformer\.resblocks\.(\d+)\.")
"""The block index of an open_clip ViT key (``transformer.resblocks.<i>.``, with or without a ``visual.`` or
``model.visual.`` prefix). On open_clip ViT keys it gives the same block as the official test (the first ``.{l}.``
substring for l = 0 … L−1, whose dots keep ``.1.`` from matching ``.11.``): no other key segment is a number."""


def _option(default: Any, help: str, unit: str = "", low: float | None = None, high: float | None = None, high_open: bool = False) -> Any:
    """A ``Params`` field with the metadata ``merging.methods.base.hyperparameter`` writes (help, unit, range), so the app's
    widgets, ``list-methods`` and ``docs/methods.md`` show it. Not imported from there: the methods import this module, and
    importing ``merging.methods.base`` from here would run the methods package first (an import cycle)."""
    meta = {"help": help, "unit": unit, "low": low, "high": high, "low_open": False, "high_open": high_open, "choices": None}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class TaskVectorModifiers:
    """The DARE and LiNeS options of a static merge; the defaults switch both off (the merge is bit-identical to the
    method without them). A method's ``Params`` inherits this class after its own fields' class, so its own
    hyperparameters are listed first: ``class TiesParams(TaskVectorModifiers, TiesOwnParams)``."""

    dare: float = _option(0.0, "DARE drop rate p: before merging, each entry of each task vector is dropped with probability p and "
                               "the survivors are divided by 1 − p (Yu et al., ICML 2024; MergeLM mask_weights_utils.py; "
                               "algorithms_frontier.md §8); 0 = off. The paper searches 0.1…0.9; FusionBench's default is 0.5.",
                          unit="p", low=0.0, high=1.0, high_open=True)
    dare_seed: int = _option(0, "Seed of the torch.Generator that draws DARE's masks, task by task in input order and tensor by tensor "
                                "in sorted key order (MergeLM seeds the global generator once, torch.manual_seed; "
                                "algorithms_frontier.md §8); part of the run's identity; unused when dare = 0.", unit="seed", low=0)
    lines: bool = _option(False, "LiNeS: scale the merged task vector τ_MTL by depth, λ(l) = α + β·l/(L−1) on block l of L and α "
                                 "outside the blocks, then θ = θ₀ + λ·τ_MTL: this replaces the method's scaling coefficient "
                                 "(Wang et al., ICLR 2025; wang-kee/LiNeS src/eval/eval.py; algorithms_frontier.md §9). "
                                 "Needs open_clip ViT keys.", unit="LiNeS")
    lines_alpha: float | None = _option(None, "LiNeS α, the scale of the first block and of every key outside the blocks; empty "
                                              "(none) = the paper's multi-task rule α = ‖Σ_k τ_k‖₁ / (T·‖τ_MTL‖₁), i.e. 1/T for task "
                                              "arithmetic (aggregation.py, eval.py; algorithms_frontier.md §9). α = 1 with β = 0 "
                                              "gives the merge at scaling 1.", unit="α")
    lines_beta: float = _option(0.5, "LiNeS β, how much more the last block is scaled than the first (λ(L−1) = α + β). The official "
                                     "code picks it on validation from 0.1…1.0 (TIES 0.1…1.5; algorithms_frontier.md §9); 0.5 is near "
                                     "that grid's middle, not a published value; negative β scales the deep blocks less.", unit="β")


MODIFIER_FIELDS = ("dare", "dare_seed", "lines", "lines_alpha", "lines_beta")
"""The hyperparameters ``TaskVectorModifiers`` adds to a method's own (a page may group them)."""


# ----------------------------------------------------------------------------------------------------------- DARE (§8)


def dare(vectors: Sequence[Mapping[str, torch.Tensor]], drop_rate: float, seed: int) -> list[StateDict]:
    """τ̃_k = τ_k ⊙ (1 − m_k) / (1 − p) with m_k ~ Bernoulli(p) per entry, for every tensor of every task vector.

    As MergeLM's ``mask_input_with_mask_rate`` (random strategy, rescale on): the mask is
    ``torch.bernoulli(torch.full_like(τ, p))``, the survivors are *divided* by 1 − p. The random numbers come from one CPU
    ``torch.Generator`` seeded with ``seed``, drawn task by task in the given order and tensor by tensor in *sorted* key
    order, so one seed gives one set of masks on any device and whatever order a file lists its keys in (a suite's state
    dict and the same weights read from a safetensors file differ there). On CPU this is the stream MergeLM draws after
    ``torch.manual_seed(seed)`` (its ``set_random_seed``) when it masks the same tensors in the same order; MergeLM goes in
    ``named_parameters`` order. p = 0 returns the vectors unchanged (bit for bit).
    """
    if not 0.0 <= drop_rate < 1.0:
        raise ConfigError(f"hyperparameter 'dare' = {drop_rate!r} is out of range; allowed: 0 <= dare < 1 "
                          "(the drop rate p; 1 would drop everything)")
    if not 0 <= seed < 2**64:
        raise ConfigError(f"hyperparameter 'dare_seed' = {seed!r} is out of range; allowed: 0 <= dare_seed < 2**64")
    generator = torch.Generator().manual_seed(seed)
    out: list[StateDict] = []
    for vector in vectors:
        dropped: StateDict = {}
        for key in sorted(vector):
            t = vector[key]
            mask = torch.bernoulli(torch.full(t.shape, drop_rate, dtype=t.dtype), generator=generator).to(t.device)
            dropped[key] = torch.div(t * (1 - mask), 1 - drop_rate)
        out.append({k: dropped[k] for k in vector})
    return out


def dare_finetuned(
    pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], drop_rate: float, seed: int
) -> list[StateDict]:
    """θ̃_k = θ₀ + DARE(θ_k − θ₀) on the float keys, in each fine-tuned tensor's dtype; other entries copied from θ_k.

    MergeLM's ``mask_model_weights`` (``weight_format="delta_weight"``) does the same: it returns θ₀ + 1.0·τ̃_k, copies it
    into the fine-tuned model, and the merge then forms its task vectors from that model again."""
    vectors = dare(tv.task_vectors(pretrained, finetuned), drop_rate, seed)
    out: list[StateDict] = []
    for ft, dropped in zip(finetuned, vectors, strict=True):
        out.append({k: (pretrained[k].to(dropped[k].dtype) + dropped[k]).to(v.dtype) if k in dropped else v for k, v in ft.items()})
    return out


# ---------------------------------------------------------------------------------------------------------- LiNeS (§9)


def block_index(key: str) -> int | None:
    """The residual block of an open_clip ViT key (``transformer.resblocks.<i>.``), or None outside the blocks."""
    match = BLOCK_KEY.search(key)
    return int(match.group(1)) if match else None


def count_blocks(keys: Iterable[str]) -> int:
    """L = 1 + the largest block index among ``keys`` (the official code hard-codes 12 for ViT-B, 24 for ViT-L/14:
    the same numbers on those models). A state dict without blocks is refused in one line."""
    indices = [i for i in map(block_index, keys) if i is not None]
    if not indices:
        raise ConfigError("hyperparameter 'lines': LiNeS scales by depth and needs open_clip ViT keys (transformer.resblocks.<i>.), "
                          "but no key of this state dict has one; set lines=false")
    return max(indices) + 1


def lines_scalings(keys: Iterable[str], alpha: float, beta: float, num_blocks: int | None = None) -> dict[str, float]:
    """λ per key: α + β·l/(L − 1) for a key of block l (official ``LiNeS_scaling``, the same Python float expression),
    α for every key outside the blocks and for a block index ≥ L (the official test matches none then).

    L defaults to ``count_blocks(keys)``. With L = 1 the one block gets α (the official formula divides by zero)."""
    keys = list(keys)
    total = count_blocks(keys) if num_blocks is None else num_blocks
    scalings = {}
    for key in keys:
        layer = block_index(key)
        if layer is None or layer >= total:
            scalings[key] = alpha
        else:
            scalings[key] = alpha + beta * (layer / (total - 1)) if total > 1 else alpha
    return scalings


def lines(vector: Mapping[str, torch.Tensor], alpha: float, beta: float, num_blocks: int | None = None) -> StateDict:
    """One task vector (a merged τ_MTL, or one task's residual for single-task editing, where α = s, β = 1 − s) with each
    key multiplied by its ``lines_scalings`` λ. α = 1, β = 0 returns it unchanged."""
    scalings = lines_scalings(vector, alpha, beta, num_blocks)
    return {k: v * scalings[k] for k, v in vector.items()}


def multitask_alpha(vectors: Sequence[Mapping[str, torch.Tensor]], merged: Mapping[str, torch.Tensor]) -> float:
    """The official multi-task α = (‖Σ_k τ_k‖₁ / ‖τ_MTL‖₁)·(1/T) over all entries (``evaluate``: ``norm_summed_tvs /
    norm_mtv / num_tasks``), the norms accumulated per key in float64. A zero τ_MTL gives 0 (θ₀ whatever α is)."""
    summed = sum(float(torch.stack([v[k] for v in vectors]).sum(0).abs().sum(dtype=torch.float64)) for k in merged)
    norm_mtl = sum(float(t.abs().sum(dtype=torch.float64)) for t in merged.values())
    return 0.0 if norm_mtl == 0.0 else (summed / norm_mtl) * 1 / len(vectors)


# ------------------------------------------------------------------------------------------------ the one method hook


def merge_with_modifiers(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Mapping[str, Mapping[str, torch.Tensor]],
    params: TaskVectorModifiers,
    merge: ScaledMerge,
    scaling: float,
) -> StateDict:
    """A static method's merge with its DARE and LiNeS options: ``merge(θ₀, [θ_k], scaling)`` when both are off (the
    method's own call, bit for bit).

    DARE replaces each θ_k by θ₀ + DARE(τ_k) before the merge. LiNeS needs the unscaled τ_MTL: the merge runs on the task
    vectors with a zero "pretrained" state and coefficient 1, which gives exactly τ_MTL because every merge here depends
    on θ_k − θ₀ only; then θ = θ₀ + λ·τ_MTL with α from ``multitask_alpha`` (of the task vectors the method received, DARE
    applied) unless ``lines_alpha`` is set. ``scaling`` is the method's final coefficient, which LiNeS replaces."""
    if not finetuned:
        raise ConfigError("no fine-tuned models to merge: give at least one task")
    models: list[Mapping[str, torch.Tensor]] = list(finetuned.values())
    if params.dare > 0:
        models = dare_finetuned(pretrained, models, params.dare, params.dare_seed)
    if not params.lines:
        return merge(pretrained, models, scaling)
    count_blocks(tv.float_keys(pretrained))  # refuse a state dict without blocks before the merge runs
    vectors = tv.task_vectors(pretrained, models)
    zeros = {k: torch.zeros_like(v) for k, v in vectors[0].items()}
    merged = merge(zeros, vectors, 1.0)
    del zeros
    alpha = multitask_alpha(vectors, merged) if params.lines_alpha is None else params.lines_alpha
    return tv.add_scaled(pretrained, [lines(merged, alpha, params.lines_beta)], [1.0])
