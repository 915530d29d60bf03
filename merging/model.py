"""The one abstraction every method answers: a multi-task model with ``encode`` and ``logits``.

``encode(images, task)`` is the visual encoder's unnormalized output embedding (where Surgery acts,
algorithms.md §2); ``logits(images, task)`` applies the task's head to it. Pretrained, individual,
every merge, Surgery, WEMoE and Tinting all answer these calls, so evaluation, features and plots are
written once (DESIGN.md, "The one abstraction").
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from merging.errors import ConfigError

StateDict = dict[str, torch.Tensor]


def build_encoder(config: Mapping) -> nn.Module:
    """An image encoder from a small architecture config (open_clip's ``VisionTransformer`` or a named model)."""
    kind = config.get("kind", "vit")
    if kind == "vit":
        from open_clip.transformer import VisionTransformer

        kw = {k: v for k, v in config.items() if k != "kind"}
        return VisionTransformer(**kw)
    if kind == "open_clip":
        return create_open_clip(config["name"], **config.get("kwargs", {})).visual
    raise ConfigError(f"unknown encoder kind {kind!r}; known: 'vit', 'open_clip'")


_RANDOM_INIT_NOTICE = "No pretrained weights loaded for model"
"""open_clip's warning for ``pretrained=None`` (open_clip/factory.py). MergeLens always asks for random
weights and loads its own, so the notice reports no problem; stderr is kept for problems."""


class _DropRandomInitNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not (record.getMessage().startswith(_RANDOM_INIT_NOTICE) and "open_clip" in record.pathname)


class _LastResort(logging.Handler):
    """Hands records to ``logging.lastResort``, as Python does when the root logger has no handler."""

    def emit(self, record: logging.LogRecord) -> None:
        last = logging.lastResort
        if last is not None and record.levelno >= last.level:
            last.handle(record)


@contextmanager
def _without_random_init_notice() -> Iterator[None]:
    """Drop only open_clip's random-init notice while a model is created; every other record passes.

    open_clip logs through the root logger with ``logging.warning``, so the filter sits on the root logger
    (a filter there sees only records logged on root itself, not those of other libraries' loggers), and
    only for the duration of the call. ``logging.warning`` also calls ``basicConfig()`` when the root
    logger has no handler, which would leave a stderr handler behind for the whole process; a temporary
    handler that does what Python does without one (``logging.lastResort``) keeps logging as it was.
    """
    root = logging.getLogger()
    notice = _DropRandomInitNotice()
    fallback = _LastResort() if not root.handlers else None
    root.addFilter(notice)
    if fallback is not None:
        root.addHandler(fallback)
    try:
        yield
    finally:
        root.removeFilter(notice)
        if fallback is not None:
            root.removeHandler(fallback)


def create_open_clip(name: str, **kwargs) -> nn.Module:
    """An open_clip model with random weights (``pretrained=None``: nothing is downloaded), created quietly.

    The one place MergeLens creates open_clip models, so the expected random-init notice is dropped once,
    for every caller, and nothing else is silenced.
    """
    import open_clip

    with _without_random_init_notice():
        return open_clip.create_model(name, pretrained=None, **kwargs)


class Head(nn.Module):
    """h(z) = W (z / ||z||) + b, the logit scale folded into W (algorithms.md §0)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, trainable: bool = False):
        super().__init__()
        bias = torch.zeros(weight.shape[0]) if bias is None else bias
        self.weight = nn.Parameter(weight.detach().clone().float(), requires_grad=trainable)
        self.bias = nn.Parameter(bias.detach().clone().float(), requires_grad=trainable)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.linear(F.normalize(features, dim=-1), self.weight, self.bias)


def make_heads(heads: Mapping[str, Mapping[str, torch.Tensor]], trainable: bool = False) -> nn.ModuleDict:
    return nn.ModuleDict({t: Head(h["weight"], h.get("bias"), trainable) for t, h in heads.items()})


class MultiTaskModel(nn.Module):
    """Base class: subclasses implement ``encode``; ``logits`` applies the task's head.

    Trainable state (what a run saves and reloads) is the set of parameters with ``requires_grad``;
    frozen weights are buffers or frozen parameters, rebuilt deterministically from the suite.
    """

    def __init__(self, tasks: Sequence[str], heads: nn.ModuleDict):
        super().__init__()
        self.tasks = list(tasks)
        self.heads = heads

    def check_task(self, task: str) -> None:
        if task not in self.heads:
            raise ConfigError(f"unknown task {task!r}; this model knows: {', '.join(self.tasks)}")

    def encode(self, images: torch.Tensor, task: str) -> torch.Tensor:
        raise NotImplementedError

    def logits(self, images: torch.Tensor, task: str) -> torch.Tensor:
        self.check_task(task)
        return self.heads[task](self.encode(images, task))

    def block_features(self, images: torch.Tensor, task: str) -> list[torch.Tensor]:
        """Token-mean of every transformer block's output (SurgeryV2's per-layer view)."""
        raise NotImplementedError(f"{type(self).__name__} does not expose per-block features")

    def encode_with_blocks(self, images: torch.Tensor, task: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``(encode, block_features)``; models whose encoding is one plain encoder forward give both from that one
        forward (feature extraction with every block: one pass, not two)."""
        return self.encode(images, task), self.block_features(images, task)

    def trainable_state(self) -> StateDict:
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}

    def held_tensors(self) -> dict[str, torch.Tensor]:
        """Tensors the model holds outside its parameters and buffers (per-task states), by name."""
        return {}

    def load_trainable_state(self, state: Mapping[str, torch.Tensor]) -> None:
        params = dict(self.named_parameters())
        missing = [k for k in state if k not in params]
        if missing:
            raise ConfigError(f"saved state has unknown parameter(s): {missing[:3]}")
        with torch.no_grad():
            for k, v in state.items():
                params[k].copy_(v)


def blocks_of(encoder: nn.Module) -> Sequence[nn.Module]:
    return encoder.transformer.resblocks


def encoder_forward_with_blocks(
    encoder: nn.Module, images: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One forward of an open_clip ViT (optionally with ``params``): its output and the token-mean of each block
    output (hooks on its blocks)."""
    outs: list[torch.Tensor] = []
    hooks = [b.register_forward_hook(lambda _m, _i, o: outs.append(o.mean(dim=1))) for b in blocks_of(encoder)]
    try:
        z = encoder(images) if params is None else functional_call(encoder, dict(params), (images,))
    finally:
        for h in hooks:
            h.remove()
    return z, outs


def encoder_block_features(
    encoder: nn.Module, images: torch.Tensor, params: Mapping[str, torch.Tensor] | None = None
) -> list[torch.Tensor]:
    """Token-mean of each block output of an open_clip ViT (hooks on its blocks), optionally with ``params``."""
    return encoder_forward_with_blocks(encoder, images, params)[1]


class SharedEncoderModel(MultiTaskModel):
    """One encoder module (``self.encoder``) for every task; only the heads differ. Subclasses set the encoder."""

    encoder: nn.Module

    def encode(self, images: torch.Tensor, task: str) -> torch.Tensor:
        self.check_task(task)
        return self.encoder(images)

    def block_features(self, images: torch.Tensor, task: str) -> list[torch.Tensor]:
        self.check_task(task)
        return encoder_block_features(self.encoder, images)

    def encode_with_blocks(self, images: torch.Tensor, task: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if type(self).encode is not SharedEncoderModel.encode or type(self).block_features is not SharedEncoderModel.block_features:
            return super().encode_with_blocks(images, task)
        self.check_task(task)
        return encoder_forward_with_blocks(self.encoder, images)


class StaticModel(SharedEncoderModel):
    """One set of weights for every task: pretrained, weight averaging, task arithmetic, TIES."""

    def __init__(self, encoder: nn.Module, state: Mapping[str, torch.Tensor], tasks: Sequence[str], heads: nn.ModuleDict):
        super().__init__(tasks, heads)
        self.encoder = encoder
        self.encoder.load_state_dict(dict(state))
        self.encoder.requires_grad_(False)


def plain_state(model: MultiTaskModel) -> StateDict | None:
    """The one encoder state of a model that is one plain model (a static merge, an AdaMerging-style merged encoder at
    its learned coefficients, FeatCal's recalibrated weights); None for models with per-task parts or added modules."""
    encoder = getattr(model, "encoder", None)
    if callable(getattr(encoder, "merged_state_dict", None)):
        return encoder.merged_state_dict()
    if isinstance(model, StaticModel):
        return {k: v.detach().cpu().clone() for k, v in model.encoder.state_dict().items()}
    return None


class TaskStateModel(MultiTaskModel):
    """Base class: one encoder module run by ``functional_call`` with the weights ``state_for(task, device)`` gives."""

    encoder: nn.Module

    def state_for(self, task: str, device: torch.device) -> StateDict:
        raise NotImplementedError

    def encode(self, images: torch.Tensor, task: str) -> torch.Tensor:
        self.check_task(task)
        return functional_call(self.encoder, self.state_for(task, images.device), (images,))

    def block_features(self, images: torch.Tensor, task: str) -> list[torch.Tensor]:
        self.check_task(task)
        return encoder_block_features(self.encoder, images, self.state_for(task, images.device))

    def encode_with_blocks(self, images: torch.Tensor, task: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if type(self).encode is not TaskStateModel.encode or type(self).block_features is not TaskStateModel.block_features:
            return super().encode_with_blocks(images, task)
        self.check_task(task)
        return encoder_forward_with_blocks(self.encoder, images, self.state_for(task, images.device))


class PerTaskModel(TaskStateModel):
    """One encoder state per task run through one module by ``functional_call``: the individual models.

    Holds state dicts, not module copies, so T tasks cost T sets of weights and one module. With
    ``offload`` (the default) the states stay in CPU memory when the module moves to a GPU and one
    task's state is copied over at a time (kept until another task is asked for): a ViT-L/14 8-task
    suite then holds one extra encoder on the GPU, not eight.
    """

    def __init__(self, encoder: nn.Module, states: Mapping[str, Mapping[str, torch.Tensor]], heads: nn.ModuleDict, offload: bool = True):
        super().__init__(list(states), heads)
        self.encoder = encoder.requires_grad_(False)
        self.states = {t: dict(s) for t, s in states.items()}
        self.offload = offload
        self._resident: tuple[str, torch.device, StateDict] | None = None

    def _apply(self, fn, recurse=True):  # keep the per-task states on the module's device (or on the CPU, offloaded)
        super()._apply(fn, recurse)
        self._resident = None
        on_cpu = all(p.device.type == "cpu" for p in self.encoder.parameters())
        if not (self.offload and not on_cpu):
            self.states = {t: {k: fn(v) for k, v in s.items()} for t, s in self.states.items()}
        return self

    def state_for(self, task: str, device: torch.device) -> StateDict:
        """Task ``task``'s encoder state on ``device`` (copied from the CPU when offloaded)."""
        state = self.states[task]
        if next(iter(state.values())).device == device:
            return state
        if self._resident is None or self._resident[:2] != (task, device):
            self._resident = None
            self._resident = (task, device, {k: v.to(device, non_blocking=True) for k, v in state.items()})
        return self._resident[2]

    def stored_tensors(self) -> list[torch.Tensor]:
        """The T encoder states and the heads; the module's own weights only give the architecture."""
        return [*self.heads.parameters(), *(v for s in self.states.values() for v in s.values())]

    def held_tensors(self) -> dict[str, torch.Tensor]:
        return {f"{t}/{k}": v for t, s in self.states.items() for k, v in s.items()}


class MaskedTaskModel(TaskStateModel):
    """Storage-lane models that need the task id: θ_t = θ₀ + s_t·(m_t ⊙ v) (algorithms_frontier.md §6, §7).

    One shared float vector ``v`` (TALL masks: τ_MTL; EMR: the unified task vector τ_uni), one boolean mask
    ``m_t`` per task and one scalar ``s_t`` per task (TALL: 1; EMR: the rescaler λ_t). Task t's weights are
    built when the task is asked for and kept until another task is (so T tasks cost one extra encoder in
    memory, not T). ``stored_tensors`` is what a deployment keeps: θ₀, v, T bit masks, T scalars.
    """

    def __init__(self, encoder: nn.Module, pretrained: Mapping[str, torch.Tensor], vector: Mapping[str, torch.Tensor],
                 masks: Mapping[str, Mapping[str, torch.Tensor]], scales: Mapping[str, float], heads: nn.ModuleDict):
        super().__init__(list(masks), heads)
        self.encoder = encoder.requires_grad_(False)
        self.pretrained = dict(pretrained)
        self.vector = dict(vector)
        self.masks = {t: {k: m.bool() for k, m in ms.items()} for t, ms in masks.items()}
        self.scales = {t: float(scales[t]) for t in masks}
        self._resident: tuple[str, torch.device, StateDict] | None = None

    def _apply(self, fn, recurse=True):  # the shared vector, θ₀ and masks follow the module to its device
        super()._apply(fn, recurse)
        self._resident = None
        self.pretrained = {k: fn(v) for k, v in self.pretrained.items()}
        self.vector = {k: fn(v) for k, v in self.vector.items()}
        self.masks = {t: {k: fn(m) for k, m in ms.items()} for t, ms in self.masks.items()}
        return self

    def task_state(self, task: str) -> StateDict:
        """θ₀ + s_t·(m_t ⊙ v) for every tensor of the encoder (tensors without a vector entry stay θ₀)."""
        masks, scale = self.masks[task], self.scales[task]
        return {k: (p + scale * (masks[k] * self.vector[k]) if k in self.vector else p) for k, p in self.pretrained.items()}

    def state_for(self, task: str, device: torch.device) -> StateDict:
        if self._resident is None or self._resident[:2] != (task, device):
            self._resident = None
            self._resident = (task, device, {k: v.to(device) for k, v in self.task_state(task).items()})
        return self._resident[2]

    def stored_tensors(self) -> list[torch.Tensor]:
        scalars = torch.tensor([self.scales[t] for t in self.tasks])
        masks = [m for ms in self.masks.values() for m in ms.values()]
        return [*self.heads.parameters(), *self.pretrained.values(), *self.vector.values(), *masks, scalars]

    def held_tensors(self) -> dict[str, torch.Tensor]:
        return {**{f"pretrained/{k}": v for k, v in self.pretrained.items()}, **{f"vector/{k}": v for k, v in self.vector.items()}}
