"""Hugging Face CLIP checkpoints in and out of ``python -m merging merge`` (FusionBench's experts).

FusionBench publishes its fine-tuned CLIP experts as ``CLIPVisionModel`` folders (``config.json`` +
``model.safetensors``) and starts from a ``CLIPModel`` such as ``openai/clip-vit-base-patch32``. This
module reads such folders or bare safetensors files (HF keys with or without the ``vision_model.``
prefix; transformers 4.x and 5.x save either), hands the vision tower to the merge in open_clip's key
space (the key map of ``merging.suites.clip.hf_keys``, so a merge of HF experts equals the same merge on a
suite), and writes the result back as a folder that ``transformers.CLIPVisionModel.from_pretrained`` loads.
Nothing is unpickled: folders are read through ``merging.io.load_state_dict``.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

import torch

from merging.errors import CheckpointError, ConfigError
from merging.io import load_json, load_state_dict
from merging.suites.clip.hf_keys import hf_vision_to_open_clip, open_clip_vision_to_hf, vision_part

StateDict = dict[str, torch.Tensor]
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")
STATE_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
_HF_MARKERS = ("vision_model.", "text_model.", "embeddings.", "encoder.layers.", "pre_layrnorm.")


def is_hf_state(state: Mapping[str, torch.Tensor]) -> bool:
    """Keys of an HF CLIP (``CLIPModel`` or ``CLIPVisionModel``, with or without ``vision_model.``)."""
    return any(k.startswith(_HF_MARKERS) for k in state)


def read_folder(path: Path) -> StateDict:
    """An HF folder's weights: ``model.safetensors`` (sharded or not) or a ``weights_only`` ``pytorch_model.bin``."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        state: StateDict = {}
        for shard in sorted(set(load_json(index)["weight_map"].values())):
            state.update(load_state_dict(path / shard))
        return state
    for name in ("model.safetensors", "pytorch_model.bin"):
        if (path / name).is_file():
            return load_state_dict(path / name)
    raise CheckpointError(f"{path}: folder holds no model.safetensors or pytorch_model.bin; give an HF model folder or a weights file")


def folder_config(path: Path) -> dict | None:
    """The ``config.json`` of an HF folder, or the one beside a weights file; None when there is none."""
    cfg = (path if path.is_dir() else path.parent) / "config.json"
    return load_json(cfg) if cfg.is_file() else None


def vision_config(config: Mapping, where: str) -> dict:
    """A ``CLIPVisionModel`` config from a ``CLIPModel`` or ``CLIPVisionModel`` ``config.json``."""
    if config.get("model_type") == "clip":
        if "vision_config" not in config:
            raise CheckpointError(f"{where}: CLIPModel config.json has no vision_config")
        vision = dict(config["vision_config"])
    elif config.get("model_type") == "clip_vision_model":
        vision = dict(config)
    else:
        raise CheckpointError(f"{where}: config.json has model_type {config.get('model_type')!r}, not a CLIP ('clip' or 'clip_vision_model')")
    vision["model_type"] = "clip_vision_model"
    vision["architectures"] = ["CLIPVisionModel"]
    for key in ("projection_dim", "_name_or_path", "transformers_version"):
        vision.pop(key, None)
    return vision


def read_hf_vision(path: Path, state: Mapping[str, torch.Tensor]) -> StateDict:
    """The vision tower of an HF CLIP state dict in open_clip keys (no projection: ``CLIPVisionModel`` has none)."""
    tower = {k: v for k, v in vision_part(state).items() if not k.endswith("position_ids")}
    return hf_vision_to_open_clip(tower, None, str(path))


def read_merge_input(path: str | Path) -> tuple[StateDict, bool]:
    """A ``merge`` input as ``(state, is_hf)``: an HF folder or file becomes its vision tower in open_clip keys;
    a plain state dict is returned as loaded (exactly what ``merge`` did before HF inputs)."""
    path = Path(path)
    if path.is_dir():
        return read_hf_vision(path, read_folder(path)), True
    state = load_state_dict(path)
    if is_hf_state(state):
        return read_hf_vision(path, state), True
    return state, False


def to_hf_vision(state: Mapping[str, torch.Tensor]) -> StateDict:
    """open_clip vision-tower keys -> ``CLIPVisionModel`` keys (``vision_model.`` prefix), projection dropped."""
    hf, _ = open_clip_vision_to_hf({k: v for k, v in state.items() if k != "proj"})
    return {k: v.contiguous() for k, v in hf.items()}


def write_hf_folder(state: Mapping[str, torch.Tensor], config: Mapping, out: Path, metadata: dict[str, str], inputs: list[Path]) -> Path:
    """Write ``config.json`` + ``model.safetensors`` into a temporary sibling folder, then rename it to ``out``.

    ``out`` may not exist, or be an empty folder, or a folder holding only a previous output of this
    function (``config.json``, ``model.safetensors``), replaced whole; it may never be or hold an input.
    """
    from safetensors.torch import save_file

    out = out.resolve()
    for p in inputs:
        r = p.resolve()
        if r == out or out in r.parents:
            raise ConfigError(f"--out {out} is or holds the input {p}; inputs are never modified, choose a new folder")
    if out.exists():
        if not out.is_dir():
            raise ConfigError(f"--out {out} is a file; give a new folder name for the HF model (or a .safetensors file name)")
        extra = sorted(p.name for p in out.iterdir() if p.name not in ("config.json", "model.safetensors"))
        if extra:
            raise ConfigError(f"--out {out} holds other files (e.g. {extra[0]!r}); give a new or empty folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        dtype = next(iter(state.values())).dtype
        cfg = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / "model.safetensors"), metadata={"format": "pt", **metadata})
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
            os.replace(out, old / "previous")
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
