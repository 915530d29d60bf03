"""Consensus merging (TALL masks; Wang et al., ICML 2024, https://arxiv.org/abs/2405.07813; algorithms_frontier.md §6).

Official code ``nik-dim/tall_masks`` at d10af8b (``src/eval/aggregation.py`` ``create_task_vector``,
``src/utils/tallmask_utils.py``, ``config/method/consensus.yaml``): build the multi-task vector τ_MTL (the
sum of the task vectors, or TIES with 20 % density and a disjoint *sum*), each task's TALL mask
|τ_t| > λ_t·|τ_MTL − τ_t|, keep the entries at least ``k`` masks keep (``prun_thre_k``, default 2), and
return θ₀ + α·(keep ⊙ τ_MTL) on every float key. The rules live in ``merging.masks``.

Validation choices the paper makes and this data-free merge fixes instead: λ_t per task from
{0.2, …, 0.6} (here one λ for every task) and α from {0.1, …, 1.0} (here a fixed prior).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import torch

from merging import masks
from merging import task_vectors as tv
from merging.errors import ConfigError
from merging.methods.base import StateDict, StaticMergeMethod, hyperparameter
from merging.modifiers import TaskVectorModifiers, merge_with_modifiers


@dataclass(frozen=True)
class ConsensusOwnParams:
    k: int = hyperparameter(2, "Keep an entry only if at least k tasks' TALL masks keep it (prun_thre_k = 2 in the official "
                               "config/method/consensus.yaml: drops catastrophic and selfish weights; 0 gives plain TA/TIES, "
                               "more than the number of tasks gives the pretrained model).", unit="tasks", low=0)
    tall_lambda: float = hyperparameter(0.4, "λ of every task's TALL mask |τ_t| > λ·|τ_MTL − τ_t|; the paper picks λ_t per task from "
                                             "{0.2, 0.3, 0.4, 0.5, 0.6} on validation (tallmask_utils.py), 0.4 is that grid's centre "
                                             "(larger keeps fewer entries).", unit="λ", low=0.0)
    vectors: Literal["task_arithmetic", "ties"] = hyperparameter("task_arithmetic", "Multi-task vector τ_MTL the masks are built on "
                                                                 "and that is kept: the sum of the task vectors (Consensus TA) or "
                                                                 "the TIES disjoint sum (Consensus TIES; use_ties in the official config).")
    scaling: float = hyperparameter(0.3, "Scaling coefficient α on the masked multi-task vector; the paper picks it from "
                                         "{0.1, …, 1.0} on validation (eval.py), 0.3 is the task-vector prior used by task_arithmetic "
                                         "and ties here.", unit="α")
    density: float = hyperparameter(0.2, "Fraction of each task vector kept by magnitude before TIES's sign election, used only "
                                         "with vectors = ties (reset_thresh = 20 in the official consensus code).",
                                    unit="fraction", low=0.0, high=1.0)


@dataclass(frozen=True)
class ConsensusParams(TaskVectorModifiers, ConsensusOwnParams):
    """Consensus merging's own hyperparameters, then DARE and LiNeS (``merging.modifiers``; §8, §9).

    With ``lines`` on, τ_MTL is the masked multi-task vector keep ⊙ τ_MTL (official LiNeS consensus: merged_tv * consensus_mask) and
    ``scaling`` is unused; with DARE the TALL masks are built on the dropped task vectors.
    """


def consensus_merge(
    pretrained: Mapping[str, torch.Tensor],
    finetuned: list[Mapping[str, torch.Tensor]],
    k: int,
    tall_lambda: float | list[float],
    vectors: masks.VectorKind = "task_arithmetic",
    scaling: float = 0.3,
    density: float = 0.2,
) -> StateDict:
    """θ₀ + α·(consensus ⊙ τ_MTL) on the float keys; other tensors from θ₀, dtypes kept."""
    if not finetuned:
        raise ConfigError("consensus needs at least one fine-tuned model")
    task_vecs, multi = masks.multi_task_vector(pretrained, finetuned, vectors, density)
    keep = masks.consensus_mask(task_vecs, multi, tall_lambda, k)
    del task_vecs
    return tv.add_scaled(pretrained, [{key: multi[key] * keep[key] for key in multi}], [scaling])


class Consensus(StaticMergeMethod):
    name = "consensus"
    title = "Consensus Merging (TALL masks)"
    paper_url = "https://arxiv.org/abs/2405.07813"
    Params = ConsensusParams

    def merge_state_dicts(self, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, Mapping[str, torch.Tensor]], params: ConsensusParams) -> StateDict:
        def merge(p: Mapping[str, torch.Tensor], f: list[Mapping[str, torch.Tensor]], s: float) -> StateDict:
            return consensus_merge(p, f, params.k, params.tall_lambda, params.vectors, s, params.density)

        return merge_with_modifiers(pretrained, finetuned, params, merge, params.scaling)
