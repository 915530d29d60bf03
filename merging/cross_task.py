"""Cross-task accuracy: the encoder adapted for task i read by the head of task j, on task j's test set.

The diagonal is the usual per-task accuracy. Off the diagonal it shows how task-specific each task's
encoder path is: a static merge has identical rows; Tinting's encoder tints, Surgery's modules or
per-task models make rows differ, and a tinted head j shows how much it relies on its own tint.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd
import torch

from merging.device import default_device
from merging.model import MultiTaskModel
from merging.suites.base import Suite


@torch.no_grad()
def cross_task_matrix(
    model: MultiTaskModel,
    suite: Suite,
    tasks: Sequence[str] | None = None,
    batch_size: int = 256,
    device: str | None = None,
) -> pd.DataFrame:
    """Accuracy (%) of ``model.heads[j](model.encode(x_j, i))`` on task j's labeled test set.

    Rows: the encoder's task i; columns: head and test set of task j. The heads are the model's
    own (the suite's fixed heads, or Tinting's tinted heads).
    """
    tasks = suite.check_tasks(list(tasks) if tasks is not None else model.tasks)
    device = device or default_device()
    model.eval().to(device)
    table = pd.DataFrame(0.0, index=pd.Index(tasks, name="encoder"), columns=pd.Index(tasks, name="head"))
    for j in tasks:
        data = suite.data[j]
        correct = dict.fromkeys(tasks, 0)
        for images, labels in data.batches("test", batch_size):
            images, labels = images.to(device), labels.to(device)
            for i in tasks:
                correct[i] += int((model.heads[j](model.encode(images, i)).argmax(-1) == labels).sum())
        for i in tasks:
            table.loc[i, j] = 100.0 * correct[i] / len(data.test_labels)
    return table
