"""AdaMerging (Yang et al., ICLR 2024): learn the merging coefficients by test-time entropy minimisation.

theta(Lambda) = theta_0 + sum_k Lambda[p, k] tau_k with one lambda per task (task-wise) or per
state-dict tensor per task (layer-wise), init 0.3, clamped to [0, 1]; trained without labels by
minimising each task head's prediction entropy on shuffled test batches (algorithms.md §1).
``vectors="ties"`` is AdaMerging++: the same on the per-task TIES vectors.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from merging import task_vectors as tv
from merging.adaptation import ANALYSIS_HELP, Trajectory, accuracy_probe, entropy, optimize, unlabeled_batches
from merging.functional import MergedEncoder
from merging.methods.base import BuildContext, MergeMethod, RunContext, hyperparameter
from merging.model import MultiTaskModel
from merging.suites.base import Suite


@dataclass(frozen=True)
class AdaMergingParams:
    granularity: Literal["layer", "task"] = hyperparameter(
        "layer", "layer: one λ per state-dict tensor per task (layer-wise AdaMerging); task: one λ per task (algorithms.md §3).")
    vectors: Literal["task_arithmetic", "ties"] = hyperparameter(
        "task_arithmetic", "The task vectors the λs scale: task_arithmetic (AdaMerging) or ties (AdaMerging++: trimmed, sign-filtered).")
    density: float = hyperparameter(0.2, "TIES trim density, used with vectors=ties (reset_thresh=20).", unit="fraction", low=0.0, high=1.0)
    init: float = hyperparameter(0.3, "Initial λ of every coefficient (the paper's prior 0.3); λs are clamped to [0, 1] in the forward pass, "
                                 "where a λ outside gets no gradient.", unit="λ", low=0.0, high=1.0)
    lr: float = hyperparameter(1e-3, "Adam learning rate, betas (0.9, 0.999), no weight decay.", low=0.0, low_open=True)
    steps: int = hyperparameter(500, "Iterations; each is one Adam step on the entropy summed over all tasks.", unit="steps", low=1)
    batch_size: int = hyperparameter(16, "Unlabeled test images per batch.", unit="images", low=1)
    batches_per_task: int = hyperparameter(2, "Shuffled unlabeled test batches each task adds to one iteration's loss.", unit="batches", low=1)
    analysis_test_accuracy: bool = hyperparameter(False, ANALYSIS_HELP)


class AdaMergingModel(MultiTaskModel):
    """One merged encoder for every task; its coefficients are the only trainable parameter."""

    def __init__(self, encoder: MergedEncoder, tasks: Sequence[str], heads: nn.ModuleDict):
        super().__init__(tasks, heads)
        self.encoder = encoder

    def encode(self, images: torch.Tensor, task: str) -> torch.Tensor:
        self.check_task(task)
        return self.encoder(images)

    def block_features(self, images: torch.Tensor, task: str) -> list[torch.Tensor]:
        self.check_task(task)
        return self.encoder.block_features(images)


def merge_vectors(suite: Suite, params: AdaMergingParams) -> list[dict[str, torch.Tensor]]:
    """The task vectors the coefficients weight: plain tau_k, or TIES's per-task vectors (algorithms.md §1, step 5)."""
    if params.vectors == "ties":
        return tv.ties_vectors(suite.pretrained, [suite.finetuned[t] for t in suite.tasks], params.density)
    return suite.task_vectors()


def entropy_parts(model: AdaMergingModel, batches: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Each task's summed mean prediction entropy over its batches, from one merged forward over all images.

    The merged weights are built once and every batch goes through the encoder together; samples do
    not interact in a ViT, so this equals a forward per batch.
    """
    flat = [b for task in batches for b in batches[task]]
    features = model.encoder(torch.cat(flat)).split([len(b) for b in flat])
    parts: dict[str, torch.Tensor] = {}
    i = 0
    for task, group in batches.items():
        parts[task] = features[0].new_zeros(())
        for _ in group:
            parts[task] = parts[task] + entropy(model.heads[task](features[i]))
            i += 1
    return parts


def entropy_backward(model: AdaMergingModel, batches: Mapping[str, Sequence[torch.Tensor]]) -> dict[str, float]:
    """Backpropagate ``entropy_loss`` one task at a time and return each task's part: the gradient of the sum, holding
    one task's activations instead of every task's (ViT-B/32, 8 tasks x 16 images: the step's peak RSS was 12.7 GB)."""
    parts = {}
    for task, group in batches.items():
        part = entropy_parts(model, {task: group})[task]
        part.backward()
        parts[task] = float(part.detach())
    return parts


def entropy_loss(model: AdaMergingModel, batches: Mapping[str, Sequence[torch.Tensor]]) -> torch.Tensor:
    """AdaMerging's objective: the sum over tasks and batches of the mean prediction entropy (``entropy_parts`` summed)."""
    return sum(entropy_parts(model, batches).values())


class AdaMerging(MergeMethod):
    name = "adamerging"
    title = "AdaMerging"
    paper_url = "https://arxiv.org/abs/2310.02575"
    Params = AdaMergingParams
    presets = {
        "paper": {"steps": 500, "lr": 1e-3, "batch_size": 16, "batches_per_task": 2},
        # CPU-sized (~15-35 s for 8 tasks of mini8): 12x fewer steps of half the images, so a 10x lr
        # lets lambda move about as far as in the paper's 500 steps.
        "fast": {"steps": 40, "lr": 1e-2, "batch_size": 16, "batches_per_task": 1},
    }

    def build(self, suite: Suite, params: AdaMergingParams, ctx: BuildContext = BuildContext()) -> AdaMergingModel:
        encoder = MergedEncoder(suite.build_encoder(), suite.pretrained, merge_vectors(suite, params), params.granularity, params.init)
        return AdaMergingModel(encoder, suite.tasks, suite.make_heads())

    def adapt(self, model: AdaMergingModel, suite: Suite, params: AdaMergingParams, ctx: RunContext) -> dict:
        generator = torch.Generator().manual_seed(ctx.seed)
        streams = {t: unlabeled_batches(suite, t, params.batch_size, generator, ctx.device) for t in model.tasks}
        optimizer = torch.optim.Adam([model.encoder.coefficients], lr=params.lr, betas=(0.9, 0.999), weight_decay=0.0)

        def step(_: int, update: bool) -> tuple[float, dict[str, float]]:
            batches = {t: [next(streams[t]) for _ in range(params.batches_per_task)] for t in model.tasks}
            if not update:
                with torch.no_grad():
                    parts = {t: float(v) for t, v in entropy_parts(model, batches).items()}
                return sum(parts.values()), parts
            optimizer.zero_grad()
            parts = entropy_backward(model, batches)
            optimizer.step()
            return sum(parts.values()), parts

        encoder = model.encoder
        probes = {"coefficients": lambda: encoder.lambdas().detach().cpu().tolist()}
        if params.analysis_test_accuracy:
            probes["test_accuracy"] = accuracy_probe(model, suite, ctx.device)
        trajectory = Trajectory(params.steps, probes)
        curve = optimize(params.steps, step, ctx.progress, desc="AdaMerging", log_every=max(1, params.steps // 100), trajectory=trajectory)
        return {
            "granularity": params.granularity,
            "vectors": params.vectors,
            "tasks": list(model.tasks),
            "tensor_names": list(encoder.keys) if params.granularity == "layer" else ["all"],
            "coefficients": encoder.lambdas().detach().cpu().tolist(),
            "entropy": curve,
            "entropy_every": max(1, params.steps // 100),
            "trajectory": trajectory.data,
        }
