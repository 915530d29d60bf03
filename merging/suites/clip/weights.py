"""The image encoder's architecture and the three layouts' checkpoint files, read as open_clip state dicts.

One place that knows where each layout keeps its weights (the HF ones mapped through ``hf_keys``) and
checks every checkpoint against the architecture's own keys and shapes, so the heads, the suite and the
conversion share one reading. Nothing here unpickles: files are read by ``merging.io.load_state_dict``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from merging.errors import CheckpointError, ConfigError
from merging.io import check_compatible, load_json, load_state_dict
from merging.suites.clip.hf_keys import hf_clip_to_open_clip, hf_vision_to_open_clip
from merging.suites.config import SuiteConfig

StateDict = dict[str, torch.Tensor]
CONVERTED_FORMAT = 1
"""The format of the folder ``convert_task_vectors`` writes and ``converted_manifest`` accepts."""


# ------------------------------------------------------------------------------------- architecture
def register_architecture(config: SuiteConfig) -> str:
    """Make ``config.model`` known to open_clip (registering ``model_config`` if given) and return it."""
    import open_clip

    if config.model_config is not None:
        if not config.model_config.is_file():
            raise ConfigError(f"{config.model_config}: no such model config file")
        if config.model_config.stem != config.model:
            raise ConfigError(f"{config.model_config}: open_clip registers it as {config.model_config.stem!r} but 'model' is {config.model!r}")
        open_clip.add_model_config(config.model_config)
    if config.model not in open_clip.list_models():
        raise ConfigError(f"unknown open_clip architecture {config.model!r}; give 'model_config' or one of: {', '.join(open_clip.list_models()[:12])} ...")
    return config.model


@contextmanager
def _quiet_open_clip() -> Iterator[None]:
    """open_clip logs a warning for every ``pretrained=None`` model; that is what we want here."""
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(logging.NOTSET)


def create_clip(arch: str, quick_gelu: bool) -> nn.Module:
    """An open_clip CLIP of architecture ``arch`` with random weights (nothing is downloaded)."""
    import open_clip

    with _quiet_open_clip():
        return open_clip.create_model(arch, pretrained=None, quick_gelu=quick_gelu).eval()


def encoder_config(arch: str, quick_gelu: bool) -> dict:
    return {"kind": "open_clip", "name": arch, "kwargs": {"quick_gelu": quick_gelu}}


def visual_state(state: Mapping[str, torch.Tensor], where: str) -> StateDict:
    """The image encoder of a whole-CLIP state dict (keys under ``[prefix.]visual.``), or the state itself."""
    prefixes = {k.split("visual.", 1)[0] for k in state if "visual." in k}
    if not prefixes:
        return dict(state)
    if len(prefixes) > 1:
        raise CheckpointError(f"{where}: several image towers in one file (prefixes {sorted(prefixes)})")
    prefix = prefixes.pop() + "visual."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}


def to_float32(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Floating-point tensors as float32 (checkpoints may be half precision); integer buffers as they are."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _check_arch(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], arch: str, where: str) -> StateDict:
    check_compatible(reference, state, f"the {arch} image encoder", where)
    return to_float32(state)


# ------------------------------------------------------------------------------------- weights files
def read_weights(path: Path) -> StateDict:
    """A safetensors/``.pt`` state dict, or an HF folder (``model.safetensors``, sharded or not)."""
    if path.is_dir():
        index = path / "model.safetensors.index.json"
        if index.is_file():
            shards = sorted(set(load_json(index)["weight_map"].values()))
            state: StateDict = {}
            for shard in shards:
                state.update(load_state_dict(path / shard))
            return state
        for name in ("model.safetensors", "pytorch_model.bin"):
            if (path / name).is_file():
                return load_state_dict(path / name)
        raise CheckpointError(f"{path}: folder holds no model.safetensors or pytorch_model.bin")
    return load_state_dict(path)


def _hf_quick_gelu(path: Path) -> bool:
    """HF CLIP's activation from ``config.json`` when there is one; OpenAI CLIP's QuickGELU otherwise."""
    cfg_path = (path if path.is_dir() else path.parent) / "config.json"
    if not cfg_path.is_file():
        return True
    cfg = load_json(cfg_path)
    act = cfg.get("vision_config", cfg).get("hidden_act", "quick_gelu")
    return act == "quick_gelu"


@dataclass
class Pretrained:
    """The pretrained model as the layouts provide it: image encoder, maybe a whole CLIP (for the text tower)."""

    visual: StateDict
    clip: StateDict | None
    quick_gelu: bool
    info: dict = field(default_factory=dict)


def quick_gelu_of(config: SuiteConfig) -> bool:
    if config.layout == "task_vectors":
        return bool(converted_manifest(config)["quick_gelu"])
    if config.layout == "hf":
        return _hf_quick_gelu(config.pretrained) if config.quick_gelu is None else config.quick_gelu
    if config.quick_gelu is None:
        import open_clip

        return bool((open_clip.get_model_config(config.model) or {}).get("quick_gelu", False))
    return config.quick_gelu


def load_pretrained(config: SuiteConfig, reference: Mapping[str, torch.Tensor]) -> Pretrained:
    """The pretrained encoder of any layout, checked against the architecture's keys and shapes."""
    q = quick_gelu_of(config)
    if config.layout == "task_vectors":
        manifest = converted_manifest(config)
        path = config.root / "zeroshot.safetensors"
        visual = _check_arch(reference, load_state_dict(path), config.model, str(path))
        return Pretrained(visual, None, q, {"logit_scale": manifest.get("logit_scale")})
    path = config.pretrained
    state = read_weights(path)
    if config.layout == "hf":
        state = hf_clip_to_open_clip(state, str(path))
    visual = _check_arch(reference, visual_state(state, str(path)), config.model, str(path))
    whole = state if any(k.startswith("visual.") for k in state) and "token_embedding.weight" in state else None
    return Pretrained(visual, whole, q)


def load_finetuned(config: SuiteConfig, task: str, reference: Mapping[str, torch.Tensor], proj: torch.Tensor | None) -> StateDict:
    """Task ``task``'s fine-tuned encoder; HF experts have no projection and get ``proj``, the pretrained one (algorithms.md §0)."""
    if config.layout == "task_vectors":
        path = config.root / "finetuned" / f"{task}.safetensors"
        return _check_arch(reference, load_state_dict(path), config.model, str(path))
    path = config.finetuned[task]
    state = read_weights(path)
    if config.layout == "hf":
        if "visual_projection.weight" in state:
            state = visual_state(hf_clip_to_open_clip(state, str(path)), str(path))
        else:
            state = hf_vision_to_open_clip(state, None, str(path))
            if proj is not None:
                state["proj"] = proj
    return _check_arch(reference, visual_state(state, str(path)), config.model, str(path))


def converted_manifest(config: SuiteConfig) -> dict:
    path = config.root / "manifest.json"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file; run `python -m merging convert --layout task_vectors ... --out {config.root} --trust` first")
    manifest = load_json(path)
    if manifest.get("format") != CONVERTED_FORMAT or manifest.get("layout") != "task_vectors":
        raise CheckpointError(f"{path}: not a converted task_vectors folder of format {CONVERTED_FORMAT}; convert again")
    if manifest.get("model") != config.model:
        raise CheckpointError(f"{path}: converted from {manifest.get('model')!r} checkpoints but the config says model {config.model!r}")
    return manifest


def suite_tasks(config: SuiteConfig) -> list[str]:
    if config.tasks:
        return list(config.tasks)
    if config.layout == "task_vectors":
        return list(converted_manifest(config)["tasks"])
    return list(config.finetuned)
