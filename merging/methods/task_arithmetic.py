"""Task arithmetic: theta = theta_0 + lambda sum_k tau_k, lambda = 0.3 ("prior 0.3" in every repo; algorithms.md §1)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from merging import task_vectors as tv
from merging.methods.base import StateDict, StaticMergeMethod, hyperparameter
from merging.modifiers import TaskVectorModifiers, merge_with_modifiers


@dataclass(frozen=True)
class TaskArithmeticOwnParams:
    scaling: float = hyperparameter(0.3, "Scaling coefficient λ on the summed task vectors; 0.3 in AdaMerging, Surgery and FusionBench "
                                         "(config/method/task_arithmetic.yaml); negative values subtract tasks.", unit="λ")


@dataclass(frozen=True)
class TaskArithmeticParams(TaskVectorModifiers, TaskArithmeticOwnParams):
    """Task arithmetic's own hyperparameters, then DARE and LiNeS (``merging.modifiers``; §8, §9).

    With ``lines`` on, θ = θ₀ + λ(l)·Σ_k τ_k with α = 1/T by default (LiNeS's task-arithmetic recipe) and ``scaling`` unused.
    """


class TaskArithmetic(StaticMergeMethod):
    name = "task_arithmetic"
    title = "Task Arithmetic"
    paper_url = "https://arxiv.org/abs/2212.04089"
    Params = TaskArithmeticParams

    def merge_state_dicts(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]], params: TaskArithmeticParams) -> StateDict:
        return merge_with_modifiers(pretrained, finetuned, params, tv.task_arithmetic, params.scaling)
