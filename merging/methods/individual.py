"""Each task evaluated with its own fine-tuned encoder: the upper reference (algorithms.md §1)."""

from __future__ import annotations

from typing import Any

from merging.methods.base import BuildContext, MergeMethod
from merging.model import MultiTaskModel, PerTaskModel
from merging.suites.base import Suite


class Individual(MergeMethod):
    name = "individual"
    title = "Individual (fine-tuned per task)"
    paper_url = "https://arxiv.org/abs/2212.04089"

    def build(self, suite: Suite, params: Any, ctx: BuildContext = BuildContext()) -> MultiTaskModel:
        return PerTaskModel(suite.build_encoder(), suite.finetuned, suite.make_heads())
