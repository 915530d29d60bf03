"""The image encoder's architecture and the three layouts' checkpoint files, read as open_clip state dicts.

One place that knows where each layout keeps its weights (the HF ones mapped through ``hf_keys``) and
checks every checkpoint against the architecture's own keys and shapes, so the heads, the suite and the
conversion share one reading. Nothing here unpickles: files are read by ``merging.io.load_state_dict``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from merging.errors import CheckpointError, ConfigError
from merging.io import check_compatible, load_json, load_state_dict
from merging.model import create_open_clip
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


def create_clip(arch: str, quick_gelu: bool) -> nn.Module:
    """An open_clip CLIP of architecture ``arch`` with random weights (nothing is downloaded)."""
    return create_open_clip(arch, quick_gelu=quick_gelu).eval()


def encoder_config(arch: str, quick_gelu: bool) -> dict:
    return {"kind": "open_clip", "name": arch, "kwargs": {"quick_gelu": quick_gelu}}


# ------------------------------------------------------------------------------------- wrapper prefixes
WRAPPERS = ("module.", "model.", "_orig_mod.")
"""Prefixes a wrapping module adds to every key of the model it wraps: DDP/``DataParallel`` (``module.``),
Lightning modules and task_vectors' ``ImageEncoder`` (``model.``), ``torch.compile`` (``_orig_mod.``).
They nest (``module.model.``). No key of an open_clip or HF CLIP starts with one, so stripping is safe."""


def wrapper_prefix(key: str) -> str:
    """The (possibly nested) wrapper prefix ``key`` starts with, or ``""``."""
    prefix = ""
    while (w := next((w for w in WRAPPERS if key.startswith(prefix + w)), None)) is not None:
        prefix += w
    return prefix


def unwrap(state: Mapping[str, torch.Tensor], where: str) -> tuple[StateDict, str]:
    """``state`` without the wrapper prefix its keys carry, and that prefix (``""`` if none).

    The prefix is found once for the whole file and stripped from every key, so the image tower, the
    text tower and the logit scale are read from the same model. A file whose keys carry different
    prefixes (two models, or a model beside loose tensors) is refused: which one is meant is a guess.
    """
    groups: dict[str, list[str]] = {}
    for k in state:
        groups.setdefault(wrapper_prefix(k), []).append(k)
    if len(groups) > 1:
        seen = ", ".join(f"{p!r} ({len(ks)} key(s), e.g. {ks[0]!r})" for p, ks in sorted(groups.items()))
        raise CheckpointError(
            f"{where}: keys under several prefixes: {seen}; save one model's state_dict() (the unwrapped model's) to its own file"
        )
    prefix = next(iter(groups), "")
    if not prefix:
        return dict(state), ""
    return {k[len(prefix) :]: v for k, v in state.items()}, prefix


def describe(path: Path | str, prefix: str) -> str:
    """How errors name a checkpoint: its path, and the wrapper prefix stripped from its keys if any."""
    return f"{path} (keys under {prefix!r})" if prefix else str(path)


def visual_state(state: Mapping[str, torch.Tensor], where: str) -> StateDict:
    """The image encoder of a whole-CLIP state dict (keys under ``visual.``), or the state itself.

    Expects wrapper prefixes already stripped (``unwrap``); a tower under any other prefix is named, not guessed.
    """
    if any(k.startswith("visual.") for k in state):
        return {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    nested = sorted({k.split("visual.", 1)[0] for k in state if ".visual." in k})
    if nested:
        raise CheckpointError(
            f"{where}: the image tower is under {nested[0] + 'visual.'!r}, a prefix MergeLens does not strip "
            f"(it strips {', '.join(WRAPPERS)}); save the CLIP's own state_dict()"
        )
    return dict(state)


def to_float32(state: Mapping[str, torch.Tensor]) -> StateDict:
    """Floating-point tensors as float32 (checkpoints may be half precision); integer buffers as they are."""
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _check_arch(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], arch: str, where: str) -> StateDict:
    check_compatible(reference, state, f"the {arch} image encoder", where)
    return to_float32(state)


# ------------------------------------------------------------------------------------- weights files
def _read_file_or_folder(path: Path) -> StateDict:
    from merging.hf_export import read_folder  # here: hf_export imports this package's hf_keys

    return read_folder(path) if path.is_dir() else load_state_dict(path)


def read_weights(path: Path) -> tuple[StateDict, str]:
    """A safetensors/``.pt`` state dict or an HF folder (``model.safetensors``, sharded or not), unwrapped.

    Returns the state without its wrapper prefix (``unwrap``) and how errors should name the file
    (``describe``). Every checkpoint of the open_clip and hf layouts and every ``text_weights`` file is read here.
    """
    state, prefix = unwrap(_read_file_or_folder(path), str(path))
    return state, describe(path, prefix)


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
    where: str = ""
    """The pretrained file as errors name it (with the wrapper prefix stripped from it, if any)."""


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
        return Pretrained(visual, None, q, {"logit_scale": manifest.get("logit_scale")}, str(path))
    state, where = read_weights(config.pretrained)
    if config.layout == "hf":
        state = hf_clip_to_open_clip(state, where)
    visual = _check_arch(reference, visual_state(state, where), config.model, where)
    whole = state if any(k.startswith("visual.") for k in state) and "token_embedding.weight" in state else None
    return Pretrained(visual, whole, q, where=where)


def load_finetuned(config: SuiteConfig, task: str, reference: Mapping[str, torch.Tensor], proj: torch.Tensor | None) -> StateDict:
    """Task ``task``'s fine-tuned encoder; HF experts have no projection and get ``proj``, the pretrained one (algorithms.md §0)."""
    if config.layout == "task_vectors":
        path = config.root / "finetuned" / f"{task}.safetensors"
        return _check_arch(reference, load_state_dict(path), config.model, str(path))
    state, where = read_weights(config.finetuned[task])
    if config.layout == "hf":
        if "visual_projection.weight" in state:
            state = visual_state(hf_clip_to_open_clip(state, where), where)
        else:
            state = hf_vision_to_open_clip(state, None, where)
            if proj is not None:
                state["proj"] = proj
    return _check_arch(reference, visual_state(state, where), config.model, where)


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
