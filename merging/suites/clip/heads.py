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
from merging.errors import CheckpointError, ConfigError, DataError, first_line
from merging.hashing import Digest, file_digest, state_digest
from merging.io import check_compatible, load_state_dict, read_cached
from merging.progress import ProgressFn, track
from merging.suites.clip.hf_keys import hf_clip_to_open_clip
from merging.suites.clip.weights import Pretrained, StateDict, create_clip, describe, read_weights, unwrap
from merging.suites.config import SuiteConfig

HEADS_FORMAT = 3
"""Version of the zero-shot heads cache key; 2: keyed by every byte of the text tower (``state_digest``); 3: and by the tokenizer."""
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
"""What ``save_pretrained`` writes for a CLIP tokenizer; their bytes key the heads cache when the tokenizer is an HF one."""
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


def encode_prompts(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    """``model.encode_text(ids)`` L2-normalized: [B, embed_dim]. A causal text tower pooled at the end-of-text
    token never reads the padding after it, so the tower runs only up to the longest prompt (3-4x fewer
    tokens than the 77-token context at ViT-B/32 size; equal to the full-length result, ``test_clip_suites``)."""
    mask = getattr(model, "attn_mask", None)
    causal = isinstance(mask, torch.Tensor) and mask.ndim == 2 and bool(torch.equal(torch.isinf(mask), torch.ones_like(mask, dtype=torch.bool).triu(1)))
    n = int((ids != 0).sum(dim=1).max()) if causal and getattr(model, "text_pool_type", "argmax") in ("argmax", "eos") else ids.shape[1]
    if n >= ids.shape[1]:
        return F.normalize(model.encode_text(ids).float(), dim=-1)
    trimmed = {"positional_embedding": model.positional_embedding[:n], "attn_mask": mask[:n, :n]}
    return F.normalize(torch.func.functional_call(model, trimmed, (), {"text": ids[:, :n]}, strict=False)[1].float(), dim=-1)


@torch.no_grad()
def zero_shot_head(model: nn.Module, tokenizer: Callable, classnames: Sequence[str], templates: Sequence[str], device: str = "cpu", batch_size: int = 256) -> dict[str, torch.Tensor]:
    """W rows = mean over templates of normalized text embeddings, renormalized, times exp(logit_scale) (algorithms.md §0).
    Every class's prompts go through the text tower together, ``batch_size`` prompts at a time."""
    texts = [t.format(c=name) for name in classnames for t in templates]
    emb = torch.cat([encode_prompts(model, tokenizer(texts[i : i + batch_size]).to(device)) for i in range(0, len(texts), batch_size)])
    rows = F.normalize(emb.reshape(len(classnames), len(templates), -1).mean(dim=1), dim=-1)
    weight = rows * model.logit_scale.exp().float()
    return {"weight": weight.cpu(), "bias": torch.zeros(len(classnames))}


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


class Tokenizer:
    """Texts -> token ids [B, context_length] as open_clip's ``encode_text`` expects (zero padded, end-of-text kept).

    ``folder``: a CLIPModel folder's own HF tokenizer (``tokenizer.json``, or ``vocab.json`` + ``merges.txt``,
    read by transformers' ``CLIPTokenizer`` from local files only); None: open_clip's tokenizer for ``arch``.
    ``identity`` names it in the heads cache key (the tokenizer files' digests for an HF one).
    """

    def __init__(self, arch: str, context_length: int, folder: Path | None = None):
        self.folder, self.context_length = folder, context_length
        if folder is None:
            import open_clip

            self._open_clip = open_clip.get_tokenizer(arch)
            self.identity = f"open_clip:{arch}:{type(self._open_clip).__name__}"
            self.name = "open_clip's default tokenizer"
            return
        from transformers import CLIPTokenizer

        try:
            self._hf = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        except Exception as e:  # transformers raises OSError/ValueError for incomplete or foreign tokenizer files
            raise ConfigError(f"{folder}: its tokenizer files do not load as a CLIP tokenizer ({first_line(e)}); fix or remove them") from None
        files = sorted(n for n in TOKENIZER_FILES if (folder / n).is_file())
        self.identity = Digest("hf-tokenizer", files, [file_digest(folder / n) for n in files]).hexdigest()
        self.name = f"the tokenizer saved in {folder}"

    def __call__(self, texts: Sequence[str]) -> torch.Tensor:
        if self.folder is None:
            return self._open_clip(list(texts))
        ids = self._hf(list(texts), padding="max_length", truncation=True, max_length=self.context_length, return_tensors="pt")["input_ids"]
        eot = self._hf.eos_token_id
        pad = self._hf.pad_token_id
        ids = ids.masked_fill((ids == pad) & (pad != eot), 0) if pad is not None else ids
        cut = ~(ids == eot).any(dim=1)
        ids[cut, -1] = eot  # truncated: keep the end-of-text token last, as open_clip's tokenizer does
        return ids.long()


def tokenizer_folder(source: Path | None) -> Path | None:
    """The folder whose saved HF tokenizer goes with the text weights at ``source`` (a CLIPModel folder, or the
    folder of a weights file with ``config.json`` beside it), or None when no tokenizer is saved there."""
    if source is None:
        return None
    folder = source if source.is_dir() else source.parent
    if not source.is_dir() and not (folder / "config.json").is_file():
        return None
    if (folder / "tokenizer.json").is_file() or ((folder / "vocab.json").is_file() and (folder / "merges.txt").is_file()):
        return folder
    return None


def text_source(config: SuiteConfig, pretrained: Pretrained) -> Path | None:
    """The file or folder the text tower is read from (``text_state``'s choice)."""
    return config.pretrained if pretrained.clip is not None else config.text_weights


def make_tokenizer(config: SuiteConfig, pretrained: Pretrained, text: Mapping[str, torch.Tensor]) -> Tokenizer:
    """The tokenizer saved beside the text weights if any, else open_clip's for the architecture."""
    return Tokenizer(config.model, int(text["positional_embedding"].shape[0]), tokenizer_folder(text_source(config, pretrained)))


def check_tokens(tokenizer: Tokenizer, blob: Mapping[str, Mapping], vocab: int, where: str) -> None:
    """Every prompt's token ids fit the text tower's ``vocab`` rows, or a one-line ``ConfigError`` (never an IndexError later)."""
    for task, b in blob.items():
        texts = [t.format(c=c) for c in b["classnames"] for t in b["templates"]]
        for i in range(0, len(texts), 1024):
            ids = tokenizer(texts[i : i + 1024])
            top = int(ids.max())
            if top >= vocab:
                bad = texts[i + int((ids >= vocab).any(dim=1).nonzero()[0])]
                raise ConfigError(
                    f"{where}: {tokenizer.name} gives token id {top} for task {task!r} ({bad!r}) but the text tower has {vocab} tokens; "
                    "save the checkpoint's own tokenizer beside it (tokenizer.json) or use text weights of the matching vocabulary"
                )


def prompt_blob(config: SuiteConfig, tasks: Mapping[str, Sequence[str]]) -> dict[str, dict[str, list[str]]]:
    """{task: {classnames, templates}} as the zero-shot heads are built from them."""
    return {t: {"classnames": list(c), "templates": list(config.templates.get(t) or tpl.templates(t))} for t, c in tasks.items()}


def heads_key(config: SuiteConfig, text: Mapping[str, torch.Tensor], quick_gelu: bool, blob: Mapping, tokenizer: str = "") -> str:
    """The zero-shot heads' cache key: every byte of the text tower, the architecture, the activation, classes, templates and tokenizer.

    Only the text tower (every key but ``visual.*``) and what shapes its forward pass determine the heads;
    ``state_digest`` reads every byte, so two towers that differ anywhere (even by a permutation) never share heads.
    """
    import open_clip

    tower = {k: v for k, v in text.items() if not k.startswith("visual.")}
    arch = open_clip.get_model_config(config.model)
    return Digest(HEADS_FORMAT, config.model, arch, quick_gelu, state_digest(tower), blob, tokenizer).hexdigest()


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
    blob = prompt_blob(config, tasks)
    tokenizer = make_tokenizer(config, pretrained, text)
    key = heads_key(config, text, pretrained.quick_gelu, blob, tokenizer.identity)
    path = Path(cache_dir) / "suites" / "heads" / f"{config.model}-{key}.safetensors"
    cached = read_cached(path, lambda p: _read_heads(p, list(tasks)), "zero-shot heads cache")
    if cached is not None:
        return cached
    check_tokens(tokenizer, blob, int(text["token_embedding.weight"].shape[0]), where)  # cached heads passed it already
    device = device or default_device()
    model.to(device)
    heads = {t: zero_shot_head(model, tokenizer, b["classnames"], b["templates"], device) for t, b in track(blob.items(), desc="zero-shot heads", progress=progress)}
    flat = {f"{t}/{k}": v.contiguous() for t, h in heads.items() for k, v in h.items()}
    atomic_write(path, lambda tmp: save_file(flat, tmp))
    return heads
