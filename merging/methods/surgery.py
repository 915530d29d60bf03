"""Representation Surgery (Yang et al., ICML 2024) and SurgeryV2 (arXiv 2410.14389), on top of any merge.

A merged model's features drift from each individual model's (the representation bias). Surgery adds
one small module per task, z~ = z - U ReLU(D z), on the base merge's final unnormalized feature and
trains it without labels so that z~ approaches the individual model's feature of the same image (L1).
SurgeryV2 adds such a module after every transformer block as well, on the residual stream
(algorithms.md §2). The base merge stays frozen; only the modules train.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import nn

from merging import feature_cache
from merging.adaptation import ANALYSIS_HELP, Trajectory, accuracy_probe, optimize, unlabeled_indices
from merging.errors import ConfigError
from merging.functional import MergedEncoder
from merging.methods.base import BuildContext, MergeMethod, RunContext, RunInput, hyperparameter, method_name, nested_params
from merging.metrics import mean_l1
from merging.model import MultiTaskModel, PerTaskModel, StaticModel, blocks_of
from merging.suites.base import Suite

Schedule = list[list[tuple[str, torch.Tensor]]]
"""Per iteration, the (task, test-image indices) of each Adam step, in order."""


@dataclass(frozen=True)
class SurgeryParams:
    base: str = method_name("task_arithmetic", "The registered merge whose model Surgery corrects: static (task_arithmetic, ties, ...) "
                                               "or data-dependent (adamerging, whose run is cached and reused).", exclude=("surgery",))
    base_preset: Literal["paper", "fast"] = hyperparameter("paper", "Preset of a data-dependent base (its run is cached and reused).")
    base_params: dict[str, Any] = nested_params("base", "The base merge's own hyperparameters, typed by that method; "
                                                        "spelled base.KEY=VALUE, e.g. base.scaling=0.3.")
    version: Literal[1, 2] = hyperparameter(1, "1: one module on the final feature (Surgery); 2: also one after every transformer block (SurgeryV2).")
    rank: int = hyperparameter(16, "r, the inner width of D (r x d) and U (d x r); 16 in the paper.", unit="r", low=1)
    lr: float = hyperparameter(1e-3, "Adam learning rate, betas (0.9, 0.999), no weight decay.", low=0.0, low_open=True)
    iterations: int = hyperparameter(500, "Iterations of the schedule (500 in the paper).", unit="iterations", low=1)
    steps_per_task: int = hyperparameter(2, "Per iteration, each task in order takes this many batches, one Adam step each.", unit="steps", low=1)
    batch_size: int = hyperparameter(16, "Unlabeled test images per batch.", unit="images", low=1)
    analysis_test_accuracy: bool = hyperparameter(False, ANALYSIS_HELP)


class SurgeryModule(nn.Module):
    """x - U ReLU(D x) on the last dimension, no biases; U = 0 so it starts as the identity."""

    def __init__(self, dim: int, rank: int, generator: torch.Generator | None = None):
        super().__init__()
        self.down = nn.Linear(dim, rank, bias=False)
        self.up = nn.Linear(rank, dim, bias=False)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5), generator=generator)
        nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x - self.up(F.relu(self.down(x)))


def surgery_vit(base: MultiTaskModel) -> nn.Module:
    """The open_clip ViT a base model runs, whose blocks SurgeryV2 hooks: static weights or a MergedEncoder."""
    from open_clip.transformer import VisionTransformer

    encoder = getattr(base, "encoder", None)
    if isinstance(base, StaticModel | PerTaskModel) and isinstance(encoder, VisionTransformer):
        return encoder
    if isinstance(encoder, MergedEncoder) and isinstance(encoder.encoder, VisionTransformer):
        return encoder.encoder
    raise ConfigError(
        f"SurgeryV2 needs a base whose encoder is an open_clip VisionTransformer with static weights or a MergedEncoder "
        f"(e.g. weight_averaging, task_arithmetic, ties, adamerging); this base is a {type(base).__name__}. Use version=1."
    )


class SurgeryModel(MultiTaskModel):
    """A frozen base merge plus per-task Surgery modules (the only trainable parameters)."""

    def __init__(self, base: MultiTaskModel, dim: int, rank: int, width: int = 0, layers: int = 0, seed: int = 0):
        super().__init__(base.tasks, base.heads)
        self.base = base.requires_grad_(False).eval()
        generator = torch.Generator().manual_seed(seed)
        self.final = nn.ModuleDict({t: SurgeryModule(dim, rank, generator) for t in base.tasks})
        self.blocks = nn.ModuleDict({t: nn.ModuleList(SurgeryModule(width, rank, generator) for _ in range(layers)) for t in base.tasks}) if layers else None
        self._token_dim = 1
        if layers:
            vit = surgery_vit(base)
            self._token_dim = 1 if getattr(vit.transformer, "batch_first", True) else 0

    def train(self, mode: bool = True) -> SurgeryModel:
        super().train(mode)
        self.base.eval()
        return self

    @contextmanager
    def block_surgery(self, task: str, record: list[torch.Tensor] | None = None) -> Iterator[None]:
        """While open, each base block's output X becomes X - U ReLU(D X) (V2); ``record`` gets its token-means."""
        if self.blocks is None:
            yield
            return

        def hook(module: SurgeryModule):
            def replace(_m: nn.Module, _inputs: tuple, out: torch.Tensor) -> torch.Tensor:
                out = module(out)
                if record is not None:
                    record.append(out.mean(dim=self._token_dim))
                return out

            return replace

        handles = [b.register_forward_hook(hook(m)) for b, m in zip(blocks_of(surgery_vit(self.base)), self.blocks[task], strict=True)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    def encode(self, images: torch.Tensor, task: str) -> torch.Tensor:
        self.check_task(task)
        with self.block_surgery(task):
            z = self.base.encode(images, task)
        return self.final[task](z)

    def block_features(self, images: torch.Tensor, task: str) -> list[torch.Tensor]:
        self.check_task(task)
        if self.blocks is None:
            return self.base.block_features(images, task)
        record: list[torch.Tensor] = []
        with self.block_surgery(task, record):
            self.base.encode(images, task)
        return record


def index_schedule(sizes: Mapping[str, int], iterations: int, steps_per_task: int, batch_size: int, generator: torch.Generator) -> Schedule:
    """The batches Surgery visits: per iteration, each task in order, ``steps_per_task`` shuffled batches."""
    streams = {t: unlabeled_indices(n, batch_size, generator) for t, n in sizes.items()}
    return [[(t, next(streams[t])) for t in sizes for _ in range(steps_per_task)] for _ in range(iterations)]


def _log_every(iterations: int) -> int:
    return max(1, iterations // 100)


def fit_cached(
    modules: nn.ModuleDict,
    base_features: Mapping[str, torch.Tensor],
    targets: Mapping[str, torch.Tensor],
    schedule: Schedule,
    optimizer: torch.optim.Optimizer,
    progress=None,
    trajectory: Trajectory | None = None,
) -> list[float]:
    """Surgery V1 on cached features: each step is L1(module_k(z), z_k) on one batch, then one Adam step.
    An iteration's objective is the mean of its steps' L1; its parts, each task's mean."""

    def step(i: int, update: bool) -> tuple[float, dict[str, float]]:
        per_task: dict[str, list[float]] = {}
        for task, idx in schedule[i]:
            with torch.set_grad_enabled(update):
                loss = F.l1_loss(modules[task](base_features[task][idx]), targets[task][idx])
            per_task.setdefault(task, []).append(_adam_step(loss, optimizer, update))
        return _mean_and_parts(per_task)

    return optimize(len(schedule), step, progress, desc="Surgery", log_every=_log_every(len(schedule)), trajectory=trajectory)


def _adam_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, update: bool) -> float:
    """One optimizer step on ``loss`` when ``update`` (a trajectory probe only measures); returns the loss."""
    if update:
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return float(loss.detach().cpu())


def _mean_and_parts(per_task: Mapping[str, Sequence[float]]) -> tuple[float, dict[str, float]]:
    """The mean of every step's loss, and each task's mean."""
    losses = [v for vs in per_task.values() for v in vs]
    return sum(losses) / len(losses), {t: sum(vs) / len(vs) for t, vs in per_task.items()}


def fit_blocks(
    model: SurgeryModel,
    suite: Suite,
    targets: Mapping[str, torch.Tensor],
    block_targets: Mapping[str, Sequence[torch.Tensor]],
    schedule: Schedule,
    optimizer: torch.optim.Optimizer,
    device: str = "cpu",
    progress=None,
    trajectory: Trajectory | None = None,
) -> list[float]:
    """SurgeryV2: the blocks' inputs change as the modules train, so the base encoder re-runs every step;
    loss = sum_l L1(token-mean X_l^surg, token-mean X_l^ind) + L1(z~, z_k), the individual's side cached."""

    def step(i: int, update: bool) -> tuple[float, dict[str, float]]:
        per_task: dict[str, list[float]] = {}
        for task, idx in schedule[i]:
            data = suite.data[task]
            images = data.preprocess(data.test_images[idx]).to(device)
            record: list[torch.Tensor] = []
            with torch.set_grad_enabled(update), model.block_surgery(task, record):
                z = model.final[task](model.base.encode(images, task))
                loss = F.l1_loss(z, targets[task][idx])
                for x, target in zip(record, block_targets[task], strict=True):
                    loss = loss + F.l1_loss(x, target[idx])
            per_task.setdefault(task, []).append(_adam_step(loss, optimizer, update))
        return _mean_and_parts(per_task)

    return optimize(len(schedule), step, progress, desc="SurgeryV2", log_every=_log_every(len(schedule)), trajectory=trajectory)


def individual_model(suite: Suite, tasks: Sequence[str]) -> PerTaskModel:
    return PerTaskModel(suite.build_encoder(), {t: suite.finetuned[t] for t in tasks}, suite.make_heads())


class Surgery(MergeMethod):
    name = "surgery"
    title = "Representation Surgery"
    paper_url = "https://arxiv.org/abs/2402.02705"
    Params = SurgeryParams
    presets = {
        "paper": {"iterations": 500, "steps_per_task": 2, "batch_size": 16, "lr": 1e-3, "base_preset": "paper"},
        # Half the paper schedule: V1 trains on cached features (about 10 s on mini8 on a 2-core CPU); V2 re-runs
        # the base encoder every step (about a minute). 40 iterations cut the L1 bias by only 23-40 % on mini8.
        "fast": {"iterations": 250, "steps_per_task": 2, "batch_size": 16, "lr": 1e-3, "base_preset": "fast"},
    }

    def inputs(self, params: SurgeryParams) -> dict[str, RunInput]:
        return {"base": RunInput(params.base, params.base_params, params.base_preset)}

    def build(self, suite: Suite, params: SurgeryParams, ctx: BuildContext = BuildContext()) -> SurgeryModel:
        base = ctx.input("base", self.name)
        dim = next(iter(suite.heads.values()))["weight"].shape[1]
        width = layers = 0
        if params.version == 2:
            vit = surgery_vit(base)
            width, layers = vit.transformer.width, len(blocks_of(vit))
        return SurgeryModel(base, dim, params.rank, width, layers, seed=ctx.seed)

    def adapt(self, model: SurgeryModel, suite: Suite, params: SurgeryParams, ctx: RunContext) -> dict:
        tasks = model.tasks
        individual = individual_model(suite, tasks).to(ctx.device)
        base = {t: feature_cache.encoded(model.base, suite, t, device=ctx.device) for t in tasks}
        targets = {t: feature_cache.encoded(individual, suite, t, device=ctx.device) for t in tasks}
        generator = torch.Generator().manual_seed(ctx.seed)
        schedule = index_schedule({t: len(base[t]) for t in tasks}, params.iterations, params.steps_per_task, params.batch_size, generator)
        optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=params.lr, betas=(0.9, 0.999), weight_decay=0.0)
        trajectory = Trajectory(params.iterations, {"test_accuracy": accuracy_probe(model, suite, ctx.device)} if params.analysis_test_accuracy else {})
        if params.version == 1:
            curve = fit_cached(model.final, base, targets, schedule, optimizer, ctx.progress, trajectory)
            with torch.no_grad():
                after = {t: model.final[t](base[t]) for t in tasks}
        else:
            block_targets = {t: feature_cache.block_means(individual, suite, t, device=ctx.device) for t in tasks}
            curve = fit_blocks(model, suite, targets, block_targets, schedule, optimizer, ctx.device, ctx.progress, trajectory)
            after = {t: feature_cache.encoded(model, suite, t, device=ctx.device) for t in tasks}
        return {
            "base": params.base,
            "version": params.version,
            "l1_before": {t: mean_l1(base[t], targets[t]) for t in tasks},
            "l1_after": {t: mean_l1(after[t], targets[t]) for t in tasks},
            "loss": curve,
            "loss_every": _log_every(params.iterations),
            "trajectory": trajectory.data,
        }
