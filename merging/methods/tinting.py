"""Model Tinting / SyMerge: layer-wise merging coefficients plus one task-specific layer per task (algorithms.md §4).

Trained jointly, without labels, by expert-guided self-labelling: each individual model (its own
encoder and original head) labels a test batch, and the merged, tinted student fits those labels
with cross-entropy. Model Tinting++ / SyMerge drops the samples where the student disagrees with the
expert *and* is more confident than it (``confidence_filter``).

The tinted layer is the classification head by default (the released code's ``--classifier_train``);
any encoder tensor prefix (``ln_post``, ``transformer.resblocks.3.mlp.c_proj``) may be tinted instead,
as a per-task additive delta, initialised to 0, over the merged weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from merging.adaptation import ANALYSIS_HELP, Trajectory, accuracy_probe, optimize, unlabeled_batches
from merging.errors import ConfigError
from merging.functional import MergedEncoder
from merging.methods.base import BuildContext, MergeMethod, RunContext, hyperparameter
from merging.model import MultiTaskModel, PerTaskModel, encoder_block_features
from merging.suites.base import Suite

StateDict = dict[str, torch.Tensor]


@dataclass(frozen=True)
class TintingParams:
    layer: str = hyperparameter("head", "The tinted layer, one trainable copy per task: head (the released code) or an encoder tensor prefix such as ln_post.")
    confidence_filter: bool = hyperparameter(True, "True: Model Tinting++ / SyMerge (crosspseudoconf); False: plain Model Tinting (crosspseudo).")
    init: float = hyperparameter(0.3, "Initial layer-wise coefficient (prior), clamped to [0, 1] in the forward pass.", unit="λ", low=0.0, high=1.0)
    lr: float = hyperparameter(1e-2, "Adam learning rate (the released code).", low=0.0, low_open=True)
    epochs: int = hyperparameter(500, "Each epoch: tasks in a shuffled order, one batch and one Adam step per task.", unit="epochs", low=0)
    batch_size: int = hyperparameter(32, "Unlabeled test images per batch.", unit="images", low=1)
    analysis_test_accuracy: bool = hyperparameter(False, ANALYSIS_HELP)

    def validate(self) -> None:
        if not self.layer.strip():
            raise ConfigError("layer must be 'head' or an encoder tensor prefix such as 'ln_post'")


def self_labels(teacher_logits: torch.Tensor, student_logits: torch.Tensor, confidence_filter: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Pseudo-labels y_hat = argmax of the expert and the mask of samples to train on.

    With the filter, sample i is kept if the student agrees (y_hat_i = y'_i) or, when it disagrees,
    if the expert is at least as confident (c_ind_i >= c_i): a confident disagreeing student is
    not pulled toward a less confident expert.
    """
    c_ind, y_hat = teacher_logits.float().softmax(dim=-1).max(dim=-1)
    c, y_prime = student_logits.float().softmax(dim=-1).max(dim=-1)
    if not confidence_filter:
        return y_hat, torch.ones_like(y_hat, dtype=torch.bool)
    return y_hat, (y_hat == y_prime) | (c_ind >= c)


def tinted_keys(keys: Sequence[str], layer: str) -> list[str]:
    """The encoder tensors named by a prefix (the whole name or a dotted prefix of it)."""
    chosen = [k for k in keys if k == layer or k.startswith(layer + ".")]
    if not chosen:
        prefixes = sorted({k.rsplit(".", 1)[0] for k in keys})
        raise ConfigError(f"layer {layer!r} names no encoder tensor; use 'head' or one of: {', '.join(prefixes)}")
    return chosen


def _safe(key: str) -> str:
    return key.replace(".", "__")


class TintingModel(MultiTaskModel):
    """A layer-wise merged encoder shared by all tasks, with each task's own head or encoder-tensor delta."""

    def __init__(self, merged: MergedEncoder, tasks: Sequence[str], heads: nn.ModuleDict, tint_keys: Sequence[str] = ()):
        super().__init__(tasks, heads)
        self.merged = merged
        self.tint_keys = list(tint_keys)
        shapes = {k: getattr(merged, f"theta0_{merged.keys.index(k)}").shape for k in self.tint_keys}
        self.tints = nn.ModuleDict(
            {t: nn.ParameterDict({_safe(k): nn.Parameter(torch.zeros(shapes[k])) for k in self.tint_keys}) for t in tasks}
        )

    def task_params(self, task: str) -> StateDict:
        """The merged weights plus this task's tint."""
        params = self.merged.merged_params()
        for k in self.tint_keys:
            params[k] = params[k] + self.tints[task][_safe(k)]
        return params

    def encode(self, images: torch.Tensor, task: str) -> torch.Tensor:
        self.check_task(task)
        if not self.tint_keys:
            return self.merged(images)
        return functional_call(self.merged.encoder, self.task_params(task), (images,))

    def block_features(self, images: torch.Tensor, task: str) -> list[torch.Tensor]:
        self.check_task(task)
        return encoder_block_features(self.merged.encoder, images, self.task_params(task))


def build_tinting(suite: Suite, params: TintingParams) -> TintingModel:
    """Layer-wise coefficients at ``init`` and tints equal to the suite's heads / zero deltas: task arithmetic at init."""
    merged = MergedEncoder(suite.build_encoder(), suite.pretrained, suite.task_vectors(), granularity="layer", init=params.init, clamp=(0.0, 1.0))
    if params.layer == "head":
        return TintingModel(merged, suite.tasks, suite.make_heads(trainable=True))
    return TintingModel(merged, suite.tasks, suite.make_heads(), tinted_keys(merged.keys, params.layer))


class Tinting(MergeMethod):
    """Model Tinting (Jung et al., arXiv 2412.19098); with ``confidence_filter`` Model Tinting++ / SyMerge.

    ``fast`` preset: 25 epochs (200 steps on 8 tasks) at the paper's lr 1e-2; mini8 adapts in seconds on a CPU.
    """

    name = "tinting"
    title = "Model Tinting"
    paper_url = "https://arxiv.org/abs/2412.19098"
    Params = TintingParams
    presets = {
        "paper": {"epochs": 500, "batch_size": 32, "lr": 1e-2},
        "fast": {"epochs": 25, "batch_size": 32, "lr": 1e-2},
    }

    def build(self, suite: Suite, params: TintingParams, ctx: BuildContext = BuildContext()) -> TintingModel:
        return build_tinting(suite, params)

    def adapt(self, model: TintingModel, suite: Suite, params: TintingParams, ctx: RunContext) -> dict:
        """Per epoch, tasks in shuffled order; each: expert labels a test batch, CE on the kept samples, one Adam step."""
        teacher = PerTaskModel(suite.build_encoder(), suite.finetuned, suite.make_heads()).to(ctx.device).eval()
        opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=params.lr)
        gen = torch.Generator().manual_seed(ctx.seed)
        streams = {t: unlabeled_batches(suite, t, params.batch_size, gen, ctx.device) for t in model.tasks}
        kept: dict[str, list[float]] = {t: [] for t in model.tasks}

        def epoch(_: int, update: bool) -> tuple[float, dict[str, float]]:
            parts = dict.fromkeys(model.tasks, 0.0)
            for j in torch.randperm(len(model.tasks), generator=gen).tolist():
                task = model.tasks[j]
                images = next(streams[task])
                with torch.no_grad():
                    teacher_logits = teacher.logits(images, task)
                with torch.set_grad_enabled(update):
                    logits = model.logits(images, task)
                labels, keep = self_labels(teacher_logits, logits.detach(), params.confidence_filter)
                if update:
                    kept[task].append(keep.float().mean().item())
                if not keep.any():
                    continue
                loss = F.cross_entropy(logits[keep], labels[keep])
                if update:
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
                parts[task] = loss.item()
            return sum(parts.values()), parts

        probes = {"coefficients": lambda: model.merged.lambdas().detach().cpu().tolist()}
        if params.analysis_test_accuracy:
            probes["test_accuracy"] = accuracy_probe(model, suite, ctx.device)
        trajectory = Trajectory(params.epochs, probes)
        losses = optimize(params.epochs, epoch, ctx.progress, desc="Model Tinting", log_every=1, trajectory=trajectory)
        return {
            "loss": losses,
            "kept_fraction": kept,
            "coefficients": {"tensors": model.merged.keys, "tasks": model.tasks, "values": model.merged.lambdas().detach().cpu().tolist()},
            "trajectory": trajectory.data,
        }
