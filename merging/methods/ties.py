"""TIES-Merging as in the official code: global trim (top density by |value|), sign election, disjoint *sum*,
then theta_0 + scaling * merged (algorithms.md §1; FusionBench: scaling 0.3, threshold 20, merge_func sum)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merging import task_vectors as tv
from merging.methods.base import StateDict, StaticMergeMethod, hyperparameter
from merging.modifiers import TaskVectorModifiers, merge_with_modifiers


@dataclass(frozen=True)
class TiesOwnParams:
    scaling: float = hyperparameter(0.3, "Scaling coefficient λ on the disjoint sum of the trimmed, sign-elected task vectors "
                                         "(0.3 in AdaMerging++, Surgery and FusionBench).", unit="λ")
    density: float = hyperparameter(0.2, "Fraction of each task vector's entries kept by magnitude before sign election "
                                         "(0.2 = the paper's reset_thresh=20).", unit="fraction", low=0.0, high=1.0)
    per_tensor: bool = hyperparameter(False, "Trim each tensor separately instead of the whole flattened task vector "
                                             "(an option, not the paper's).")


@dataclass(frozen=True)
class TiesParams(TaskVectorModifiers, TiesOwnParams):
    """TIES's own hyperparameters, then DARE and LiNeS (``merging.modifiers``; §8, §9).

    With ``lines`` on, τ_MTL is the disjoint sum (the official LiNeS TIES config uses the disjoint mean, agg: mean; the multi-task α
    makes the α part equal, β then acts on a T-times larger vector) and ``scaling`` is unused.
    """


class Ties(StaticMergeMethod):
    name = "ties"
    title = "TIES-Merging"
    paper_url = "https://arxiv.org/abs/2306.01708"
    Params = TiesParams

    def merge_state_dicts(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]], params: TiesParams) -> StateDict:
        def merge(p: Mapping[str, torch.Tensor], f: list[Mapping[str, torch.Tensor]], s: float) -> StateDict:
            return tv.ties(p, f, s, params.density, params.per_tensor)

        return merge_with_modifiers(pretrained, finetuned, params, merge, params.scaling)
