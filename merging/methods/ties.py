"""TIES-Merging as in the official code: global trim (top density by |value|), sign election, disjoint *sum*,
then theta_0 + scaling * merged (algorithms.md §1; FusionBench: scaling 0.3, threshold 20, merge_func sum)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merging import task_vectors as tv
from merging.errors import ConfigError
from merging.methods.base import StateDict, StaticMergeMethod


@dataclass(frozen=True)
class TiesParams:
    scaling: float = 0.3
    """lambda applied to the disjoint sum (0.3 in AdaMerging++/Surgery/FusionBench)."""
    density: float = 0.2
    """Fraction of each task vector kept by magnitude (``reset_thresh=20``)."""
    per_tensor: bool = False
    """Trim each tensor separately instead of the whole flattened task vector (an option, not the paper's)."""

    def validate(self) -> None:
        if not 0.0 <= self.density <= 1.0:
            raise ConfigError(f"hyperparameter 'density' must be in [0, 1], got {self.density}")


class Ties(StaticMergeMethod):
    name = "ties"
    title = "TIES-Merging"
    paper_url = "https://arxiv.org/abs/2306.01708"
    Params = TiesParams

    def merge_state_dicts(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]], params: TiesParams) -> StateDict:
        return tv.ties(pretrained, list(finetuned.values()), params.scaling, params.density, params.per_tensor)
