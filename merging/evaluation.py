"""Per-task accuracy of any ``MultiTaskModel``, batched on the device, and the tables built from it."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import pandas as pd
import torch
import torch.nn.functional as F

from merging.device import default_device
from merging.errors import ConfigError
from merging.model import MultiTaskModel
from merging.progress import ProgressFn, track
from merging.suites.base import Suite


@torch.no_grad()
def evaluate(
    model: MultiTaskModel,
    suite: Suite,
    tasks: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | None = None,
    progress: ProgressFn | None = None,
    split: str = "test",
) -> dict[str, dict[str, float]]:
    """``{task: {"accuracy": percent, "loss": mean cross-entropy}}`` on each task's labeled ``split`` (the test set;
    ``val`` only to choose a hyperparameter, ``merging.selection``).

    Raises ``ConfigError`` on NaN or Inf logits: a model that computes no numbers has no accuracy (argmax of NaN is 0).
    """
    tasks = suite.check_tasks(list(tasks) if tasks is not None else model.tasks)
    device = device or default_device()
    data = {t: suite.data[t].split(split) for t in tasks}
    model.eval().to(device)
    jobs = [(t, b) for t in tasks for b in range(0, len(data[t][0]), batch_size)]
    correct = dict.fromkeys(tasks, 0)
    loss = dict.fromkeys(tasks, 0.0)
    for task, start in track(jobs, desc="evaluating", progress=progress):
        all_images, all_labels = data[task]
        images = suite.data[task].preprocess(all_images[start : start + batch_size]).to(device)
        labels = all_labels[start : start + batch_size].to(device)
        logits = model.logits(images, task).float()
        if not torch.isfinite(logits).all():
            raise ConfigError(
                f"the model's logits on task {task!r} hold NaN or Inf values (its weights are too large: e.g. the scaling "
                "coefficient); nothing was evaluated or cached: use smaller hyperparameters"
            )
        correct[task] += int((logits.argmax(-1) == labels).sum())
        loss[task] += float(F.cross_entropy(logits, labels, reduction="sum"))
    return {t: {"accuracy": 100.0 * correct[t] / len(data[t][1]), "loss": loss[t] / len(data[t][1])} for t in tasks}


def accuracy_table(rows: Mapping[str, Mapping[str, float]], tasks: Sequence[str] | None = None) -> pd.DataFrame:
    """Methods x tasks accuracy (%) with an ``avg`` column, in the given row order."""
    df = pd.DataFrame(rows).T
    if tasks is not None:
        df = df[list(tasks)]
    df["avg"] = df.mean(axis=1)
    return df


def normalized_table(table: pd.DataFrame, reference: str = "individual") -> pd.DataFrame:
    """Accuracy / the reference row's accuracy, per task, in percent (normalized accuracy)."""
    tasks = [c for c in table.columns if c != "avg"]
    ref = table.loc[reference, tasks]
    norm = table[tasks].div(ref, axis=1) * 100.0
    norm["avg"] = norm.mean(axis=1)
    return norm
