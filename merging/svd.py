"""Shared SVD machinery of the SVD-family merges (TSV-M, Iso-C, Iso-CTS, CART; algorithms_frontier.md §0).

The official repositories (task_singular_vectors a6c9718, iso-merging d34010a, CART 964cfd7) all work key by key
on open_clip state dicts. What they share lives here, once:

- ``is_matrix``: which tensors get the SVD treatment (2-D, key without ``text_projection``);
- ``stacked_task_vectors``: the T task vectors of one key, stacked, in the working dtype;
- ``thin_svd``: one batched ``torch.linalg.svd(full_matrices=False)`` over the stacked matrices, with the
  zero-matrix rule (a frozen tensor's exactly-zero task vector gets the basis CPU LAPACK returns);
- ``polar``: orthogonalisation as the polar factor P Qᵀ of a thin SVD (not QR);
- ``merge_by_key``: the frame TSV-M and the Iso methods share: matrices merged by the method, every other
  float tensor the mean of its task vectors, θ = θ₀ + α·merged, non-float entries copied, dtypes kept.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch

from merging.errors import CheckpointError, ConfigError

StateDict = dict[str, torch.Tensor]
MatrixMerge = Callable[[str, torch.Tensor], torch.Tensor]
"""``(key, stacked [T, m, n] task matrices) -> merged [m, n] task matrix`` in the working dtype."""


def is_matrix(key: str, tensor: torch.Tensor) -> bool:
    """A float tensor with exactly two dims whose key does not contain ``text_projection`` (the official substring
    test in TSV-M's and Iso's code). In open_clip the fused ``attn.in_proj_weight`` is one matrix, and
    ``positional_embedding`` and ``proj`` are matrices; ``conv1.weight`` (4-D), biases and scalars are not."""
    return tensor.is_floating_point() and tensor.dim() == 2 and "text_projection" not in key


def work_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 stays float64; everything else (float32, float16, bfloat16) is computed in float32 (§0 dtype rule)."""
    return torch.float64 if tensor.dtype == torch.float64 else torch.float32


def stacked_task_vectors(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], key: str) -> torch.Tensor:
    """[T, *shape]: τ_k = θ_k − θ₀ of one float key for every task, in ``work_dtype``. One key at a time, so a
    ViT-B/32 merge never holds T whole task vectors at once."""
    base = pretrained[key]
    dt = work_dtype(base)
    return torch.stack([ft[key].to(dt) - base.to(dt) for ft in finetuned])


def thin_svd(matrices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Batched thin SVD of [..., m, n]: U [..., m, k], S [..., k], Vh [..., k, n] with k = min(m, n).

    A matrix that is exactly zero (a frozen tensor's task vector) keeps its place (T is not reduced) with the
    basis CPU LAPACK (torch and numpy, float32 and float64) returns for it: U the leading k columns of the
    identity, S zeros, Vh the leading k rows of the identity. Setting it explicitly makes a GPU (cuSOLVER)
    give the CPU's numbers (algorithms_frontier.md §0, zero task vectors).
    """
    if not torch.isfinite(matrices).all():  # LAPACK either raises or returns NaN here, depending on the shape
        raise torch.linalg.LinAlgError("the input holds NaN or Inf values")
    u, s, vh = torch.linalg.svd(matrices, full_matrices=False)
    zero = (matrices == 0).flatten(-2).all(-1)
    if zero.any():
        m, n = matrices.shape[-2:]
        k = min(m, n)
        eye_u = torch.eye(m, k, dtype=u.dtype, device=u.device)
        eye_v = torch.eye(k, n, dtype=vh.dtype, device=vh.device)
        u, s, vh = u.clone(), s.clone(), vh.clone()
        u[zero], s[zero], vh[zero] = eye_u, 0.0, eye_v
    return u, s, vh


@contextmanager
def named(key: str) -> Iterator[None]:
    """Turn a failed SVD (non-finite input, e.g. task vectors that overflow float32, or LAPACK not converging) into one
    line naming the tensor."""
    try:
        yield
    except torch.linalg.LinAlgError as e:
        raise CheckpointError(f"tensor {key!r}: the SVD failed ({str(e).splitlines()[0]}); check that its weights and task vectors are finite") from None


def polar(a: torch.Tensor) -> torch.Tensor:
    """The orthogonal polar factor P Qᵀ of a = P Σ Qᵀ (thin SVD): the closest matrix with orthonormal columns
    (rows, if wide) to ``a``. The official TSV-M and Iso-CTS code orthogonalise their concatenated bases this way,
    not by QR / Gram-Schmidt (task_singular_vectors ``compute_and_sum_svd_mem_reduction``; iso-merging ``iso_cts``)."""
    p, _, qh = thin_svd(a)
    return p @ qh


def merge_by_key(pretrained: Mapping[str, torch.Tensor], finetuned: Sequence[Mapping[str, torch.Tensor]], scaling: float, merge_matrix: MatrixMerge) -> StateDict:
    """θ = θ₀ + α·merged on every float key, where merged is ``merge_matrix(key, τ)`` on matrices (``is_matrix``)
    and the mean of the task vectors on every other float tensor (0-, 1-, 3-, 4-D and ``text_projection``); α is
    applied once, at the end. Non-float entries are copied from θ₀; each float entry keeps its dtype
    (algorithms_frontier.md §0: non-matrix rule, final step; the mean, not the sum, as in the official code)."""
    if not finetuned:
        raise ConfigError("no fine-tuned models to merge: give at least one task")
    from merging.device import default_device

    device = default_device()  # the SVDs on the GPU when there is one: thin_svd sets the zero-task basis itself
    out: StateDict = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            out[key] = base.clone()
            continue
        taus = stacked_task_vectors(pretrained, finetuned, key)
        if is_matrix(key, base):
            with named(key):
                merged = merge_matrix(key, taus.to(device)).to(taus.device)
        else:
            merged = taus.mean(dim=0)
        out[key] = (base.to(taus.dtype) + scaling * merged).to(base.dtype)
    return out
