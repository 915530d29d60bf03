"""What a method stores to serve every task, in bytes: the x axis of the accuracy-vs-cost view (issue #18).

A model's storage is every tensor inference needs, counted once (shared tensors are not counted twice):
float tensors at their element size, boolean masks at one bit per entry (packed, as TALL masks and EMR
store them; algorithms_frontier.md §6, §7). A module that knows better says so with ``stored_tensors()``:
the individual models store T encoder states, not the module that runs them; an AdaMerging-style merged
encoder stores one merged model once its coefficients are fixed, not θ₀ and every task vector.

*Extra* storage is the storage beyond one plain merged model of the same suite (the pretrained encoder's
size plus the heads), so every single merged model has 0, Surgery its adapters, WEMoE its routers and MLP
task vectors, TALL masks and EMR one float vector plus a bit per parameter per task.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch
from torch import nn

MB = 1e6


def stored_tensors(module: nn.Module) -> Iterator[torch.Tensor]:
    """Every tensor ``module`` needs at inference, its own ``stored_tensors()`` where it defines one."""
    own = getattr(module, "stored_tensors", None)
    if callable(own):
        yield from own()
        return
    yield from module.parameters(recurse=False)
    yield from module.buffers(recurse=False)
    for child in module.children():
        yield from stored_tensors(child)


def tensor_bits(tensor: torch.Tensor) -> int:
    """Bits to store ``tensor``: one per entry for a boolean mask, else its element size."""
    return tensor.numel() * (1 if tensor.dtype == torch.bool else 8 * tensor.element_size())


def stored_bytes(module: nn.Module) -> float:
    """Bytes of every distinct tensor ``module`` stores (``stored_tensors``); a tensor shared by two modules counts once."""
    seen: set[tuple[int, int, tuple[int, ...]]] = set()
    bits = 0
    with torch.no_grad():
        for t in stored_tensors(module):
            ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape))
            if ident not in seen:
                seen.add(ident)
                bits += tensor_bits(t)
    return bits / 8


def plain_model_bytes(pretrained: Mapping[str, torch.Tensor], heads: Mapping[str, Mapping[str, torch.Tensor]]) -> float:
    """Bytes of one plain merged model of a suite: the encoder's tensors and every task's head."""
    tensors = [*pretrained.values(), *(t for h in heads.values() for t in h.values())]
    return sum(tensor_bits(t) for t in tensors) / 8


def storage_report(model: nn.Module, pretrained: Mapping[str, torch.Tensor], heads: Mapping[str, Mapping[str, torch.Tensor]]) -> dict[str, float]:
    """``{"total_mb", "extra_mb"}``: the model's storage and what it adds to one plain merged model (MB = 10⁶ bytes)."""
    total = stored_bytes(model)
    return {"total_mb": total / MB, "extra_mb": max(total - plain_model_bytes(pretrained, heads), 0.0) / MB}
