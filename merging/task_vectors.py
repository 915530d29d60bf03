"""Task vectors and the pure merge functions every static merge is built from (algorithms.md §1).

All functions act key by key on floating-point tensors and copy other tensors (integer, bool) from
the pretrained state dict; arithmetic runs in float32 (or float64 when given) and each result keeps
its input tensor's dtype.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

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


def add_scaled_finetuned(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], scales: Sequence[float]) -> StateDict:
    """``add_scaled(θ₀, task_vectors(θ₀, θ_k), scales)`` key by key, bit for bit, without holding every task vector at
    once (at ViT-B/32 size the 8 task vectors are 2.8 GB)."""
    out: StateDict = {}
    for k, v in pretrained.items():
        if not v.is_floating_point():
            out[k] = v.clone()
            continue
        base = v.to(_work_dtype(v))
        acc = base.clone()
        for s, ft in zip(scales, finetuned, strict=True):
            acc += s * (ft[k].to(base.dtype) - base)
        out[k] = acc.to(v.dtype)
    return out


def weight_averaging(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]]) -> StateDict:
    """theta = (1/T) sum_k theta_k = theta_0 + (1/T) sum_k tau_k (algorithms.md §1)."""
    n = len(finetuned)
    return add_scaled_finetuned(pretrained, finetuned, [1.0 / n] * n)


def task_arithmetic(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], scaling: float) -> StateDict:
    """theta = theta_0 + lambda sum_k tau_k (Ilharco et al. 2023; algorithms.md §1)."""
    n = len(finetuned)
    return add_scaled_finetuned(pretrained, finetuned, [scaling] * n)


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


def trim_threshold(flat: torch.Tensor, density: float) -> torch.Tensor | None:
    """The official TIES trim's threshold (``topk_values_mask``): the k-th smallest |v|, k = d - int(d * density); entries
    with |v| >= it are kept. With no ties that keeps int(d * density) + 1 entries; None (keep everything) when k <= 0.
    This is *not* ``topk(d * density)``."""
    if not 0.0 <= density <= 1.0:
        raise ValueError(f"density must be in [0, 1], got {density}")
    d = flat.numel()
    k = d - int(d * density)
    return None if k <= 0 else flat.abs().kthvalue(k).values


def trim_mask(flat: torch.Tensor, density: float) -> torch.Tensor:
    """Which entries of ``flat`` the official TIES trim keeps (``trim_threshold``)."""
    threshold = trim_threshold(flat, density)
    return torch.ones_like(flat, dtype=torch.bool) if threshold is None else flat.abs() >= threshold


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


def _ties_rows(
    pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], density: float, per_tensor: bool
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, its [T, ...] trimmed and sign-agreeing task-vector entries), one key at a time.

    The official code trims and elects over each task vector flattened whole; the same numbers come from three
    passes over the keys, so that at most one task vector (for its threshold) and one key's rows are held at a
    time instead of T flattened copies (12 GB at ViT-B/32 size). The majority sign that fills exact zeros is
    counted over the whole group, as ``elect_sign`` does on the flattened stack."""
    keys = float_keys(pretrained)

    def rows(k: str) -> torch.Tensor:
        base = pretrained[k].to(_work_dtype(pretrained[k]))
        return torch.stack([ft[k].to(base.dtype) - base for ft in finetuned])

    groups = [[k] for k in keys] if per_tensor else [keys]
    for group in groups:
        thresholds = []
        for ft in finetuned:
            flat = torch.cat([(ft[k].to(_work_dtype(pretrained[k])) - pretrained[k].to(_work_dtype(pretrained[k]))).reshape(-1) for k in group])
            thresholds.append(trim_threshold(flat, density))
            del flat

        def trimmed(k: str) -> torch.Tensor:
            r = rows(k)
            keep = [torch.ones_like(r[i], dtype=torch.bool) if t is None else r[i].abs() >= t for i, t in enumerate(thresholds)]
            return r * torch.stack(keep)

        votes = sum(int(torch.sign(trimmed(k).sum(dim=0)).sum()) for k in group)
        majority = float((votes > 0) - (votes < 0))
        for k in group:
            t = trimmed(k)
            sign = torch.sign(t.sum(dim=0))
            sign[sign == 0] = majority
            yield k, agreeing(t, sign)


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
    out: list[StateDict] = [{} for _ in finetuned]
    for k, rows in _ties_rows(pretrained, finetuned, density, per_tensor):
        for i, row in enumerate(rows):
            out[i][k] = row
    return out


def ties(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: Sequence[Mapping[str, torch.Tensor]],
    scaling: float,
    density: float,
    per_tensor: bool = False,
) -> StateDict:
    """TIES-Merging (Yadav et al. 2023) as in the official code: trim, elect sign, disjoint sum, scale."""
    summed = {k: sum(rows) for k, rows in _ties_rows(pretrained, finetuned, density, per_tensor)}
    return add_scaled(pretrained, [summed], [scaling])
