"""Task vectors and the pure merge functions every static merge is built from (algorithms.md §1).

All functions act key by key on floating-point tensors and copy other tensors (integer, bool) from
the pretrained state dict; arithmetic runs in float32 (or float64 when given) and each result keeps
its input tensor's dtype.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

StateDict = dict[str, torch.Tensor]


def float_keys(state: Mapping[str, torch.Tensor]) -> list[str]:
    """The keys a merge acts on: floating-point tensors, in state-dict order."""
    return [k for k, v in state.items() if v.is_floating_point()]


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def task_vectors(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> list[StateDict]:
    """tau_k = theta_k - theta_0 over the floating-point tensors (algorithms.md §0)."""
    keys = float_keys(pretrained)
    return [{k: ft[k].to(_work_dtype(pretrained[k])) - pretrained[k].to(_work_dtype(pretrained[k])) for k in keys} for ft in finetuned]


def add_scaled(pretrained: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]], scales: Sequence[float]) -> StateDict:
    """theta = theta_0 + sum_k lambda_k tau_k; non-float tensors come from theta_0; dtypes kept."""
    out: StateDict = {}
    for k, v in pretrained.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        acc = v.to(_work_dtype(v)).clone()
        for s, tv in zip(scales, vectors, strict=True):
            acc += s * tv[k].to(acc.dtype)
        out[k] = acc.to(v.dtype)
    return out


def weight_averaging(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """theta = (1/T) sum_k theta_k = theta_0 + (1/T) sum_k tau_k (algorithms.md §1)."""
    n = len(finetuned)
    return add_scaled(pretrained, task_vectors(pretrained, finetuned), [1.0 / n] * n)


def task_arithmetic(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], scaling: float) -> StateDict:
    """theta = theta_0 + lambda sum_k tau_k (Ilharco et al. 2023; algorithms.md §1)."""
    n = len(finetuned)
    return add_scaled(pretrained, task_vectors(pretrained, finetuned), [scaling] * n)


def flatten(vector: Mapping[str, torch.Tensor], keys: Sequence[str]) -> torch.Tensor:
    return torch.cat([vector[k].reshape(-1) for k in keys])


def unflatten(flat: torch.Tensor, like: Mapping[str, torch.Tensor], keys: Sequence[str]) -> StateDict:
    out: StateDict = {}
    i = 0
    for k in keys:
        n = like[k].numel()
        out[k] = flat[i : i + n].reshape(like[k].shape)
        i += n
    return out


def trim_mask(flat: torch.Tensor, density: float) -> torch.Tensor:
    """The official TIES trim (``topk_values_mask``): keep |v| >= the k-th smallest |v|, k = d - int(d * density).

    With no ties that keeps int(d * density) + 1 entries; density 1 keeps everything. This is *not*
    ``topk(d * density)``.
    """
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    d = flat.numel()
    k = d - int(d * density)
    if k <= 0:
        return torch.ones_like(flat, dtype=torch.bool)
    threshold = flat.abs().kthvalue(k).values
    return flat.abs() >= threshold


def elect_sign(trimmed: torch.Tensor) -> torch.Tensor:
    """gamma = sign(sum_k trimmed_k); an exact zero takes the majority sign (official ``resolve_sign``)."""
    sign = torch.sign(trimmed.sum(dim=0))
    majority = torch.sign(sign.sum())
    sign[sign == 0] = majority
    return sign


def agreeing(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Each row's entries whose sign agrees with the elected sign; the rest set to zero."""
    return trimmed * torch.where(sign.unsqueeze(0) > 0, trimmed > 0, trimmed < 0)


def disjoint_sum(trimmed: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Sum (not mean: ``dis-sum``) of the entries whose sign agrees with the elected sign."""
    return agreeing(trimmed, sign).sum(dim=0)


def ties_vectors(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    density: float,
    per_tensor: bool = False,
) -> list[StateDict]:
    """Per-task TIES task vectors: trimmed and kept only where they agree with the elected sign.

    Their sum is the disjoint sum, so ``add_scaled(theta_0, ties_vectors, [scaling]*T)`` equals TIES
    (algorithms.md §1, step 5: how Surgery and AdaMerging++ reuse TIES).
    """
    vectors = task_vectors(pretrained, finetuned)
    keys = float_keys(pretrained)
    groups = [[k] for k in keys] if per_tensor else [keys]
    out: list[StateDict] = [{} for _ in vectors]
    for group in groups:
        stacked = torch.stack([flatten(tv, group) for tv in vectors])
        mask = torch.stack([trim_mask(row, density) for row in stacked])
        trimmed = stacked * mask
        for i, row in enumerate(agreeing(trimmed, elect_sign(trimmed))):
            out[i].update(unflatten(row, vectors[i], group))
    return out


def ties(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    scaling: float,
    density: float,
    per_tensor: bool = False,
) -> StateDict:
    """TIES-Merging (Yadav et al. 2023) as in the official code: trim, elect sign, disjoint sum, scale."""
    vectors = ties_vectors(pretrained, finetuned, density, per_tensor)
    summed = {k: sum(v[k] for v in vectors) for k in vectors[0]}
    return add_scaled(pretrained, [summed], [scaling])
