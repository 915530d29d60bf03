"""Shared machinery of test-time adaptation without labels: shuffled unlabeled batches, entropy, the loop.

AdaMerging and WEMoE minimise the entropy of each task's head on unlabeled test images; Surgery pulls
features toward the individual model's; Tinting self-labels from the experts (algorithms.md §1-4).
All of them draw batches the same way, from the test images, never their labels.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch

from merging.progress import ProgressFn, track
from merging.suites.base import Suite

TRAJECTORY_POINTS = 21
"""K: the moments of an adaptation a run records (the start, the end, and evenly spaced between)."""
ANALYSIS_HELP = ("ANALYSIS ONLY, READS TEST LABELS: also record every task's test accuracy at the trajectory's points "
                 "(the 'Why merges fail' page plots it). Off by default; nothing is ever chosen by it.")
Step = Callable[[int, bool], "float | tuple[float, Mapping[str, float]]"]
"""``step(i, update) -> objective`` or ``(objective, parts)``: one iteration's objective on its batch, then (if ``update``) its optimizer step."""


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


def trajectory_steps(steps: int, points: int = TRAJECTORY_POINTS) -> list[int]:
    """The recorded moments of an adaptation of ``steps`` updates: 0 (the initial model), ``steps`` (the final
    model) and evenly spaced between, each once (fewer than ``points`` when ``steps`` is small)."""
    if steps <= 0:
        return [0]
    return sorted({round(i * steps / (points - 1)) for i in range(points)})


class Trajectory:
    """The objective, its parts and what ``probes`` measure at K moments of one adaptation (``trajectory_steps``).

    Point s is the model after s updates. ``objective`` and ``parts`` there are the training objective on the batch
    of update s+1, measured before that update is taken; at the last point (s = steps) one more batch is measured
    without an update. Each probe (learned coefficients; test accuracy only with the analysis option, which reads
    test labels) is read on the same model; a probe returning a mapping is stored as ``{name: {key: [...]}}``.
    ``data`` is what a run keeps as ``result["info"]["trajectory"]``.
    """

    def __init__(self, steps: int, probes: Mapping[str, Callable[[], Any]] | None = None, points: int = TRAJECTORY_POINTS):
        self.steps = steps
        self.at = set(trajectory_steps(steps, points))
        self.probes = dict(probes or {})
        self.data: dict[str, Any] = {"step": [], "objective": [], "parts": {}}

    def probe(self) -> dict[str, Any]:
        return {name: fn() for name, fn in self.probes.items()}

    def add(self, step: int, objective: float, parts: Mapping[str, float], probed: Mapping[str, Any]) -> None:
        self.data["step"].append(step)
        self.data["objective"].append(float(objective))
        for k, v in parts.items():
            self.data["parts"].setdefault(k, []).append(float(v))
        for name, value in probed.items():
            if isinstance(value, Mapping):
                for k, v in value.items():
                    self.data.setdefault(name, {}).setdefault(k, []).append(v)
            else:
                self.data.setdefault(name, []).append(value)


def accuracy_probe(model: torch.nn.Module, suite: Suite, device: str) -> Callable[[], dict[str, float]]:
    """Every task's test accuracy (%) of ``model`` as a run evaluates it (reads test LABELS: the analysis option only);
    the model is put back in training mode afterwards."""
    from merging.evaluation import evaluate

    def probe() -> dict[str, float]:
        scores = evaluate(model, suite, device=device)
        model.train()
        return {t: s["accuracy"] for t, s in scores.items()}

    return probe


def optimize(
    steps: int,
    step: Step,
    progress: ProgressFn | None = None,
    desc: str = "adapting",
    log_every: int = 10,
    trajectory: Trajectory | None = None,
) -> list[float]:
    """Run ``step(i, True)`` for ``steps`` iterations with a progress bar; returns the loss curve (every ``log_every``).

    With a ``trajectory``, its probes are read before the iterations it records, and after the last one the final
    model's objective is measured once more by ``step(steps - 1, False)`` (no update, no gradient)."""
    losses: list[float] = []
    for i in track(range(steps), desc=desc, progress=progress):
        probed = trajectory.probe() if trajectory is not None and i in trajectory.at else None
        loss, parts = _split(step(i, True))
        if probed is not None:
            trajectory.add(i, loss, parts, probed)
        if i % log_every == 0 or i == steps - 1:
            if not torch.isfinite(torch.tensor(loss)):
                raise FloatingPointError(f"{desc}: loss became {loss} at step {i}; lower the learning rate")
            losses.append(float(loss))
    if trajectory is not None:
        probed = trajectory.probe()
        trajectory.add(steps, *_split(step(max(steps - 1, 0), False)), probed)
    return losses


def _split(out: float | tuple[float, Mapping[str, float]]) -> tuple[float, Mapping[str, float]]:
    return (float(out[0]), out[1]) if isinstance(out, tuple) else (float(out), {})
