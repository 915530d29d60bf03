"""The pretrained encoder with each task's fixed head: the zero-shot lower reference (algorithms.md §5, Table A)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from merging.methods.base import StateDict, StaticMergeMethod


class Pretrained(StaticMergeMethod):
    name = "pretrained"
    title = "Pretrained (zero-shot heads)"
    paper_url = "https://arxiv.org/abs/2103.00020"

    def merge_state_dicts(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]], params: Any) -> StateDict:
        return {k: v.clone() for k, v in pretrained.items()}
