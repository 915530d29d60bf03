"""Merge a user's own checkpoints: plain state dicts in, one merged state dict out (the spine issue's CLI contract).

Architecture-agnostic: same keys and shapes in every file; floating-point tensors merged key by key
with their dtype kept; other tensors copied from the pretrained file; inputs never modified; nothing
is written unless the whole merge succeeds.

Hugging Face CLIP inputs (FusionBench's experts, issue #22): a ``CLIPModel``/``CLIPVisionModel`` folder or
a safetensors file with HF keys (``merging.hf_export``). Their vision towers are merged in open_clip's keys
(as a suite would merge them) and written back as HF keys: to a state-dict file when ``out`` ends in
``.safetensors``/``.pt``, otherwise to an HF ``CLIPVisionModel`` folder (``config.json`` + ``model.safetensors``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch

from merging.errors import CheckpointError, ConfigError
from merging.hf_export import STATE_SUFFIXES, folder_config, read_merge_input, to_hf_vision, vision_config, write_hf_folder
from merging.io import atomic_write, check_compatible, check_finite_state, save_state_dict
from merging.methods import METHODS, get_method, make_params
from merging.methods.base import StaticMergeMethod


def merge_files(
    method_name: str,
    pretrained: str | Path,
    finetuned: Mapping[str, str | Path],
    settings: Mapping[str, str] | None = None,
    out: str | Path = "merged.safetensors",
) -> Path:
    """Load, validate, merge and atomically write; raises a one-line ``MergeLensError`` on bad input."""
    method = get_method(method_name)
    if not isinstance(method, StaticMergeMethod) or method.name in ("pretrained",):
        allowed = [m.name for m in METHODS.values() if isinstance(m, StaticMergeMethod) and m.name != "pretrained"]
        why = {"featcal": "it calibrates on unlabeled train images, so it runs on a suite (python -m merging run --method featcal "
                          "--save-model OUT.safetensors writes its plain state dict)",
               "tall_masks": "it keeps a mask per task chosen by the task id, not one model",
               "emr": "it keeps a mask and a rescaler per task chosen by the task id, not one model"}.get(method_name, "it is not a data-free merge")
        raise ConfigError(f"method {method_name!r} cannot merge raw checkpoints ({why}); use one of: {', '.join(allowed)}")
    params = make_params(method, settings or {})
    if not finetuned:
        raise ConfigError("--finetuned is empty: give at least one NAME=PATH fine-tuned checkpoint")
    out = Path(out)
    inputs = [Path(pretrained), *map(Path, finetuned.values())]
    if any(out.resolve() == p.resolve() for p in inputs if p.exists()):
        raise ConfigError(f"--out {out} is one of the input files; inputs are never modified")
    hf_out = out.suffix.lower() not in STATE_SUFFIXES
    base, hf = read_merge_input(pretrained)
    if hf_out and not hf:
        raise ConfigError(f"--out {out}: use a .safetensors (or .pt) file name; an HF model folder is written only from HF CLIP inputs")
    models = {}
    for name, path in finetuned.items():
        state, state_hf = read_merge_input(path)
        if state_hf != hf:
            kinds = ("an HF CLIP", "a plain state dict")
            raise ConfigError(f"{path}: {kinds[not state_hf]} but --pretrained {pretrained} is {kinds[not hf]}; give all checkpoints in one layout")
        check_compatible(base, state, str(pretrained), str(path))
        models[name] = state
    merged = method.merge_state_dicts(base, models, params)
    check_finite_state(merged, f"merged result ({method.name})")
    for k, v in base.items():
        if merged[k].dtype != v.dtype:
            raise CheckpointError(f"internal error: merged {k!r} changed dtype")
    metadata = {"method": method.name, **{k: str(v) for k, v in (settings or {}).items()}}
    if not hf:
        return save_merged(merged, out, metadata)
    merged = to_hf_vision(merged)
    if not hf_out:
        return save_merged(merged, out, metadata)
    config = next((c for c in map(folder_config, inputs) if c is not None), None)
    if config is None:
        raise ConfigError(f"--out {out}: an HF folder needs a config.json; none is in or beside {pretrained} or the fine-tuned inputs "
                          "(give the pretrained model's folder, or write a .safetensors file instead)")
    where = next(p for p in inputs if folder_config(p) is not None)
    return write_hf_folder(merged, vision_config(config, str(where)), out, metadata, inputs)


def save_merged(state: Mapping[str, torch.Tensor], out: Path, metadata: dict[str, str]) -> Path:
    if out.suffix.lower() == ".safetensors":
        return save_state_dict(state, out, metadata)
    if out.suffix.lower() in (".pt", ".pth", ".bin"):
        tensors = {k: v.contiguous() for k, v in state.items()}
        return atomic_write(out, lambda tmp: torch.save(tensors, tmp))
    raise ConfigError(f"--out {out}: use a .safetensors (or .pt) file name")
