"""The functional merged forward shared by AdaMerging, Model Tinting and WEMoE (algorithms.md §1, §3, §4).

theta(Lambda) = theta_0 + sum_k Lambda[p, k] tau_k^p is rebuilt from trainable coefficients at every
forward and run through one encoder module with ``torch.func.functional_call``: no weights are copied
in a Python loop over steps, and gradients flow to the coefficients.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import nn
from torch.func import functional_call

from merging.model import encoder_block_features

StateDict = dict[str, torch.Tensor]


class MergedEncoder(nn.Module):
    """An encoder whose weights are theta_0 + sum_k lambda_{p,k} tau_k with coefficients in [0, 1].

    ``granularity="task"``: one lambda per task (task-wise AdaMerging); ``"layer"``: one per state-dict
    tensor per task (layer-wise). Coefficients start at ``init`` (0.3), are clamped to [clamp_min,
    clamp_max] in the forward pass (so they may stick at the bounds), and theta_0's weight stays 1.
    """

    def __init__(
        self,
        encoder: nn.Module,
        pretrained: Mapping[str, torch.Tensor],
        vectors: Sequence[Mapping[str, torch.Tensor]],
        granularity: str = "layer",
        init: float = 0.3,
        clamp: tuple[float, float] | None = (0.0, 1.0),
        trainable: bool = True,
    ):
        super().__init__()
        if granularity not in ("task", "layer"):
            raise ValueError(f"granularity must be 'task' or 'layer', got {granularity!r}")
        self.encoder = encoder.requires_grad_(False)
        self.keys = [k for k, v in pretrained.items() if v.is_floating_point()]
        self.other = {k: v for k, v in pretrained.items() if not v.is_floating_point()}
        self.granularity = granularity
        self.clamp = clamp
        for i, k in enumerate(self.keys):
            self.register_buffer(f"theta0_{i}", pretrained[k].float().clone(), persistent=False)
            self.register_buffer(f"tau_{i}", torch.stack([v[k].float() for v in vectors]), persistent=False)
        rows = len(self.keys) if granularity == "layer" else 1
        self.coefficients = nn.Parameter(torch.full((rows, len(vectors)), float(init)), requires_grad=trainable)

    @property
    def num_tasks(self) -> int:
        return self.coefficients.shape[1]

    def lambdas(self) -> torch.Tensor:
        """The coefficients as used in the forward pass: [P or 1, T], clamped."""
        c = self.coefficients
        return c.clamp(*self.clamp) if self.clamp is not None else c

    def merged_params(self) -> StateDict:
        lam = self.lambdas()
        out: StateDict = {}
        for i, k in enumerate(self.keys):
            theta0, tau = getattr(self, f"theta0_{i}"), getattr(self, f"tau_{i}")
            row = lam[i if self.granularity == "layer" else 0]
            out[k] = theta0 + torch.tensordot(row, tau, dims=1)
        out.update(self.other)
        return out

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return functional_call(self.encoder, self.merged_params(), (images,))

    def block_features(self, images: torch.Tensor) -> list[torch.Tensor]:
        return encoder_block_features(self.encoder, images, self.merged_params())

    def stored_tensors(self) -> list[torch.Tensor]:
        """Once the coefficients are fixed the merge is one plain model: that is what a deployment stores."""
        return list(self.merged_params().values())

    @torch.no_grad()
    def merged_state_dict(self) -> StateDict:
        """The merged weights as a plain state dict (for export or a static copy)."""
        return {k: v.detach().clone() for k, v in self.merged_params().items()}
