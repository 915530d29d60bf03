"""What a model's features of one task's sample set are: the leaf of the analysis layers.

``Features`` rows line up with test images (index, label, prediction), so two models' features of one
sample set compare row by row (algorithms.md §2). Extraction lives in ``representations``, measures in
``metrics`` and ``projection``, a run's cached features in ``artifacts``; all of them import this.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd
import torch

from merging.errors import ConfigError

FINAL = "final"


@dataclass
class Features:
    """One model's features of one task's sample set; row i is test image ``indices[i]``.

    ``embedding`` is the unnormalized ``encode`` output; ``blocks[l]`` the token-mean of block l's output.
    ``key`` names the cached set (``run_key/task/sample_set``), or is empty for uncached features.
    """

    task: str
    classnames: list[str]
    indices: torch.Tensor
    labels: torch.Tensor
    predictions: torch.Tensor
    embedding: torch.Tensor
    blocks: list[torch.Tensor] | None = None
    key: str = ""

    @property
    def correct(self) -> torch.Tensor:
        return self.predictions == self.labels

    @property
    def accuracy(self) -> float:
        return 100.0 * float(self.correct.double().mean())

    @property
    def layers(self) -> list[str]:
        return [FINAL] + [f"block{i}" for i in range(len(self.blocks or []))]

    def layer(self, layer: str | int = FINAL) -> torch.Tensor:
        """The feature matrix of ``layer``: ``"final"``, a block index, or ``"block<i>"``."""
        name = layer_name(layer)
        if name == FINAL:
            return self.embedding
        if not self.blocks:
            raise ConfigError(f"no per-block features for {self.key or self.task!r}; extract them with layers=True")
        i = int(name[len("block") :])
        if not 0 <= i < len(self.blocks):
            raise ConfigError(f"layer {layer!r} out of range; this model has blocks 0..{len(self.blocks) - 1}")
        return self.blocks[i]

    def layer_key(self, layer: str | int = FINAL) -> str:
        return f"{self.key}/{layer_name(layer)}" if self.key else ""

    def frame(self, model: str) -> pd.DataFrame:
        """The row metadata: model, sample, label, classname, prediction, predicted_classname, correct."""
        labels = self.labels.tolist()
        preds = self.predictions.tolist()
        return pd.DataFrame(
            {
                "model": model,
                "task": self.task,
                "sample": self.indices.tolist(),
                "label": labels,
                "classname": [self.classnames[i] for i in labels],
                "prediction": preds,
                "predicted_classname": [self.classnames[i] for i in preds],
                "correct": self.correct.tolist(),
            }
        )


def layer_name(layer: str | int) -> str:
    if isinstance(layer, int) or (isinstance(layer, str) and layer.isdigit()):
        return f"block{int(layer)}"
    if layer == FINAL or (isinstance(layer, str) and layer.startswith("block") and layer[5:].isdigit()):
        return layer
    raise ConfigError(f"unknown layer {layer!r}; use 'final', a block index, or 'block<i>'")
