"""Choosing the scaling coefficient λ on a validation split (``scaling=auto``; issue #22, part 5).

The task-vectors protocol (Ilharco et al., ICLR 2023) and the official TSV-M, Iso-C/CTS and Consensus code pick
λ from a grid by the average accuracy on held-out *validation* data; merging benchmarks that report a fixed λ
(FusionBench's 0.3) do so because they have no validation split. Here: for every λ of the method's grid the run
builds the merged model at that λ and scores it on each task's labeled ``val`` split (``evaluation.evaluate``);
the λ with the best average accuracy over the tasks is chosen, ties going to the smallest λ (the first of the
ascending grid: the one closest to the pretrained model). The test split is never read; the chosen model is
then scored on it like any other run (``merging.runs``), and its result records the choice under ``selection``.

Methods stay unaware: a method takes ``scaling=auto`` when it is data-free and its ``Params`` has a float field
named ``scaling`` (``methods.base.accepts_auto``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from merging.evaluation import evaluate
from merging.model import MultiTaskModel
from merging.progress import ProgressFn, scaled
from merging.suites.base import Suite

TASK_VECTOR_GRID = tuple(round(0.05 * i, 2) for i in range(21))
"""λ ∈ {0, 0.05, …, 1}: the task-vectors paper's validation grid (``mlfoundations/task_vectors``, algorithms.md)."""
ALPHA_GRID = tuple(round(0.1 * i, 1) for i in range(1, 31))
"""α ∈ {0.1, 0.2, …, 3.0}: the official TSV-M and Iso-C/Iso-CTS validation grid (algorithms_frontier.md §0); CART's
priors (1.5 to 2.0, §4) lie inside it, and its repository publishes no grid."""
CONSENSUS_GRID = tuple(round(0.1 * i, 1) for i in range(1, 11))
"""α ∈ {0.1, …, 1.0}: the official Consensus merging grid (``nik-dim/tall_masks``, algorithms_frontier.md §6)."""
GRIDS: dict[str, tuple[float, ...]] = {"tsv_m": ALPHA_GRID, "iso_c": ALPHA_GRID, "iso_cts": ALPHA_GRID, "cart": ALPHA_GRID,
                                       "consensus": CONSENSUS_GRID}
"""Per-method grids where the method's own protocol names one; every other method uses ``TASK_VECTOR_GRID``."""
SPLIT = "val"
RULE = "best average validation accuracy over the tasks; ties go to the smallest value"


def grid_for(method: str) -> tuple[float, ...]:
    """The ascending grid ``scaling=auto`` searches for ``method``."""
    return GRIDS.get(method, TASK_VECTOR_GRID)


def choose(grid: Sequence[float], accuracy: Sequence[float]) -> float:
    """The grid value of the best accuracy; among equals, the smallest value."""
    best = max(accuracy)
    return min(v for v, a in zip(grid, accuracy, strict=True) if a == best)


def validation_images(suite: Suite) -> int:
    """How many validation images the suite's tasks hold; a task without a validation split is a one-line ``DataError``."""
    return sum(len(suite.data[t].split(SPLIT)[1]) for t in suite.tasks)


def select_scaling(
    build: Callable[[float], MultiTaskModel],
    suite: Suite,
    grid: Sequence[float],
    device: str | None = None,
    progress: ProgressFn | None = None,
) -> dict:
    """Score ``build(λ)`` on every task's validation split for each λ of ``grid``; the record a run keeps as ``selection``:

    ``{"hyperparameter": "scaling", "grid": [λ, …], "accuracy": [average val accuracy (%) per λ], "per_task":
    {task: [val accuracy (%) per λ]}, "chosen": λ, "split": "val", "images": val images read, "rule": RULE}``.
    """
    grid = [float(v) for v in grid]
    if not grid:
        raise ValueError("an empty grid has no value to choose")
    images = validation_images(suite)
    per_task: dict[str, list[float]] = {t: [] for t in suite.tasks}
    accuracy = []
    for i, value in enumerate(grid):
        model = build(value)
        step = scaled(progress, i / len(grid), (i + 1) / len(grid), f"λ = {value:g} on val: ")
        scores = evaluate(model, suite, suite.tasks, device=device, progress=step, split=SPLIT)
        for t in suite.tasks:
            per_task[t].append(scores[t]["accuracy"])
        accuracy.append(sum(s["accuracy"] for s in scores.values()) / len(scores))
        del model
    return {"hyperparameter": "scaling", "grid": grid, "accuracy": accuracy, "per_task": per_task, "chosen": choose(grid, accuracy),
            "split": SPLIT, "images": images, "rule": RULE}
