"""Weight averaging: theta = (1/T) sum_k theta_k (algorithms.md §1; all T vectors, not the released 7-of-8 quirk)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from merging import task_vectors as tv
from merging.methods.base import StateDict, StaticMergeMethod


class WeightAveraging(StaticMergeMethod):
    name = "weight_averaging"
    title = "Weight Averaging"
    paper_url = "https://arxiv.org/abs/2203.05482"

    def merge_state_dicts(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]], params: Any) -> StateDict:
        return tv.weight_averaging(pretrained, list(finetuned.values()))
