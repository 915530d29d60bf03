"""Real open_clip checkpoints and image-folder datasets as a ``Suite`` (algorithms.md §0; DESIGN.md, "Real suites").

Three layouts, all read from local files and never unpickled:

- ``task_vectors``: Ilharco et al.'s pickled ``zeroshot.pt`` / ``<Task>/finetuned.pt`` / ``head_<Task>.pt``,
  converted once to safetensors by ``convert_task_vectors`` (the only code that unpickles, behind ``trust``);
- ``hf``: FusionBench's Hugging Face ``CLIPVisionModel`` experts plus the pretrained ``CLIPModel``, mapped
  to open_clip keys (``hf_keys``), the pretrained projection used for every model;
- ``open_clip``: a pretrained and one fine-tuned open_clip checkpoint per task, any architecture.

Heads come from head files when present, otherwise they are zero-shot heads from the CLIP text tower.
Images are read lazily from ``<data_root>/<task>/<split>/<class>/*`` and preprocessed exactly as open_clip's
``val_preprocess``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from merging.errors import CheckpointError, ConfigError, DataError, MergeLensError
from merging.io import check_compatible, load_json, load_state_dict, save_json, save_state_dict
from merging.progress import ProgressFn, track
from merging.suites import templates as tpl
from merging.suites.base import Suite, TaskData
from merging.suites.config import SuiteConfig
from merging.suites.hf_keys import hf_clip_to_open_clip, hf_vision_to_open_clip

StateDict = dict[str, torch.Tensor]
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
CONVERTED_FORMAT = 1
HEADS_FORMAT = 1


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
def _quiet_open_clip():
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


def _float32(state: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.float() if v.is_floating_point() else v for k, v in state.items()}


def _check_arch(reference: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor], arch: str, where: str) -> StateDict:
    check_compatible(reference, state, f"the {arch} image encoder", where)
    return _float32(state)


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


# ------------------------------------------------------------------------------------- heads
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


def _text_state(config: SuiteConfig, pretrained: Pretrained) -> tuple[StateDict, str]:
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
    text, where = _text_state(config, pretrained)
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


# ------------------------------------------------------------------------------------- data
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="images")
    return _POOL


class ImageFiles:
    """A task's test images as files, decoded on indexing: ``images[idx]`` -> uint8 [B, H, W, 3].

    Stands in for ``TaskData.test_images`` (a uint8 tensor) where a real dataset does not fit in memory:
    ``len``, integer, slice, index-tensor and list indexing, ``shape`` and ``dtype`` behave the same.
    The resize and crop of open_clip's val_preprocess happen here; ``/255`` and normalization in
    ``FolderTaskData.preprocess`` (together exactly ``val_preprocess``).
    """

    dtype = torch.uint8

    def __init__(self, files: Sequence[str], pil_transform: Callable, size: tuple[int, int]):
        self.files = list(files)
        self.pil_transform = pil_transform
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.files), self.size[0], self.size[1], 3)

    def load(self, i: int) -> np.ndarray:
        from PIL import Image

        path = self.files[i]
        try:
            with Image.open(path) as im:
                out = np.asarray(self.pil_transform(im.convert("RGB")), dtype=np.uint8)
        except (OSError, ValueError) as e:
            raise DataError(f"{path}: not a readable image ({e})") from None
        if out.shape != (*self.size, 3):
            raise DataError(f"{path}: preprocessed to {out.shape}, expected {(*self.size, 3)}")
        return out

    def __getitem__(self, index) -> torch.Tensor:
        if isinstance(index, int | np.integer) or (isinstance(index, torch.Tensor) and index.ndim == 0):
            return torch.from_numpy(self.load(int(index)))
        if isinstance(index, slice):
            idx = range(*index.indices(len(self)))
        elif isinstance(index, torch.Tensor | np.ndarray | list | tuple | range):
            idx = [int(i) for i in (index.tolist() if hasattr(index, "tolist") else index)]
        else:
            raise TypeError(f"cannot index images with {type(index).__name__}")
        if len(idx) == 0:
            return torch.empty((0, *self.size, 3), dtype=torch.uint8)
        return torch.from_numpy(np.stack(list(_pool().map(self.load, idx))))


@dataclass
class FolderTaskData(TaskData):
    """A ``TaskData`` over image files with open_clip's per-channel normalization."""

    channel_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    channel_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    folder: str = ""

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, H, W]: ToTensor's /255 then Normalize, as in val_preprocess."""
        x = images.permute(0, 3, 1, 2).float().div(255)
        mean = torch.tensor(self.channel_mean, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.channel_std, dtype=x.dtype).view(1, 3, 1, 1)
        return x.sub(mean).div(std)


def val_transform(model: nn.Module) -> tuple[Callable, tuple, tuple, tuple[int, int]]:
    """open_clip's val_preprocess for ``model``, split into its PIL part and its normalization constants."""
    from open_clip.transform import MaybeToTensor, PreprocessCfg, image_transform_v2
    from torchvision.transforms import Compose, Normalize

    cfg = PreprocessCfg(**model.visual.preprocess_cfg)
    full = image_transform_v2(cfg, is_train=False)
    *pil, to_tensor, normalize = full.transforms
    if not isinstance(to_tensor, MaybeToTensor) or not isinstance(normalize, Normalize):
        raise ConfigError(f"unexpected open_clip val_preprocess {full}; cannot split it")
    size = cfg.size if isinstance(cfg.size, tuple | list) else (cfg.size, cfg.size)
    return Compose(pil), tuple(normalize.mean), tuple(normalize.std), (int(size[0]), int(size[1]))


def data_folder(config: SuiteConfig, task: str) -> Path:
    """``<data_root>/<task>/<split>``, trying the task's usual spellings (``DTD``, ``dtd``, ``stanford_cars`` ...)."""
    if task in config.data_folders:
        folder = config.data_folders[task]
        if not folder.is_dir():
            raise DataError(f"{folder}: data folder of task {task!r} does not exist")
        return folder
    canonical = tpl.canonical_task(task)
    names = [task, task.lower()]
    if canonical:
        names += [canonical, canonical.lower(), *(a for a, c in tpl.ALIASES.items() if c == canonical)]
    tried = []
    for name in dict.fromkeys(names):
        folder = config.data_root / name / config.split
        if folder.is_dir():
            return folder
        tried.append(str(folder))
    raise DataError(f"missing task folder for {task!r}: none of {', '.join(tried[:3])} exists")


def _read_names(path: Path) -> list[str]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such class-names file")
    return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def assign_labels(task: str, folders: Sequence[str], names: Sequence[str] | None, where: str) -> tuple[list[int], list[str]]:
    """Label of each class folder and the class names in label order.

    Folders named by label index (``0``, ``00042``) or by class name (compared ignoring case and
    punctuation, SUN397's ``a_`` prefix allowed); with no known names, sorted folder names are the classes.
    """
    digits = all(f.isdigit() for f in folders)
    if names is None:
        if digits:
            labels = [int(f) for f in folders]
            return labels, [str(i) for i in range(max(labels) + 1)]
        return list(range(len(folders))), [f.replace("_", " ") for f in folders]
    if digits:
        labels = [int(f) for f in folders]
        over = [f for f, lab in zip(folders, labels, strict=True) if lab >= len(names)]
        if over:
            raise DataError(f"{where}: class folder {over[0]!r} is past the {len(names)} classes of {task!r}")
        return labels, list(names)
    index = {tpl.normalize_name(n): i for i, n in enumerate(tpl.folder_names(task))}
    index.update({tpl.normalize_name(n): i for i, n in enumerate(names)})
    labels = []
    for f in folders:
        label = index.get(tpl.normalize_name(f), index.get(tpl.normalize_name(re.sub(r"^[a-z]_", "", f))))
        if label is None:
            raise DataError(
                f"{where}: class folder {f!r} matches none of the {len(names)} class names of {task!r} (e.g. {names[0]!r}); "
                f"name class folders by class name or label index 0..{len(names) - 1}, or give 'classnames' in the config"
            )
        labels.append(label)
    if len(set(labels)) != len(labels):
        raise DataError(f"{where}: two class folders map to the same class of {task!r}")
    return labels, list(names)


def _evenly(n: int, k: int | None) -> list[int]:
    return list(range(n)) if k is None or k >= n else np.linspace(0, n - 1, k).round().astype(int).tolist()


def load_task_data(config: SuiteConfig, task: str, transform: tuple) -> FolderTaskData:
    """The task's test split as a lazy ``FolderTaskData`` (nothing decoded until indexed)."""
    pil, mean, std, size = transform
    folder = data_folder(config, task)
    classes = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{folder}: no class folders (expected {folder}/<class>/*.png|jpg)")
    names = _read_names(config.classnames[task]) if task in config.classnames else tpl.classnames(task)
    labels, classnames = assign_labels(task, classes, names, str(folder))
    files, targets = [], []
    for cls, label in zip(classes, labels, strict=True):
        found = sorted(str(p) for p in (folder / cls).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        files += found
        targets += [label] * len(found)
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders")
    keep = _evenly(len(files), config.limit)
    images = ImageFiles([files[i] for i in keep], pil, size)
    return FolderTaskData(
        task, classnames, images, torch.tensor([targets[i] for i in keep]), channel_mean=mean, channel_std=std, folder=str(folder)
    )


# ------------------------------------------------------------------------------------- the suite
def load_clip_suite(config: SuiteConfig, cache_dir: str | Path = "cache", progress: ProgressFn | None = None) -> Suite:
    """Build the ``Suite`` a config describes; every error is one line naming the file at fault."""
    arch = register_architecture(config)
    tasks = suite_tasks(config)
    quick_gelu = quick_gelu_of(config)
    model = create_clip(arch, quick_gelu)
    reference = model.visual.state_dict()
    transform = val_transform(model)
    del model
    pretrained = load_pretrained(config, reference)
    proj = pretrained.visual.get("proj")
    finetuned = {t: load_finetuned(config, t, reference, proj) for t in track(tasks, desc="loading checkpoints", progress=progress)}
    data = {t: load_task_data(config, t, transform) for t in tasks}
    dim = int(pretrained.visual["proj"].shape[1]) if "proj" in pretrained.visual else int(reference["ln_post.weight"].shape[0])
    heads: dict[str, dict[str, torch.Tensor]] = {}
    need_zero_shot = {}
    for t in tasks:
        path = head_path(config, t)
        if path is None:
            need_zero_shot[t] = data[t].classnames
        else:
            heads[t] = load_head(path, data[t].num_classes, dim, f"data folder {data[t].folder}")
    heads.update(zero_shot_heads(config, pretrained, need_zero_shot, cache_dir, progress=progress))
    info = {
        "config": str(config.path),
        "layout": config.layout,
        "model": arch,
        "quick_gelu": quick_gelu,
        "heads": {t: "zero-shot" if t in need_zero_shot else str(head_path(config, t)) for t in tasks},
        "data": {t: data[t].folder for t in tasks},
        **pretrained.info,
    }
    return Suite(config.name, encoder_config(arch, quick_gelu), pretrained.visual, finetuned, {t: heads[t] for t in tasks}, data, info)


def check_suite(config: SuiteConfig) -> list[tuple[bool, str]]:
    """Each checkpoint, data folder and head checked with the loader's own code; ``[(ok, message)]``."""
    report: list[tuple[bool, str]] = []

    def attempt(fn: Callable, ok: Callable | str):
        try:
            out = fn()
        except MergeLensError as e:
            report.append((False, str(e)))
            return None
        report.append((True, ok(out) if callable(ok) else ok))
        return out

    arch = attempt(lambda: register_architecture(config), f"architecture {config.model}")
    tasks = attempt(lambda: suite_tasks(config), lambda ts: f"tasks: {', '.join(ts)}")
    quick_gelu = attempt(lambda: quick_gelu_of(config), lambda q: f"activation: {'QuickGELU' if q else 'GELU'}")
    if arch is None or tasks is None or quick_gelu is None:
        return report
    model = create_clip(arch, quick_gelu)
    reference = model.visual.state_dict()
    transform = val_transform(model)
    dim = int(reference["proj"].shape[1]) if "proj" in reference else int(reference["ln_post.weight"].shape[0])
    pretrained = attempt(lambda: load_pretrained(config, reference), f"pretrained checkpoint fits {arch}")
    proj = pretrained.visual.get("proj") if pretrained is not None else reference.get("proj")
    zero_shot = []
    for t in tasks:
        attempt(lambda t=t: load_finetuned(config, t, reference, proj) and None, f"{t}: fine-tuned checkpoint fits {arch}")
        data = attempt(lambda t=t: load_task_data(config, t, transform), lambda d: f"{d.name}: {len(d.test_images)} test images, {d.num_classes} classes in {d.folder}")
        try:
            path = head_path(config, t)
        except MergeLensError as e:
            report.append((False, str(e)))
            continue
        if path is None:
            zero_shot.append(t)
        elif data is not None:
            attempt(lambda p=path, d=data: load_head(p, d.num_classes, dim, f"data folder {d.folder}"), f"{t}: head {path} matches the data")
    if zero_shot and pretrained is not None:
        attempt(lambda: _text_state(config, pretrained) and None, f"zero-shot heads from the text tower for: {', '.join(zero_shot)}")
    return report


# ------------------------------------------------------------------------------------- convert (trusted unpickling)
class _Stub(nn.Module):
    """Stands in for a pickled class this environment lacks (task_vectors' ``ImageEncoder``, ``ClassificationHead``)."""


def _stub(module: str, name: str) -> type:
    return type(name, (_Stub,), {"__module__": module, "__qualname__": name})


def _unpickle(path: Path):
    """``torch.load(weights_only=False)`` with stand-ins for missing classes: runs the file's pickle code."""
    import pickle
    import types

    stubs: dict[tuple[str, str], type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                return stubs.setdefault((module, name), _stub(module, name))

    shim = types.ModuleType("merging_trusted_pickle")
    shim.__dict__.update({k: getattr(pickle, k) for k in ("load", "loads", "dump", "dumps", "HIGHEST_PROTOCOL", "UnpicklingError")})
    shim.Unpickler = Unpickler
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=shim)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: could not be unpickled ({msg})") from None


def _module_tensors(obj, prefix: str = "") -> StateDict:
    """Parameters and persistent buffers of an unpickled module tree, read from its ``__dict__``."""
    if isinstance(obj, Mapping):
        return {prefix + k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    d = getattr(obj, "__dict__", {})
    skip = d.get("_non_persistent_buffers_set", set())
    out = {prefix + k: v.detach() for k, v in d.get("_parameters", {}).items() if v is not None}
    out.update({prefix + k: v for k, v in d.get("_buffers", {}).items() if v is not None and k not in skip})
    for k, m in d.get("_modules", {}).items():
        if m is not None:
            out.update(_module_tensors(m, f"{prefix}{k}."))
    return out


def _module_classes(obj) -> set[str]:
    names = {type(obj).__name__}
    for m in getattr(obj, "__dict__", {}).get("_modules", {}).values():
        if m is not None:
            names |= _module_classes(m)
    return names


def convert_task_vectors(
    root: str | Path,
    model: str,
    out: str | Path,
    trust: bool = False,
    tasks: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """task_vectors' pickled modules -> safetensors state dicts, head tensors and a manifest (written last).

    The only code path in MergeLens that unpickles, and only with ``trust``: unpickling runs whatever
    code the file names. Do it once, on files you trust; everything else reads the converted folder.
    """
    root = Path(root).expanduser()
    if not trust:
        raise CheckpointError(
            f"{root}: converting unpickles whole pickled modules, which can run arbitrary code; pass --trust if you trust these files"
        )
    src = root / model if (root / model).is_dir() else root
    zeroshot = src / "zeroshot.pt"
    if not zeroshot.is_file():
        raise CheckpointError(f"{zeroshot}: no such file (expected <root>/<model>/zeroshot.pt)")
    if tasks is None:
        tasks = sorted(d.name for d in src.iterdir() if (d / "finetuned.pt").is_file())
    if not tasks:
        raise CheckpointError(f"{src}: no <Task>/finetuned.pt folders")
    out = Path(out).expanduser()

    def encoder(path: Path) -> tuple[StateDict, set[str]]:
        log(f"unpickling {path} (torch.load weights_only=False, trusted by --trust)")
        obj = _unpickle(path)
        state = _module_tensors(obj)
        return state, _module_classes(obj)

    state, classes = encoder(zeroshot)
    logit_scale = next((float(v) for k, v in state.items() if k.endswith("logit_scale")), None)
    visual = _float32(visual_state(state, str(zeroshot)))
    if not visual or "conv1.weight" not in visual:
        raise CheckpointError(f"{zeroshot}: holds no open_clip image encoder (no visual.conv1.weight)")
    quick_gelu = "QuickGELU" in classes
    save_state_dict(visual, out / "zeroshot.safetensors")
    heads = []
    for t in tasks:
        path = src / t / "finetuned.pt"
        ft, _ = encoder(path)
        ft_visual = _float32(visual_state(ft, str(path)))
        check_compatible(visual, ft_visual, str(zeroshot), str(path))
        save_state_dict(ft_visual, out / "finetuned" / f"{t}.safetensors")
        head = src / f"head_{t}.pt"
        if head.is_file():
            log(f"unpickling {head} (torch.load weights_only=False, trusted by --trust)")
            obj = _unpickle(head)
            if getattr(obj, "normalize", True) is False:
                raise CheckpointError(f"{head}: head does not normalize its input; MergeLens heads are W·normalize(z)+b")
            h = _module_tensors(obj)
            if "weight" not in h:
                raise CheckpointError(f"{head}: holds no 'weight' tensor")
            save_state_dict({k: v.float() for k, v in h.items() if k in ("weight", "bias")}, out / "heads" / f"{t}.safetensors")
            heads.append(t)
    manifest = {
        "format": CONVERTED_FORMAT,
        "layout": "task_vectors",
        "model": model,
        "quick_gelu": quick_gelu,
        "logit_scale": logit_scale,
        "tasks": list(tasks),
        "heads": heads,
        "source": str(src.resolve()),
    }
    save_json(manifest, out / "manifest.json")
    log(f"wrote {out}: {len(tasks)} fine-tuned encoders, {len(heads)} heads, QuickGELU={quick_gelu}")
    return out
