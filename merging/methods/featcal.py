"""FeatCal: closed-form, layer-by-layer recalibration of a merged model from a few unlabeled train images.

Gu et al., "Feature Calibration for post-merging models" (2026); official code ``egangu/featcal`` at 18c68b6
(``src/featcal/featcal.py``, ``src/featcal/solver.py``; algorithms_frontier.md §10). The transformer blocks are
recalibrated in forward order; embeddings, ln_pre, ln_post and the projection keep the base merge. For block l,
the merged ("student") model's inputs come through the blocks already calibrated, each expert's through its own
blocks; every Linear and LayerNorm in the block records its input on both sides, and the teacher input is
x_t = a·x_e + (1 − a)·x_s. With second moments C_ss = E[x_s x_sᵀ], C_st = E[x_s x_tᵀ] (token weights 1, except
0.01 on the patch tokens in the last block for every module but the k and v projections) and n_k = ‖C_ss,k‖_F:

- Linear weight: (Σ_k C_ss,k/n_k + (λ + ε) I) Wᵀ = Σ_k (C_st,k/n_k) W_kᵀ + λ Aᵀ, anchor A = ρ·W_merged + (1 − ρ)·W₀;
- Linear bias, with the new W: b = [Σ_k (b_k + W_k μ_t,k − W μ_s,k)/n_k + λ A_b] / (Σ_k 1/n_k + λ);
- LayerNorm affine, per channel on z = LN(x_s) without affine: the 2×2 least-squares system in (γ, β) with the
  expert's affine as target and the same ridge towards the anchor.

open_clip port: ``attn.in_proj_weight`` is solved as three Linears (q, k, v row blocks) sharing the ln_1
output, and the input of ``attn.out_proj`` (the attention output, which a module hook on the fused
``nn.MultiheadAttention`` never sees) is computed here, so the block's forward is written out once
(``block_forward``) and checked against open_clip's in the tests. The result is again one plain model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from merging.errors import ConfigError
from merging.methods.base import BuildContext, MergeMethod, RunContext, RunInput, hyperparameter, method_name, nested_params
from merging.model import StaticModel, blocks_of, plain_state
from merging.progress import track
from merging.suites.base import Suite

StateDict = dict[str, torch.Tensor]
LINEARS = ("q", "k", "v", "attn.out_proj", "mlp.c_fc", "mlp.c_proj")
NORMS = ("ln_1", "ln_2")
PATCH_WEIGHT = 0.01
"""Weight of the patch tokens in the last block's statistics (all modules but k and v; ``_token_weights_for_module``)."""


@dataclass(frozen=True)
class FeatCalParams:
    base: str = method_name("task_arithmetic", "The merge FeatCal recalibrates: any merge that gives one plain model (task arithmetic "
                                               "λ = 0.3 in the paper), or adamerging (its cached run is reused).",
                            exclude=("individual", "tall_masks", "emr", "surgery", "wemoe", "tinting"))
    base_params: dict[str, Any] = nested_params("base", "The base merge's own hyperparameters, spelled base.KEY=VALUE, e.g. base.scaling=0.3.")
    calibration_images: int = hyperparameter(256, "Unlabeled images per task from the train split, never test (num_calibration_examples "
                                                  "= 256 in the released code; 8 still works in the paper).", unit="images", low=1)
    batch_size: int = hyperparameter(16, "Calibration images per forward batch (calibration_batch_size).", unit="images", low=1)
    teacher_alpha: float = hyperparameter(0.25, "a in the teacher input a·x_expert + (1 − a)·x_student (teacher_interp_alpha 0.25 in "
                                                "the released script; 0.3 in the paper).", low=0.0, high=1.0)
    ridge: float = hyperparameter(0.05, "λ pulling every solved weight towards the anchor (lambda_ratio; absolute, as the covariances "
                                        "are normalised).", unit="λ", low=0.0)
    anchor_rho: float = hyperparameter(2.2, "ρ of the anchor ρ·θ_merged + (1 − ρ)·θ₀, an extrapolation of the merge away from θ₀ "
                                            "(anchor_blend_rho 2.2 in the released code; 2.0 in the paper).", unit="ρ")
    calibrate_bias: bool = hyperparameter(True, "Also solve every Linear's bias (calibrate_bias).")
    calibrate_layernorm: bool = hyperparameter(True, "Also solve every LayerNorm's affine (calibrate_layernorm).")
    shuffle_seed: int = hyperparameter(42, "Seed of the shuffle that picks the calibration images (42 in the released code).")


# ----------------------------------------------------------------------------------------------- the block
def _layer_norm(x: torch.Tensor, params: Mapping[str, torch.Tensor], name: str, eps: float) -> torch.Tensor:
    return F.layer_norm(x, x.shape[-1:], params[f"{name}.weight"], params[f"{name}.bias"], eps)


def _layer_scale(block: nn.Module, name: str, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    return x * params[f"{name}.gamma"] if f"{name}.gamma" in params else getattr(block, name)(x)


def block_forward(block: nn.Module, params: Mapping[str, torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """open_clip's ``ResidualAttentionBlock`` on x [B, N, d] (batch first) with weights ``params`` (the block's
    state-dict names); returns the output and the input of every module FeatCal solves, by ``LINEARS``/``NORMS``
    name (q, k and v share the ln_1 output; ``attn.out_proj`` gets the attention output before projection)."""
    eps1, eps2 = block.ln_1.eps, block.ln_2.eps
    heads = block.attn.num_heads
    a = _layer_norm(x, params, "ln_1", eps1)
    q, k, v = F.linear(a, params["attn.in_proj_weight"], params["attn.in_proj_bias"]).chunk(3, dim=-1)
    b, n, d = x.shape
    q, k, v = (t.reshape(b, n, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
    h = x + _layer_scale(block, "ls_1", params, F.linear(o, params["attn.out_proj.weight"], params["attn.out_proj.bias"]))
    c = _layer_norm(h, params, "ln_2", eps2)
    g = block.mlp.gelu(F.linear(c, params["mlp.c_fc.weight"], params["mlp.c_fc.bias"]))
    out = h + _layer_scale(block, "ls_2", params, F.linear(g, params["mlp.c_proj.weight"], params["mlp.c_proj.bias"]))
    return out, {"ln_1": x, "q": a, "k": a, "v": a, "attn.out_proj": o, "ln_2": h, "mlp.c_fc": c, "mlp.c_proj": g}


def linear_params(params: Mapping[str, torch.Tensor], name: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight [out, in] and bias [out] of a ``LINEARS`` module; q, k and v are row blocks of ``attn.in_proj_*``."""
    if name in ("q", "k", "v"):
        i = "qkv".index(name)
        w, b = params["attn.in_proj_weight"], params["attn.in_proj_bias"]
        rows = w.shape[0] // 3
        return w[i * rows:(i + 1) * rows], b[i * rows:(i + 1) * rows]
    return params[f"{name}.weight"], params[f"{name}.bias"]


# ------------------------------------------------------------------------------------------ the statistics
class Moments:
    """Weighted running sums over tokens for one module and one task: means and (cross) second moments."""

    def __init__(self) -> None:
        self.sums: dict[str, torch.Tensor] = {}

    def add(self, **parts: torch.Tensor) -> None:
        for key, value in parts.items():
            self.sums[key] = self.sums[key] + value if key in self.sums else value

    def mean(self, key: str) -> torch.Tensor:
        return self.sums[key] / self.sums["w"]


def token_weights(x: torch.Tensor, name: str, last: bool) -> torch.Tensor:
    """[B, N] weights: 1, except ``PATCH_WEIGHT`` on the patch tokens (all but token 0, the class token) in the last block for every module but k and v."""
    w = torch.ones(x.shape[:2], dtype=x.dtype, device=x.device)
    if last and name not in ("k", "v") and x.shape[1] > 1:
        w[:, 1:] = PATCH_WEIGHT
    return w


def accumulate(stats: dict[str, Moments], student: Mapping[str, torch.Tensor], expert: Mapping[str, torch.Tensor], alpha: float, last: bool,
               eps: Mapping[str, float]) -> None:
    """Add one batch of student and expert module inputs to ``stats`` (one ``Moments`` per module)."""
    for name in LINEARS + NORMS:
        xs = student[name]
        w = token_weights(xs, name, last).reshape(-1, 1)
        xs = xs.reshape(-1, xs.shape[-1])
        m = stats.setdefault(name, Moments())
        if name in NORMS:
            z = F.layer_norm(xs, xs.shape[-1:], eps=eps[name])
            m.add(z=(z * w).sum(0), z2=(z.square() * w).sum(0), w=w.sum())
            continue
        xt = alpha * expert[name].reshape(-1, xs.shape[-1]) + (1 - alpha) * xs
        m.add(xs=(xs * w).sum(0), xt=(xt * w).sum(0), ss=xs.T @ (xs * w), st=xs.T @ (xt * w), w=w.sum())


# ---------------------------------------------------------------------------------------------- the solves
def solve_linear_weight(moments: Sequence[Moments], expert_weights: Sequence[torch.Tensor], anchor: torch.Tensor, ridge: float,
                        eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """W [out, in] minimising Σ_k E‖W x_s − W_k x_t‖²/n_k + λ‖W − A‖²_F, and the scales 1/n_k (``featcal_merge_linear_weight``)."""
    covs = [m.mean("ss") for m in moments]
    scales = torch.stack([1 / c.norm().clamp_min(eps) for c in covs])
    lhs = sum(s * c for s, c in zip(scales, covs, strict=True)) + (ridge + eps) * torch.eye(covs[0].shape[0], dtype=covs[0].dtype)
    rhs = sum(s * m.mean("st") @ w.T for s, m, w in zip(scales, moments, expert_weights, strict=True))
    if ridge > 0:
        rhs = rhs + ridge * anchor.T
    try:
        solution = torch.linalg.solve(lhs, rhs)
    except RuntimeError:  # singular: the pseudo-inverse, as the released solver
        solution = torch.linalg.pinv(lhs) @ rhs
    return solution.T.contiguous(), scales


def solve_linear_bias(moments: Sequence[Moments], scales: torch.Tensor, weight: torch.Tensor, experts: Sequence[tuple[torch.Tensor, torch.Tensor]],
                      anchor: torch.Tensor, ridge: float) -> torch.Tensor:
    """b [out] = [Σ_k (b_k + W_k μ_t,k − W μ_s,k)/n_k + λ A_b] / (Σ_k 1/n_k + λ) (``featcal_merge_linear_bias``)."""
    rhs = sum(s * (b_k + w_k @ m.mean("xt") - weight @ m.mean("xs")) for s, m, (w_k, b_k) in zip(scales, moments, experts, strict=True))
    denom = scales.sum()
    if ridge > 0:
        rhs, denom = rhs + ridge * anchor, denom + ridge
    return rhs / denom.clamp_min(torch.finfo(rhs.dtype).eps)


def solve_layer_norm(moments: Sequence[Moments], experts: Sequence[tuple[torch.Tensor, torch.Tensor]], anchor: tuple[torch.Tensor, torch.Tensor],
                     ridge: float, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """(γ, β) per channel minimising Σ_k E[(γz + β − γ_k z − β_k)²] + λ[(γ − A_γ)² + (β − A_β)²] (``featcal_merge_layernorm_affine``)."""
    e2 = sum(m.mean("z2") for m in moments)
    e1 = sum(m.mean("z") for m in moments)
    rhs_g = sum(m.mean("z2") * g + m.mean("z") * b for m, (g, b) in zip(moments, experts, strict=True)) + ridge * anchor[0]
    rhs_b = sum(m.mean("z") * g + b for m, (g, b) in zip(moments, experts, strict=True)) + ridge * anchor[1]
    a11, a22 = e2 + ridge, len(moments) + ridge
    det = (a11 * a22 - e1.square()).clamp_min(eps)
    return (a22 * rhs_g - e1 * rhs_b) / det, (a11 * rhs_b - e1 * rhs_g) / det


def calibrate_block(moments: Sequence[Mapping[str, Moments]], merged: Mapping[str, torch.Tensor], pretrained: Mapping[str, torch.Tensor],
                    experts: Sequence[Mapping[str, torch.Tensor]], params: FeatCalParams) -> StateDict:
    """One block's new weights (block-local names) from each task's statistics and the merged, pretrained and expert weights."""
    rho, ridge = params.anchor_rho, params.ridge
    out = dict(merged)

    def anchor(m: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
        return rho * m + (1 - rho) * p

    solved: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for name in LINEARS:
        (w_m, b_m), (w_0, b_0) = linear_params(merged, name), linear_params(pretrained, name)
        per_task = [linear_params(e, name) for e in experts]
        stats = [m[name] for m in moments]
        weight, scales = solve_linear_weight(stats, [w for w, _ in per_task], anchor(w_m, w_0), ridge)
        bias = solve_linear_bias(stats, scales, weight, per_task, anchor(b_m, b_0), ridge) if params.calibrate_bias else b_m
        solved[name] = (weight, bias)
    out["attn.in_proj_weight"] = torch.cat([solved[n][0] for n in "qkv"])
    out["attn.in_proj_bias"] = torch.cat([solved[n][1] for n in "qkv"])
    for name in LINEARS[3:]:
        out[f"{name}.weight"], out[f"{name}.bias"] = solved[name]
    if params.calibrate_layernorm:
        for name in NORMS:
            w, b = f"{name}.weight", f"{name}.bias"
            out[w], out[b] = solve_layer_norm([m[name] for m in moments], [(e[w], e[b]) for e in experts],
                                              (anchor(merged[w], pretrained[w]), anchor(merged[b], pretrained[b])), ridge)
    return out


# ---------------------------------------------------------------------------------------------- the method
class _Stop(Exception):
    pass


def block_inputs(encoder: nn.Module, state: Mapping[str, torch.Tensor], images: torch.Tensor) -> torch.Tensor:
    """The hidden states entering the first transformer block, [B, N, d] batch first, with weights ``state``."""
    captured: list[torch.Tensor] = []

    def hook(_m: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _Stop

    handle = blocks_of(encoder)[0].register_forward_pre_hook(hook)
    try:
        functional_call(encoder, dict(state), (images,))
    except _Stop:
        pass
    finally:
        handle.remove()
    x = captured[0]
    return x if getattr(encoder.transformer, "batch_first", True) else x.transpose(0, 1)


def _block_state(state: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def calibration_images(suite: Suite, task: str, count: int, seed: int) -> torch.Tensor:
    """``count`` unlabeled *train* images of ``task`` (uint8 [n, H, W, 3]) in a seeded shuffle; never the test split."""
    data = suite.data[task]
    if data.train_images is None or len(data.train_images) == 0:
        raise ConfigError(f"task {task!r} has no train split: FeatCal calibrates on unlabeled train images, never on test images; "
                          "give the task a train folder (or use surgery, which adapts on test images)")
    order = torch.randperm(len(data.train_images), generator=torch.Generator().manual_seed(seed))
    return data.train_images[order[:count]]


class FeatCalModel(StaticModel):
    """The base merge, recalibrated in place; its saved state is the whole encoder, though nothing in it is trained by gradients."""

    def trainable_state(self) -> StateDict:
        return {k: v.detach().cpu().clone() for k, v in self.encoder.state_dict().items()}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        missing = sorted(set(self.encoder.state_dict()) - set(state))
        if missing:
            raise ConfigError(f"saved FeatCal state lacks encoder tensor(s): {missing[:3]}")
        self.encoder.load_state_dict(dict(state))


class FeatCal(MergeMethod):
    name = "featcal"
    title = "FeatCal (feature calibration)"
    paper_url = "https://github.com/egangu/featcal"
    Params = FeatCalParams

    def inputs(self, params: FeatCalParams) -> dict[str, RunInput]:
        return {"base": RunInput(params.base, params.base_params)}

    def build(self, suite: Suite, params: FeatCalParams, ctx: BuildContext = BuildContext()) -> FeatCalModel:
        base = ctx.input("base", self.name)
        state = plain_state(base)
        if state is None:
            raise ConfigError(f"method {self.name!r}: the base must give one plain model (a static merge or adamerging), got a {type(base).__name__}")
        return FeatCalModel(suite.build_encoder(), state, suite.tasks, suite.make_heads())

    def data_used(self, params: FeatCalParams, suite: Suite) -> dict[str, Any]:
        counts = [len(suite.data[t].train_images) if suite.data[t].train_images is not None else 0 for t in suite.tasks]
        return {"split": "train", "images": sum(min(params.calibration_images, n) for n in counts)}

    @torch.no_grad()
    def adapt(self, model: FeatCalModel, suite: Suite, params: FeatCalParams, ctx: RunContext) -> dict:
        encoder, device = model.encoder, ctx.device
        merged = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
        experts = [{k: v.to(device) for k, v in suite.finetuned[t].items()} for t in model.tasks]
        pretrained = {k: v.to(device) for k, v in suite.pretrained.items()}
        images = {t: calibration_images(suite, t, params.calibration_images, params.shuffle_seed) for t in model.tasks}
        student: dict[str, list[torch.Tensor]] = {}
        teacher: dict[str, list[torch.Tensor]] = {}
        for i, t in enumerate(model.tasks):
            batches = [suite.data[t].preprocess(images[t][j:j + params.batch_size]).to(device) for j in range(0, len(images[t]), params.batch_size)]
            student[t] = [block_inputs(encoder, merged, b) for b in batches]
            teacher[t] = [block_inputs(encoder, experts[i], b) for b in batches]
        blocks = blocks_of(encoder)
        eps = {n: getattr(blocks[0], n).eps for n in NORMS}
        state = dict(merged)
        for layer in track(range(len(blocks)), desc="FeatCal: calibrating blocks", progress=ctx.progress):
            prefix = f"transformer.resblocks.{layer}."
            block, last = blocks[layer], layer == len(blocks) - 1
            current = _block_state(state, prefix)
            expert_blocks = [_block_state(e, prefix) for e in experts]
            moments: list[dict[str, Moments]] = []
            for i, t in enumerate(model.tasks):
                stats: dict[str, Moments] = {}
                for j, (xs, xe) in enumerate(zip(student[t], teacher[t], strict=True)):
                    _, s_in = block_forward(block, current, xs)
                    out_e, e_in = block_forward(block, expert_blocks[i], xe)
                    accumulate(stats, s_in, e_in, params.teacher_alpha, last, eps)
                    teacher[t][j] = out_e
                moments.append(stats)
            calibrated = calibrate_block(moments, current, _block_state(pretrained, prefix), expert_blocks, params)
            state.update({prefix + k: v for k, v in calibrated.items()})
            if not last:
                student = {t: [block_forward(block, calibrated, xs)[0] for xs in xs_list] for t, xs_list in student.items()}
        encoder.load_state_dict(state)
        return {"calibration_images": {t: len(images[t]) for t in model.tasks}, "split": "train",
                "changed_blocks": len(blocks), "relative_change": _relative_change(merged, state)}


def _relative_change(before: Mapping[str, torch.Tensor], after: Mapping[str, torch.Tensor]) -> float:
    """‖θ_FeatCal − θ_base‖ / ‖θ_base‖ over the float tensors: how far calibration moved the merge."""
    diff = sum(float((after[k].float() - v.float()).square().sum()) for k, v in before.items() if v.is_floating_point())
    norm = sum(float(v.float().square().sum()) for v in before.values() if v.is_floating_point())
    return (diff / norm) ** 0.5 if norm > 0 else 0.0
