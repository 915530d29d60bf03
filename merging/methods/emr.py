"""EMR-Merging: elect one unified task vector, keep a bit mask and a rescaler per task (Huang et al., NeurIPS 2024).

"EMR-Merging: Tuning-Free High-Performance Model Merging", https://arxiv.org/abs/2405.17461; official code
``harveyhuang18/EMR_Merging`` at cc225ec (``merge_vit/merging_methods.py``; algorithms_frontier.md §7). Per float
key: the elected sign γ = sign(Σ_t τ_t) (an exact zero counts as −1); the unified vector τ_uni = γ ⊙ max_t |τ_t|
over the tasks that agree with γ (0 where none does); task t's mask M_t = (τ_t ⊙ γ > 0) and rescaler
λ_t = Σ_keys mean|τ_t| / Σ_keys mean|M_t ⊙ τ_uni| (a sum of per-tensor means, so each tensor counts equally).
Task t's model is θ₀ + λ_t·(M_t ⊙ τ_uni): no data, no tuning, but the task id is needed at inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from merging import task_vectors as tv
from merging.methods.base import BuildContext, MergeMethod
from merging.model import MaskedTaskModel, MultiTaskModel
from merging.suites.base import Suite

StateDict = dict[str, torch.Tensor]


def emr_elect(vectors: Sequence[Mapping[str, torch.Tensor]]) -> tuple[StateDict, list[StateDict], list[float]]:
    """The unified task vector τ_uni, each task's mask M_t (bool) and rescaler λ_t from task vectors τ_t (float keys)."""
    unified: StateDict = {}
    task_masks: list[StateDict] = [{} for _ in vectors]
    own = torch.zeros(len(vectors), dtype=torch.float64)
    kept = torch.zeros(len(vectors), dtype=torch.float64)
    for key in vectors[0]:
        stacked = torch.stack([v[key].float() for v in vectors])
        sign = torch.where(stacked.sum(0) > 0, 1.0, -1.0)
        agree = stacked * sign > 0
        unified[key] = sign * (stacked.abs() * agree).amax(0)
        for t in range(len(vectors)):
            task_masks[t][key] = agree[t]
            own[t] += stacked[t].abs().mean().double()
            kept[t] += (unified[key] * agree[t]).abs().mean().double()
    scales = [float(o / k) if k > 0 else 0.0 for o, k in zip(own, kept, strict=True)]
    return unified, task_masks, scales


class EMR(MergeMethod):
    name = "emr"
    title = "EMR-Merging (task id at inference)"
    paper_url = "https://arxiv.org/abs/2405.17461"

    def build(self, suite: Suite, params: Any, ctx: BuildContext = BuildContext()) -> MultiTaskModel:
        vectors = tv.task_vectors(suite.pretrained, [suite.finetuned[t] for t in suite.tasks])
        unified, task_masks, scales = emr_elect(vectors)
        return MaskedTaskModel(suite.build_encoder(), suite.pretrained, unified, dict(zip(suite.tasks, task_masks, strict=True)),
                               dict(zip(suite.tasks, scales, strict=True)), suite.make_heads())
