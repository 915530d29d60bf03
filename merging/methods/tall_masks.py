"""TALL masks: one multi-task vector and a bit mask per task, chosen by the task id (Wang et al., ICML 2024).

"Localizing Task Information for Improved Model Merging and Compression", https://arxiv.org/abs/2405.07813;
official code ``nik-dim/tall_masks`` at d10af8b (``src/utils/tallmask_utils.py``; algorithms_frontier.md §6).
Task t's model is θ₀ + m_t ⊙ τ_MTL (no scaling coefficient) with the TALL mask m_t = |τ_t| > λ·|τ_MTL − τ_t|
over every float entry; τ_MTL is the sum of the task vectors (TALL + TA) or the TIES disjoint sum with 20 %
density (TALL + TIES). It is compression more than merging: it stores τ_MTL and one bit per parameter per
task, and inference needs the task id. The rules live in ``merging.masks``.

The paper picks λ_t per task from {0.2, …, 0.6} on a validation split; without one, one λ for every task is a
fixed hyperparameter here (0.4, the grid's centre, as ``consensus``); FusionBench's port fixes 0.6.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from merging import masks
from merging.methods.base import BuildContext, MergeMethod, hyperparameter
from merging.model import MaskedTaskModel, MultiTaskModel
from merging.suites.base import Suite


@dataclass(frozen=True)
class TallMasksParams:
    tall_lambda: float = hyperparameter(0.4, "λ of every task's TALL mask |τ_t| > λ·|τ_MTL − τ_t|; the paper picks λ_t per task from "
                                             "{0.2, 0.3, 0.4, 0.5, 0.6} on validation (tallmask_utils.py), 0.4 is that grid's centre "
                                             "(larger keeps fewer entries; 0 keeps every nonzero entry: task arithmetic at λ = 1).",
                                        unit="λ", low=0.0)
    vectors: Literal["task_arithmetic", "ties"] = hyperparameter("task_arithmetic", "Multi-task vector τ_MTL the masks select from: "
                                                                 "the sum of the task vectors (TALL + TA) or the TIES disjoint sum "
                                                                 "(TALL + TIES).")
    density: float = hyperparameter(0.2, "Fraction of each task vector TIES keeps by magnitude, used only with vectors = ties "
                                         "(reset_thresh = 20 in the official code).", unit="fraction", low=0.0, high=1.0)


class TallMasks(MergeMethod):
    name = "tall_masks"
    title = "TALL masks (task id at inference)"
    paper_url = "https://arxiv.org/abs/2405.07813"
    Params = TallMasksParams

    def build(self, suite: Suite, params: TallMasksParams, ctx: BuildContext = BuildContext()) -> MultiTaskModel:
        vectors, multi = masks.multi_task_vector(suite.pretrained, [suite.finetuned[t] for t in suite.tasks], params.vectors, params.density)
        task_masks = masks.tall_masks(vectors, multi, params.tall_lambda)
        return MaskedTaskModel(suite.build_encoder(), suite.pretrained, multi, dict(zip(suite.tasks, task_masks, strict=True)),
                               dict.fromkeys(suite.tasks, 1.0), suite.make_heads())
