"""Hugging Face CLIP <-> open_clip state-dict key map (algorithms.md §0, "open_clip<->HF key map").

HF splits attention into q/k/v projections that open_clip keeps as one ``in_proj`` (concatenated on
dim 0 in the order q, k, v); HF stores projections as ``nn.Linear`` weights ([out, in]) where open_clip
keeps ``proj`` matrices ([in, out]), hence the transposes. FusionBench's experts are ``CLIPVisionModel``s
whose keys may or may not carry the ``vision_model.`` prefix (transformers 4.x vs 5.x ``save_pretrained``);
both are accepted. The activation is not in the weights: OpenAI/HF CLIP uses QuickGELU.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from merging.errors import CheckpointError

StateDict = dict[str, torch.Tensor]

_BLOCK = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "self_attn.out_proj": "attn.out_proj",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
_VISION = {
    "embeddings.patch_embedding.weight": "conv1.weight",
    "embeddings.class_embedding": "class_embedding",
    "embeddings.position_embedding.weight": "positional_embedding",
    "pre_layrnorm.weight": "ln_pre.weight",
    "pre_layrnorm.bias": "ln_pre.bias",
    "post_layernorm.weight": "ln_post.weight",
    "post_layernorm.bias": "ln_post.bias",
}
_TEXT = {
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_IGNORED = ("embeddings.position_ids",)


def vision_part(state: Mapping[str, torch.Tensor]) -> StateDict:
    """The vision tower of an HF ``CLIPVisionModel``/``CLIPModel`` state dict, without the ``vision_model.`` prefix."""
    if any(k.startswith("vision_model.") for k in state):
        return {k[len("vision_model.") :]: v for k, v in state.items() if k.startswith("vision_model.")}
    return dict(state)


def _tower_to_open_clip(state: Mapping[str, torch.Tensor], names: Mapping[str, str], where: str) -> StateDict:
    out: StateDict = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        if key in names:
            out[names[key]] = value
            continue
        if key.endswith(_IGNORED):
            continue
        parts = key.split(".")
        if parts[:2] != ["encoder", "layers"] or len(parts) < 5:
            raise CheckpointError(f"{where}: unexpected key {key!r} for an HF CLIP tower")
        i, rest = int(parts[2]), ".".join(parts[3:])
        if rest.startswith("self_attn.") and rest.split(".")[1] in ("q_proj", "k_proj", "v_proj"):
            qkv.setdefault((i, parts[-1]), {})[parts[4]] = value
            continue
        module, leaf = rest.rsplit(".", 1)
        if module not in _BLOCK:
            raise CheckpointError(f"{where}: unexpected key {key!r} for an HF CLIP tower")
        out[f"transformer.resblocks.{i}.{_BLOCK[module]}.{leaf}"] = value
    for (i, leaf), parts in sorted(qkv.items()):
        missing = [p for p in ("q_proj", "k_proj", "v_proj") if p not in parts]
        if missing:
            raise CheckpointError(f"{where}: layer {i} lacks self_attn.{missing[0]}.{leaf}")
        out[f"transformer.resblocks.{i}.attn.in_proj_{leaf}"] = torch.cat([parts["q_proj"], parts["k_proj"], parts["v_proj"]], dim=0)
    return out


def _tower_to_hf(state: Mapping[str, torch.Tensor], names: Mapping[str, str]) -> StateDict:
    inverse = {v: k for k, v in names.items()}
    block = {v: k for k, v in _BLOCK.items()}
    out: StateDict = {}
    for key, value in state.items():
        if key in inverse:
            out[inverse[key]] = value
            continue
        parts = key.split(".")
        i, rest = int(parts[2]), ".".join(parts[3:])
        if rest.startswith("attn.in_proj_"):
            leaf = rest.rsplit("_", 1)[1]
            for name, chunk in zip(("q_proj", "k_proj", "v_proj"), value.chunk(3, dim=0), strict=True):
                out[f"encoder.layers.{i}.self_attn.{name}.{leaf}"] = chunk.clone()
            continue
        module, leaf = rest.rsplit(".", 1)
        out[f"encoder.layers.{i}.{block[module]}.{leaf}"] = value
    return out


def hf_vision_to_open_clip(state: Mapping[str, torch.Tensor], proj: torch.Tensor | None, where: str = "checkpoint") -> StateDict:
    """An HF vision tower (with or without ``vision_model.``) -> open_clip ``VisionTransformer`` keys.

    ``proj`` is HF's ``visual_projection.weight`` [D, width]; open_clip's ``proj`` is its transpose.
    """
    out = _tower_to_open_clip(vision_part(state), _VISION, where)
    if proj is not None:
        out["proj"] = proj.t().contiguous()
    return out


def open_clip_vision_to_hf(state: Mapping[str, torch.Tensor], prefix: str = "vision_model.") -> tuple[StateDict, torch.Tensor | None]:
    """open_clip ``VisionTransformer`` keys -> (HF ``CLIPVisionModel`` keys, ``visual_projection.weight``)."""
    body = {k: v for k, v in state.items() if k != "proj"}
    hf = {prefix + k: v for k, v in _tower_to_hf(body, _VISION).items()}
    proj = state.get("proj")
    return hf, (proj.t().contiguous() if proj is not None else None)


def hf_clip_to_open_clip(state: Mapping[str, torch.Tensor], where: str = "checkpoint") -> StateDict:
    """A whole HF ``CLIPModel`` -> an open_clip ``CLIP`` state dict (both towers, projections, logit scale)."""
    if "visual_projection.weight" not in state:
        raise CheckpointError(f"{where}: not an HF CLIPModel (no visual_projection.weight); a CLIPVisionModel has no projection")
    out = {f"visual.{k}": v for k, v in hf_vision_to_open_clip(state, state["visual_projection.weight"], where).items()}
    text = {k[len("text_model.") :]: v for k, v in state.items() if k.startswith("text_model.")}
    if text:
        out.update(_tower_to_open_clip(text, _TEXT, where))
        out["text_projection"] = state["text_projection.weight"].t().contiguous()
    if "logit_scale" in state:
        out["logit_scale"] = state["logit_scale"]
    return out


def open_clip_to_hf_clip(state: Mapping[str, torch.Tensor]) -> StateDict:
    """An open_clip ``CLIP`` state dict -> HF ``CLIPModel`` keys (the inverse of ``hf_clip_to_open_clip``)."""
    visual = {k[len("visual.") :]: v for k, v in state.items() if k.startswith("visual.")}
    out, proj = open_clip_vision_to_hf(visual)
    out["visual_projection.weight"] = proj
    text_keys = {k: v for k, v in state.items() if k.startswith(("transformer.", "token_embedding.", "ln_final.")) or k == "positional_embedding"}
    out.update({f"text_model.{k}": v for k, v in _tower_to_hf(text_keys, _TEXT).items()})
    out["text_projection.weight"] = state["text_projection"].t().contiguous()
    out["logit_scale"] = state["logit_scale"]
    return out
