"""In-memory features of a frozen model over one task's test images, computed once (batched, no grad).

Surgery keeps every encoder frozen, so the base merge's and the individual model's features of a test
image never change while its modules train: computing them once turns each training step into a few
small matmuls instead of two encoder passes (algorithms.md §2).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from merging.model import MultiTaskModel
from merging.suites.base import Suite


@torch.no_grad()
def _collect(fn: Callable[[torch.Tensor], torch.Tensor | list[torch.Tensor]], suite: Suite, task: str, batch_size: int, device: str) -> list[torch.Tensor]:
    parts: list[list[torch.Tensor]] = []
    for images, _ in suite.data[task].batches("test", batch_size):
        out = fn(images.to(device))
        parts.append([out] if isinstance(out, torch.Tensor) else list(out))
    return [torch.cat([p[i] for p in parts]).float() for i in range(len(parts[0]))]


def encoded(model: MultiTaskModel, suite: Suite, task: str, batch_size: int = 256, device: str = "cpu") -> torch.Tensor:
    """``model.encode`` of every test image of ``task``, in test-set order: [N, d]."""
    return _collect(lambda x: model.encode(x, task), suite, task, batch_size, device)[0]


def block_means(model: MultiTaskModel, suite: Suite, task: str, batch_size: int = 256, device: str = "cpu") -> list[torch.Tensor]:
    """``model.block_features`` (token-mean of each block output) of every test image: L tensors [N, w]."""
    return _collect(lambda x: model.block_features(x, task), suite, task, batch_size, device)



