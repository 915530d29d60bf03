"""WEMoE and E-WEMoE: per-sample weight-ensembling MoE MLPs over a task-arithmetic merge (algorithms.md §3).

Every chosen transformer block's MLP keeps the frozen pretrained weights W0 and the frozen stacked MLP
task vectors tau_k; a router on the MLP input (the ln_2 output) gives each sample weights r(x) in R^T
and the MLP runs with W(x) = W0 + sum_k r_k(x) tau_k. Everything else is task arithmetic at
``init_lambda``. Only the routers train, by test-time entropy minimisation (as AdaMerging).

Per-sample weights are never formed: x W(x)^T = x W0^T + (r(x) (x) x) [tau_1 ... tau_T]^T is one
matmul on the batch (Tang et al. loop over samples with ``functional_call``; same numbers, batched).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from merging import task_vectors as tv
from merging.adaptation import ANALYSIS_HELP, Trajectory, accuracy_probe, entropy, optimize, unlabeled_batches
from merging.errors import ConfigError
from merging.methods.base import BuildContext, MergeMethod, RunContext, hyperparameter
from merging.model import SharedEncoderModel, blocks_of
from merging.suites.base import Suite

_MLP_TENSORS = ("c_fc.weight", "c_fc.bias", "c_proj.weight", "c_proj.bias")


@dataclass(frozen=True)
class WEMoEParams:
    init_lambda: float = hyperparameter(0.3, "Task-arithmetic λ outside the MoE MLPs, and the routers' output bias (init_lambda in the official code).",
                                        unit="λ")
    blocks: str = hyperparameter("all", "Blocks whose MLP becomes a weight-ensembling MoE: all, lastN, firstN or indices such as 0,3.")
    router_depth: Literal[0, 1, 2] = hyperparameter(2, "Router: 0 a learned constant per block, 1 linear, 2 Linear-ReLU-Linear (the paper's default).")
    lr: float = hyperparameter(1e-4, "Adam learning rate (the paper's ViT-B/32 and ViT-L/14 logs).", low=0.0, low_open=True)
    steps: int = hyperparameter(1000, "Adam steps of test-time adaptation on the entropy of unlabeled test images.", unit="steps", low=0)
    batch_size: int = hyperparameter(16, "Unlabeled test images per task per step.", unit="images", low=1)
    prune: float = hyperparameter(0.0, "E-WEMoE: fraction of smallest-|value| entries removed from each MLP task-vector tensor (0.9 in E-WEMoE).",
                                  unit="fraction", low=0.0, high=1.0, high_open=True)
    shared_router: bool = hyperparameter(False, "E-WEMoE: one router shared by all MoE blocks.")
    analysis_test_accuracy: bool = hyperparameter(False, ANALYSIS_HELP)

    def validate(self) -> None:
        parse_blocks(self.blocks, None)


def parse_blocks(spec: str, num_blocks: int | None) -> list[int]:
    """Block indices from "all", "lastN", "firstN" or "i,j,..." (validated against ``num_blocks`` when given)."""
    s = spec.strip().lower()
    n = num_blocks if num_blocks is not None else 10**9
    if s == "all":
        return list(range(n)) if num_blocks is not None else []
    m = re.fullmatch(r"(last|first)(\d+)", s)
    if m:
        k = int(m.group(2))
        if k < 1 or k > n:
            raise ConfigError(f"blocks={spec!r}: the encoder has {num_blocks} blocks")
        return list(range(n - k, n)) if m.group(1) == "last" else list(range(k))
    try:
        idx = sorted({int(p) for p in s.split(",") if p.strip()})
    except ValueError:
        raise ConfigError(f"blocks={spec!r}: expected 'all', 'lastN', 'firstN' or indices like '0,3'") from None
    if not idx or idx[0] < 0 or idx[-1] >= n:
        raise ConfigError(f"blocks={spec!r}: indices must lie in 0..{n - 1}")
    return idx


def prune_magnitude(tensor: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the ``ratio`` fraction of entries with the smallest |value| (keep those above that quantile)."""
    k = int(round(tensor.numel() * ratio))
    if k <= 0:
        return tensor
    threshold = tensor.abs().flatten().kthvalue(k).values
    return tensor * (tensor.abs() > threshold)


class Router(nn.Module):
    """r(H) = mean over tokens of W2 ReLU(W1 h + b1) + b2; W ~ N(0, 0.01^2), b1 = 0, b2 = init_lambda.

    No softmax or clamp, so weights may be negative. Depth 0 is a learned constant vector.
    """

    def __init__(self, width: int, num_tasks: int, depth: int = 2, init_lambda: float = 0.3):
        super().__init__()
        self.depth = depth
        if depth == 0:
            self.constant = nn.Parameter(torch.full((num_tasks,), float(init_lambda)))
            return
        layers: list[nn.Module] = [nn.Linear(width, width), nn.ReLU()] if depth == 2 else []
        layers.append(nn.Linear(width, num_tasks))
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.net[-1].bias, float(init_lambda))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """[B, N, D] tokens -> [B, T] routing weights."""
        if self.depth == 0:
            return self.constant.expand(tokens.shape[0], -1)
        return self.net(tokens).mean(dim=1)


def ensemble_linear(x: torch.Tensor, r: torch.Tensor, w0: torch.Tensor, b0: torch.Tensor, tau_t: torch.Tensor, tau_b: torch.Tensor) -> torch.Tensor:
    """x W(x)^T + b(x) with W(x) = W0 + sum_k r_k tau_k, for a whole batch, never forming W(x).

    x: [B, N, D_in]; r: [B, T]; w0: [D_out, D_in]; tau_t: the stacked *transposed* task vectors
    [T, D_in, D_out]; tau_b: [T, D_out]. The task term is one matmul of (r (x) x) [B, N, T*D_in]
    by tau_t viewed as [T*D_in, D_out].
    """
    scaled = (r[:, None, :, None] * x[:, :, None, :]).flatten(2)
    return F.linear(x, w0, b0) + scaled @ tau_t.flatten(0, 1) + (r @ tau_b).unsqueeze(1)


class WeightEnsemblingMLP(nn.Module):
    """A block's MLP with weights W0 + sum_k r_k(x) tau_k per sample; W0 and tau frozen buffers."""

    def __init__(self, act: nn.Module, pretrained: Mapping[str, torch.Tensor], vectors: Sequence[Mapping[str, torch.Tensor]], router: Router):
        super().__init__()
        self.act = act
        self.router = router
        for name in ("c_fc", "c_proj"):
            self.register_buffer(f"{name}_weight", pretrained[f"{name}.weight"].float().clone(), persistent=False)
            self.register_buffer(f"{name}_bias", pretrained[f"{name}.bias"].float().clone(), persistent=False)
            tau_t = torch.stack([v[f"{name}.weight"].float().t() for v in vectors]).contiguous()
            self.register_buffer(f"{name}_tau_t", tau_t, persistent=False)
            self.register_buffer(f"{name}_tau_bias", torch.stack([v[f"{name}.bias"].float() for v in vectors]), persistent=False)
        self.last_routing: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = self.router(x)
        self.last_routing = r.detach()
        h = self.act(ensemble_linear(x, r, self.c_fc_weight, self.c_fc_bias, self.c_fc_tau_t, self.c_fc_tau_bias))
        return ensemble_linear(h, r, self.c_proj_weight, self.c_proj_bias, self.c_proj_tau_t, self.c_proj_tau_bias)

    def task_vector(self, name: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tau_k's (weight, bias) of ``c_fc`` or ``c_proj`` in nn.Linear layout (for references and plots)."""
        return getattr(self, f"{name}_tau_t")[k].t(), getattr(self, f"{name}_tau_bias")[k]


class WEMoEModel(SharedEncoderModel):
    """A task-arithmetic encoder whose chosen MLPs are weight-ensembling MoEs; routing ignores the task name."""

    def __init__(self, encoder: nn.Module, tasks: Sequence[str], heads: nn.ModuleDict, moe_blocks: Sequence[int]):
        super().__init__(tasks, heads)
        self.encoder = encoder
        self.moe_blocks = list(moe_blocks)

    def moe_layers(self) -> list[WeightEnsemblingMLP]:
        blocks = blocks_of(self.encoder)
        return [blocks[i].mlp for i in self.moe_blocks]

    @torch.no_grad()
    def routing_weights(self, images: torch.Tensor, task: str) -> torch.Tensor:
        """Routing weights r(x) of each sample in each MoE block: [samples, blocks, tasks]."""
        self.encode(images, task)
        return torch.stack([m.last_routing for m in self.moe_layers()], dim=1)


def build_wemoe(suite: Suite, params: WEMoEParams) -> WEMoEModel:
    """Task arithmetic at ``init_lambda`` with the chosen MLPs swapped for MoEs (fresh routers)."""
    vectors = suite.task_vectors()
    encoder = suite.build_encoder()
    encoder.load_state_dict(tv.add_scaled(suite.pretrained, vectors, [params.init_lambda] * len(vectors)))
    encoder.requires_grad_(False)
    blocks = blocks_of(encoder)
    chosen = parse_blocks(params.blocks, len(blocks))
    width = blocks[0].mlp.c_fc.in_features
    shared = Router(width, len(vectors), params.router_depth, params.init_lambda) if params.shared_router else None
    for i in chosen:
        prefix = f"transformer.resblocks.{i}.mlp."
        w0 = {n: suite.pretrained[prefix + n] for n in _MLP_TENSORS}
        taus = [{n: prune_magnitude(v[prefix + n], params.prune) for n in _MLP_TENSORS} for v in vectors]
        router = shared if shared is not None else Router(width, len(vectors), params.router_depth, params.init_lambda)
        blocks[i].mlp = WeightEnsemblingMLP(blocks[i].mlp.gelu, w0, taus, router)
    return WEMoEModel(encoder, suite.tasks, suite.make_heads(), chosen)


@torch.no_grad()
def mean_routing(model: WEMoEModel, suite: Suite, device: str = "cpu", batch_size: int = 256) -> dict[str, list[list[float]]]:
    """Mean routing weight per (eval task, block, expert task) over each task's test images."""
    out = {}
    for task in model.tasks:
        total, n = 0.0, 0
        for images, _ in suite.data[task].batches("test", batch_size):
            total = total + model.routing_weights(images.to(device), task).sum(dim=0)
            n += len(images)
        out[task] = (total / n).cpu().tolist()
    return out


class WEMoE(MergeMethod):
    """Weight-Ensembling MoE (Tang et al., ICML 2024); E-WEMoE with ``prune=0.9, shared_router=True``.

    ``fast`` preset: 25 steps at lr 1e-3, 10x the paper's 1e-4, because 25 steps at 1e-4 barely move
    the routers (on micro the summed entropy changed by < 0.01). The batched MoE costs about T times a
    plain MLP, so one step on the 8-task mini8 suite is roughly a second on one CPU core.
    """

    name = "wemoe"
    title = "WEMoE"
    paper_url = "https://arxiv.org/abs/2402.00433"
    Params = WEMoEParams
    presets = {
        "paper": {"steps": 1000, "batch_size": 16, "lr": 1e-4},
        "fast": {"steps": 25, "batch_size": 16, "lr": 1e-3},
    }

    def build(self, suite: Suite, params: WEMoEParams, ctx: BuildContext = BuildContext()) -> WEMoEModel:
        return build_wemoe(suite, params)

    def adapt(self, model: WEMoEModel, suite: Suite, params: WEMoEParams, ctx: RunContext) -> dict:
        """Sum over tasks of the mean entropy of each task's head on a test batch; one Adam step (§3)."""
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.Adam(trainable, lr=params.lr)
        gen = torch.Generator().manual_seed(ctx.seed)
        streams = {t: unlabeled_batches(suite, t, params.batch_size, gen, ctx.device) for t in model.tasks}

        def step(_: int, update: bool) -> tuple[float, dict[str, float]]:
            with torch.set_grad_enabled(update):
                parts = {t: entropy(model.logits(next(streams[t]), t)) for t in model.tasks}
                loss = sum(parts.values())
            if update:
                opt.zero_grad()
                loss.backward()
                opt.step()
            return loss.item(), {t: v.item() for t, v in parts.items()}

        log_every = 10
        probes = {"test_accuracy": accuracy_probe(model, suite, ctx.device)} if params.analysis_test_accuracy else {}
        trajectory = Trajectory(params.steps, probes)
        losses = optimize(params.steps, step, ctx.progress, desc="WEMoE routers", log_every=log_every, trajectory=trajectory)
        stored = sum(int((b != 0).sum()) for m in model.moe_layers() for n, b in m.named_buffers() if "tau" in n)
        return {
            "loss": losses,
            "log_every": log_every,
            "blocks": model.moe_blocks,
            "routing": mean_routing(model, suite, ctx.device),
            "nonzero_task_vector_entries": stored,
            "trajectory": trajectory.data,
        }
