"""Classification heads: a task's head file, or a zero-shot head built from the CLIP text tower and cached.

Apart from the weights because only the heads need the text tower, the tokenizer, the class names
and the prompt templates; the image encoder never does.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import merging.suites.templates as tpl
from merging.errors import CheckpointError, ConfigError, DataError
from merging.io import check_compatible, load_state_dict
from merging.progress import ProgressFn, track
from merging.suites.clip.hf_keys import hf_clip_to_open_clip
from merging.suites.clip.weights import Pretrained, StateDict, create_clip, read_weights
from merging.suites.config import SuiteConfig

HEADS_FORMAT = 1


def head_path(config: SuiteConfig, task: str) -> Path | None:
    """The task's head file when the config uses head files and one exists (``heads: files`` requires it)."""
    if config.heads == "zeroshot":
        return None
    if task in config.head_files:
        path = config.head_files[task]
    elif config.layout == "task_vectors":
        path = config.root / "heads" / f"{task}.safetensors"
    else:
        path = None
    if path is not None and path.is_file():
        return path
    if config.heads == "files":
        where = path if path is not None else f"'head_files' of {config.path}"
        raise CheckpointError(f"{where}: no head file for task {task!r} (heads: files)")
    return None


def load_head(path: Path, num_classes: int, dim: int, data_where: str) -> dict[str, torch.Tensor]:
    """A head file (``weight`` [C, D], optional ``bias`` [C]) checked against the encoder and the data."""
    state = load_state_dict(path)
    weight = state.get("weight")
    if weight is None or weight.ndim != 2:
        raise CheckpointError(f"{path}: a head file needs a 2-d 'weight' tensor [classes, dim]; found keys {sorted(state)[:4]}")
    if weight.shape[1] != dim:
        raise CheckpointError(f"{path}: head expects {weight.shape[1]}-d features but the encoder gives {dim}-d (a head of another architecture?)")
    if weight.shape[0] != num_classes:
        raise DataError(f"{path}: head has {weight.shape[0]} classes but {data_where} has {num_classes}")
    bias = state.get("bias", torch.zeros(weight.shape[0]))
    return {"weight": weight.float(), "bias": bias.float()}


@torch.no_grad()
def zero_shot_head(model: nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str], device: str = "cpu", batch_size: int = 256) -> dict[str, torch.Tensor]:
    """W rows = mean over templates of normalized text embeddings, renormalized, times exp(logit_scale) (algorithms.md §0)."""
    rows = []
    for name in classnames:
        texts = [t.format(c=name) for t in templates]
        emb = torch.cat([model.encode_text(tokenizer(texts[i : i + batch_size]).to(device)).float() for i in range(0, len(texts), batch_size)])
        rows.append(F.normalize(F.normalize(emb, dim=-1).mean(dim=0), dim=-1))
    weight = torch.stack(rows) * model.logit_scale.exp().float()
    return {"weight": weight.cpu(), "bias": torch.zeros(len(rows))}


def text_state(config: SuiteConfig, pretrained: Pretrained) -> tuple[StateDict, str]:
    """The whole-CLIP state dict whose text tower builds zero-shot heads, and the file it came from."""
    if pretrained.clip is not None:
        return pretrained.clip, str(config.pretrained)
    if config.text_weights is None:
        raise ConfigError(
            f"{config.path}: zero-shot heads need a CLIP text tower, but the {config.layout} checkpoints have none; "
            "give 'text_weights' (a whole open_clip CLIP or HF CLIPModel of the same architecture) or head files"
        )
    state = read_weights(config.text_weights)
    if "text_model.embeddings.token_embedding.weight" in state:
        state = hf_clip_to_open_clip(state, str(config.text_weights))
    return state, str(config.text_weights)


def _digest(state: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for k in sorted(state):
        v = state[k]
        h.update(f"{k}{tuple(v.shape)}{float(v.double().sum()):.10e}".encode())
    return h.hexdigest()[:16]


def zero_shot_heads(
    config: SuiteConfig,
    pretrained: Pretrained,
    tasks: Mapping[str, Sequence[str]],
    cache_dir: str | Path,
    device: str | None = None,
    progress: ProgressFn | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Zero-shot heads of ``tasks`` ({task: classnames}), cached by text weights, class names and templates."""
    import open_clip
    from safetensors.torch import load_file, save_file

    from merging.device import default_device
    from merging.io import atomic_write

    if not tasks:
        return {}
    text, where = text_state(config, pretrained)
    model = create_clip(config.model, pretrained.quick_gelu)
    try:
        model.load_state_dict(text, strict=False)
        check_compatible({k: v for k, v in model.state_dict().items() if not k.startswith("visual.")},
                         {k: v for k, v in text.items() if not k.startswith("visual.")}, f"the {config.model} text tower", where)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: does not fit the {config.model} text tower ({str(e).splitlines()[0]})") from None
    blob = {t: {"classnames": list(c), "templates": list(config.templates.get(t) or tpl.templates(t))} for t, c in tasks.items()}
    key = hashlib.sha256(json.dumps({"text": _digest(text), "model": config.model, "tasks": blob, "format": HEADS_FORMAT}, sort_keys=True).encode())
    path = Path(cache_dir) / "suites" / "heads" / f"{config.model}-{key.hexdigest()[:16]}.safetensors"
    if path.is_file():
        flat = load_file(str(path))
        return {t: {"weight": flat[f"{t}/weight"], "bias": flat[f"{t}/bias"]} for t in tasks}
    device = device or default_device()
    model.to(device)
    tokenizer = open_clip.get_tokenizer(config.model)
    heads = {t: zero_shot_head(model, tokenizer, b["classnames"], b["templates"], device) for t, b in track(blob.items(), desc="zero-shot heads", progress=progress)}
    flat = {f"{t}/{k}": v.contiguous() for t, h in heads.items() for k, v in h.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp))
    return heads
