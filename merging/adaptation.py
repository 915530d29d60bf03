"""Shared machinery of test-time adaptation without labels: shuffled unlabeled batches, entropy, the loop.

AdaMerging and WEMoE minimise the entropy of each task's head on unlabeled test images; Surgery pulls
features toward the individual model's; Tinting self-labels from the experts (algorithms.md §1-4).
All of them draw batches the same way, from the test images, never their labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from merging.progress import ProgressFn, track
from merging.suites.base import Suite


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of softmax(logits) over the batch."""
    logp = logits.float().log_softmax(dim=-1)
    return -(logp.exp() * logp).sum(dim=-1).mean()


def unlabeled_batches(suite: Suite, task: str, batch_size: int, generator: torch.Generator, device: str = "cpu") -> Iterator[torch.Tensor]:
    """Endless freshly shuffled passes over a task's test images (labels never touched)."""
    data = suite.data[task]
    n = len(data.test_images)
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield data.preprocess(data.test_images[order[i : i + batch_size]]).to(device)


def unlabeled_indices(n: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled index batches over n items (for training on cached features)."""
    while True:
        order = torch.randperm(n, generator=generator)
        for i in range(0, n - batch_size + 1 if n >= batch_size else 1, batch_size):
            yield order[i : i + batch_size]


def optimize(
    steps: int,
    step: Callable[[int], float],
    progress: ProgressFn | None = None,
    desc: str = "adapting",
    log_every: int = 10,
) -> list[float]:
    """Run ``step(i) -> loss`` for ``steps`` iterations with a progress bar; returns the loss curve (every ``log_every``)."""
    losses: list[float] = []
    for i in track(range(steps), desc=desc, progress=progress):
        loss = step(i)
        if i % log_every == 0 or i == steps - 1:
            if not torch.isfinite(torch.tensor(loss)):
                raise FloatingPointError(f"{desc}: loss became {loss} at step {i}; lower the learning rate")
            losses.append(float(loss))
    return losses
