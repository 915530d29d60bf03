"""Classification heads: a task's head file, or a zero-shot head built from the CLIP text tower and cached.

Apart from the weights because only the heads need the text tower, the tokenizer, the class names
and the prompt templates; the image encoder never does.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

import merging.suites.templates as tpl
from merging.errors import CheckpointError, ConfigError, DataError
from merging.hashing import Digest, state_digest
from merging.io import check_compatible, load_state_dict, read_cached
from merging.progress import ProgressFn, track
from merging.suites.clip.hf_keys import hf_clip_to_open_clip
from merging.suites.clip.weights import Pretrained, StateDict, create_clip, describe, read_weights, unwrap
from merging.suites.config import SuiteConfig

HEADS_FORMAT = 2
"""Version of the zero-shot heads cache key; 2: keyed by every byte of the text tower (``state_digest``)."""
HEAD_KEYS = ("weight", "bias")


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
    """A head file checked against the encoder and the data: ``weight`` [C, D] and optionally ``bias`` [C].

    The format ``convert`` writes (task_vectors' ``ClassificationHead``: an ``nn.Linear`` state dict, maybe
    under a wrapper prefix). Nothing else may be in the file: an extra tensor means it is not a head, or a
    head with parts MergeLens would drop. Tensors must be floating point and finite (``load_state_dict``
    checks the latter); ``suite check`` and the loader both call this, so a file that checks clean loads.
    """
    state, prefix = unwrap(load_state_dict(path), str(path))
    where = describe(path, prefix)
    extra = sorted(set(state) - set(HEAD_KEYS))
    if extra:
        raise CheckpointError(f"{where}: unexpected tensor(s) {extra[:4]} in a head file; it may hold only 'weight' [classes, dim] and 'bias' [classes]")
    weight = state.get("weight")
    if weight is None:
        raise CheckpointError(f"{where}: a head file needs a 'weight' tensor [classes, dim]; found only {sorted(state)}")
    bias = state.get("bias")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and not t.is_floating_point():
            raise CheckpointError(f"{where}: head {name!r} has dtype {str(t.dtype).removeprefix('torch.')}; a head's tensors must be floating point")
    if weight.ndim != 2:
        raise CheckpointError(f"{where}: head 'weight' has shape {tuple(weight.shape)}; a head's weight is 2-d [classes, dim]")
    if weight.shape[1] != dim:
        raise CheckpointError(f"{where}: head expects {weight.shape[1]}-d features but the encoder gives {dim}-d (a head of another architecture?)")
    if weight.shape[0] != num_classes:
        raise DataError(f"{where}: head has {weight.shape[0]} classes but {data_where} has {num_classes}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise CheckpointError(f"{where}: head 'bias' has shape {tuple(bias.shape)} but 'weight' has {weight.shape[0]} rows; a head's bias is [classes]")
    return {"weight": weight.float(), "bias": torch.zeros(weight.shape[0]) if bias is None else bias.float()}


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


def text_state(config: SuiteConfig, pretrained: Pretrained, model: nn.Module | None = None) -> tuple[StateDict, str]:
    """The whole-CLIP state dict whose text tower builds zero-shot heads, and the file it came from (as errors name it).

    The pretrained checkpoint when it is a whole CLIP, else ``text_weights``; both are read by
    ``weights.read_weights``, so a wrapper prefix (``module.``, ``model.``) is stripped from both towers alike.
    The tower is checked against ``model`` (a fresh CLIP of the architecture if None), so ``suite check``,
    which calls this too, refuses a text tower that would not load.
    """
    if pretrained.clip is not None:
        state, where = pretrained.clip, pretrained.where or str(config.pretrained)
    elif config.text_weights is None:
        source = f"the pretrained checkpoint {pretrained.where}" if pretrained.where else f"the {config.layout} checkpoints"
        raise ConfigError(
            f"{config.path}: zero-shot heads need a CLIP text tower, but {source} has none (no 'token_embedding.weight'); "
            "give 'text_weights' (a whole open_clip CLIP or HF CLIPModel of the same architecture) or head files"
        )
    else:
        state, where = read_weights(config.text_weights)
        if "text_model.embeddings.token_embedding.weight" in state:
            state = hf_clip_to_open_clip(state, where)
    model = create_clip(config.model, pretrained.quick_gelu) if model is None else model
    check_compatible({k: v for k, v in model.state_dict().items() if not k.startswith("visual.")},
                     {k: v for k, v in state.items() if not k.startswith("visual.")}, f"the {config.model} text tower", where)
    return state, where


def heads_key(config: SuiteConfig, text: Mapping[str, torch.Tensor], quick_gelu: bool, blob: Mapping) -> str:
    """The zero-shot heads' cache key: every byte of the text tower, the architecture, the activation, classes and templates.

    Only the text tower (every key but ``visual.*``) and what shapes its forward pass determine the heads;
    ``state_digest`` reads every byte, so two towers that differ anywhere (even by a permutation) never share heads.
    """
    import open_clip

    tower = {k: v for k, v in text.items() if not k.startswith("visual.")}
    arch = open_clip.get_model_config(config.model)
    return Digest(HEADS_FORMAT, config.model, arch, quick_gelu, state_digest(tower), blob).hexdigest()


def _read_heads(path: Path, tasks: Sequence[str]) -> dict[str, dict[str, torch.Tensor]]:
    """The cached heads of ``tasks``; raises (and ``read_cached`` recomputes) when the file is damaged or lacks one."""
    from safetensors.torch import load_file

    flat = load_file(str(path))
    return {t: {"weight": flat[f"{t}/weight"], "bias": flat[f"{t}/bias"]} for t in tasks}


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
    from safetensors.torch import save_file

    from merging.device import default_device
    from merging.io import atomic_write

    if not tasks:
        return {}
    model = create_clip(config.model, pretrained.quick_gelu)
    text, where = text_state(config, pretrained, model)
    try:
        model.load_state_dict({k: v for k, v in text.items() if not k.startswith("visual.")}, strict=False)
    except RuntimeError as e:
        raise CheckpointError(f"{where}: does not fit the {config.model} text tower ({str(e).splitlines()[0]})") from None
    blob = {t: {"classnames": list(c), "templates": list(config.templates.get(t) or tpl.templates(t))} for t, c in tasks.items()}
    key = heads_key(config, text, pretrained.quick_gelu, blob)
    path = Path(cache_dir) / "suites" / "heads" / f"{config.model}-{key}.safetensors"
    cached = read_cached(path, lambda p: _read_heads(p, list(tasks)), "zero-shot heads cache")
    if cached is not None:
        return cached
    device = device or default_device()
    model.to(device)
    tokenizer = open_clip.get_tokenizer(config.model)
    heads = {t: zero_shot_head(model, tokenizer, b["classnames"], b["templates"], device) for t, b in track(blob.items(), desc="zero-shot heads", progress=progress)}
    flat = {f"{t}/{k}": v.contiguous() for t, h in heads.items() for k, v in h.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp))
    return heads
