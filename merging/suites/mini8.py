"""The built-in offline suites ``mini8`` (8 tasks) and ``micro`` (3 tasks, for tests).

A tiny open_clip ``VisionTransformer`` is pretrained CLIP-style on a weakly supervised *caption*
pretext over fresh images of every task family (each image's caption is a bag of words: its family
word, with probability ``p_word`` its class word, with probability ``p_wrong`` a wrong class word), so
that, as with CLIP, the pretrained model knows a little about every task and nothing well. Heads are
"zero-shot" heads read off the pretrained word embeddings of the class names (the analogue of CLIP's
text heads, weaker than a linear probe). Each task's encoder is then fine-tuned with its head frozen
(the task-vectors protocol). Everything is deterministic by seed and cached under ``cache/suites``.

Each task's validation split (``VAL_FRACTION`` of its training images, ``base.carve_indices``) is carved
when the suite is built or loaded, never saved, so suites built before it existed load unchanged. The
fine-tuned models saw these images in fine-tuning, as users' checkpoints usually have seen their train
split; they are still never the test split, which alone reports numbers.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from merging.errors import CheckpointError, ConfigError
from merging.io import atomic_write, exclusive, load_json, read_cached, remove_stale_temps, save_json
from merging.model import build_encoder
from merging.progress import ProgressFn, scaled, track
from merging.suites.base import Suite, TaskData
from merging.suites.generators import TASK_SPECS

SUITE_FORMAT = 1
VAL_FRACTION = 0.1
"""Fraction of each task's training images that forms its validation split (200 of mini8's 2000 per task)."""


@dataclass(frozen=True)
class Recipe:
    """Everything that determines a built-in suite; its hash is part of the cache path."""

    tasks: tuple[str, ...]
    image_size: int = 32
    patch_size: int = 8
    width: int = 128
    layers: int = 4
    heads: int = 4
    output_dim: int = 128
    n_train: int = 2000
    n_test: int = 500
    pretext_images_per_task: int = 3000
    pretext_steps: int = 300
    pretext_lr: float = 2e-3
    pretext_batch: int = 256
    pretext_weight_decay: float = 0.05
    p_word: float = 0.35
    p_word_tasks: tuple[tuple[str, float], ...] = ()
    """Per-task caption rates overriding ``p_word`` (how often the web's captions name a task's classes)."""
    p_wrong: float = 0.1
    caption_aliases: int = 1
    """Words per class name in captions: the canonical name plus ``caption_aliases - 1`` synonyms."""
    p_canonical: float = 1.0
    """How often a caption that names a class uses its canonical name (the word the zero-shot head reads)."""
    head_scale: float = 20.0
    finetune_steps: int = 200
    finetune_steps_tasks: tuple[tuple[str, int], ...] = ()
    """Per-task fine-tuning steps overriding ``finetune_steps`` (the task-vectors paper trains each dataset for its own number of epochs)."""
    finetune_lr: float = 2e-3
    finetune_batch: int = 64
    preserve_weight: float = 0.0
    """Fine-tuning penalty on moving the features of *other* task families' pretext images (0: plain fine-tuning)."""
    preserve_batch: int = 16
    preserve_images_per_task: int = 1000
    extra: dict = field(default_factory=dict, hash=False, compare=False)

    def encoder_config(self) -> dict:
        return {
            "kind": "vit",
            "image_size": self.image_size,
            "patch_size": self.patch_size,
            "width": self.width,
            "layers": self.layers,
            "heads": self.heads,
            "mlp_ratio": 4.0,
            "output_dim": self.output_dim,
        }

    def digest(self) -> str:
        blob = json.dumps({**asdict(self), "format": SUITE_FORMAT}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


MINI8 = Recipe(
    tasks=("colors", "shapes", "gratings", "textures", "house_numbers", "counting", "mnist", "digits"),
    pretext_images_per_task=6000,
    pretext_steps=350,
    p_word=0.8,
    caption_aliases=4,
    p_canonical=0.1,
    finetune_steps=250,
    finetune_steps_tasks=(("house_numbers", 600), ("textures", 400)),
    finetune_lr=6e-4,
    preserve_weight=0.02,
    preserve_batch=12,
    preserve_images_per_task=250,
)
MICRO = Recipe(
    tasks=("colors", "gratings", "digits"),
    width=32,
    layers=2,
    heads=2,
    output_dim=32,
    n_train=256,
    n_test=96,
    pretext_images_per_task=256,
    pretext_steps=30,
    pretext_batch=128,
    finetune_steps=20,
    finetune_batch=32,
)
RECIPES: dict[str, Recipe] = {"mini8": MINI8, "micro": MICRO}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise ConfigError(f"unknown built-in suite {name!r}; available: {', '.join(RECIPES)}")
    return RECIPES[name]


# ------------------------------------------------------------------------------------- build steps
def _generate(recipe: Recipe, seed: int) -> tuple[dict[str, TaskData], torch.Tensor, torch.Tensor, list[str]]:
    """Task data (train/test) and the pretext images with their caption targets over the vocabulary."""
    vocab: list[str] = list(recipe.tasks)
    for t in recipe.tasks:
        vocab += [c for c in TASK_SPECS[t].classnames if c not in vocab]
    names = vocab[len(recipe.tasks) :]
    vocab += [f"{c}~{j}" for c in names for j in range(1, recipe.caption_aliases)]
    word = {w: i for i, w in enumerate(vocab)}
    data: dict[str, TaskData] = {}
    pre_images, pre_targets = [], []
    caption_rng = np.random.default_rng([seed, 7])
    for i, t in enumerate(recipe.tasks):
        spec = TASK_SPECS[t]
        rng = np.random.default_rng([seed, 1000 + i])
        xtr, ytr = spec.make(rng, recipe.n_train, "train")
        xte, yte = spec.make(rng, recipe.n_test, "test")
        data[t] = TaskData(t, list(spec.classnames), torch.from_numpy(xte), torch.from_numpy(yte), torch.from_numpy(xtr),
                           torch.from_numpy(ytr)).with_val_from_train(VAL_FRACTION)
        xp, yp = spec.make(np.random.default_rng([seed, 5000 + i]), recipe.pretext_images_per_task, "train")
        target = np.zeros((len(xp), len(vocab)), np.float32)
        target[:, word[t]] = 1
        said = caption_rng.random(len(xp)) < dict(recipe.p_word_tasks).get(t, recipe.p_word)
        alias = np.where(caption_rng.random(len(xp)) < recipe.p_canonical, 0, caption_rng.integers(1, max(2, recipe.caption_aliases), len(xp)))
        target[said, [word[_alias(spec.classnames[y], a)] for y, a in zip(yp[said], alias[said], strict=True)]] = 1
        wrong = caption_rng.random(len(xp)) < recipe.p_wrong
        target[wrong, [word[spec.classnames[c]] for c in caption_rng.integers(0, len(spec.classnames), wrong.sum())]] = 1
        pre_images.append(torch.from_numpy(xp))
        pre_targets.append(torch.from_numpy(target / target.sum(1, keepdims=True)))
    return data, torch.cat(pre_images), torch.cat(pre_targets), vocab


def _alias(classname: str, j: int) -> str:
    return classname if j == 0 else f"{classname}~{j}"


def _pretrain(recipe: Recipe, images: torch.Tensor, targets: torch.Tensor, prep, seed: int, progress: ProgressFn | None):
    """Bag-of-words caption pretext: softmax over the vocabulary of scaled cosine logits."""
    torch.manual_seed(seed)
    encoder = build_encoder(recipe.encoder_config())
    words = nn.Parameter(torch.randn(targets.shape[1], recipe.output_dim) * 0.02)
    log_scale = nn.Parameter(torch.tensor(2.3))
    opt = torch.optim.AdamW([*encoder.parameters(), words, log_scale], lr=recipe.pretext_lr, weight_decay=recipe.pretext_weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.pretext_lr, total_steps=recipe.pretext_steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    encoder.train()
    for _ in track(range(recipe.pretext_steps), desc="pretraining", progress=progress):
        idx = torch.randint(0, len(images), (recipe.pretext_batch,), generator=gen)
        logits = log_scale.exp() * F.normalize(encoder(prep(images[idx])), dim=-1) @ F.normalize(words, dim=-1).T
        loss = -(targets[idx] * logits.log_softmax(-1)).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    encoder.eval()
    return encoder, words.detach()


def _finetune(
    recipe: Recipe, encoder: nn.Module, pretrained: dict, head: torch.Tensor, task: TaskData, others: torch.Tensor, prep, seed: int, progress: ProgressFn | None
) -> dict:
    """Whole encoder, head frozen (task-vectors protocol), AdamW with a 10 % warm-up then cosine decay.

    With ``preserve_weight`` > 0 the loss adds the squared distance of the features of ``others`` (pretext images
    of the *other* task families) to their pretrained features: the weight disentanglement that CLIP's scale
    gives for free (fine-tuning on one task barely moves unrelated images' features), which a 0.8M-parameter
    ViT does not have (README, "What mattered").
    """
    encoder.load_state_dict(pretrained)
    if recipe.preserve_weight > 0:
        encoder.eval()
        with torch.no_grad():
            anchors = torch.cat([encoder(prep(others[i : i + 1000])) for i in range(0, len(others), 1000)])
    encoder.train()
    opt = torch.optim.AdamW(encoder.parameters(), lr=recipe.finetune_lr, weight_decay=0.0)
    steps = dict(recipe.finetune_steps_tasks).get(task.name, recipe.finetune_steps)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.finetune_lr, total_steps=steps, pct_start=0.1, anneal_strategy="cos")
    gen = torch.Generator().manual_seed(seed)
    images, labels = task.split("train")
    for _ in track(range(steps), desc=f"fine-tuning {task.name}", progress=progress):
        idx = torch.randint(0, len(images), (recipe.finetune_batch,), generator=gen)
        if recipe.preserve_weight > 0:  # one forward over both batches: cheaper than two on a CPU
            j = torch.randint(0, len(others), (recipe.preserve_batch,), generator=gen)
            features = encoder(prep(torch.cat([images[idx], others[j]])))
            features, moved = features[: len(idx)], features[len(idx) :] - anchors[j]
        else:
            features = encoder(prep(images[idx]))
        loss = F.cross_entropy(F.normalize(features, dim=-1) @ head.T, labels[idx])
        if recipe.preserve_weight > 0:
            loss = loss + recipe.preserve_weight * moved.pow(2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    encoder.eval()
    return {k: v.detach().clone() for k, v in encoder.state_dict().items()}


def _other_families(recipe: Recipe, pre_images: torch.Tensor, i: int) -> torch.Tensor:
    """The first ``preserve_images_per_task`` pretext images of every task family but the ``i``-th."""
    n, keep = recipe.pretext_images_per_task, min(recipe.preserve_images_per_task, recipe.pretext_images_per_task)
    return torch.cat([pre_images[j * n : j * n + keep] for j in range(len(recipe.tasks)) if j != i])


def build(name: str, seed: int = 0, progress: ProgressFn | None = None, recipe: Recipe | None = None) -> Suite:
    """Build a built-in suite from scratch (no cache): data, pretraining, heads, fine-tuning."""
    recipe = recipe or get_recipe(name)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    if progress:
        progress(0.0, "generating images")
    data, pre_images, pre_targets, vocab = _generate(recipe, seed)
    prep = next(iter(data.values())).preprocess
    t_data = time.perf_counter()
    encoder, words = _pretrain(recipe, pre_images, pre_targets, prep, seed, scaled(progress, 0.05, 0.45))
    pretrained = {k: v.detach().clone() for k, v in encoder.state_dict().items()}
    t_pre = time.perf_counter()
    heads = {}
    for t in recipe.tasks:
        rows = F.normalize(words[[vocab.index(c) for c in data[t].classnames]], dim=-1)
        heads[t] = {"weight": rows * recipe.head_scale, "bias": torch.zeros(len(rows))}
    finetuned = {}
    for i, t in enumerate(recipe.tasks):
        sub = scaled(progress, 0.45 + 0.55 * i / len(recipe.tasks), 0.45 + 0.55 * (i + 1) / len(recipe.tasks))
        others = _other_families(recipe, pre_images, i)
        finetuned[t] = _finetune(recipe, encoder, pretrained, heads[t]["weight"], data[t], others, prep, seed + 1 + i, sub)
    t_ft = time.perf_counter()
    info = {
        "recipe": asdict(recipe),
        "seed": seed,
        "vocab": vocab,
        "build_seconds": {"data": t_data - t0, "pretrain": t_pre - t_data, "finetune": t_ft - t_pre, "total": t_ft - t0},
        "mirrors": {t: TASK_SPECS[t].mirrors for t in recipe.tasks},
    }
    return Suite(name, recipe.encoder_config(), pretrained, finetuned, heads, data, info)


# ------------------------------------------------------------------------------------- cache
def suite_dir(name: str, seed: int, cache_dir: str | Path, recipe: Recipe | None = None) -> Path:
    recipe = recipe or get_recipe(name)
    return Path(cache_dir) / "suites" / f"{name}-seed{seed}-{recipe.digest()}"


def save(suite: Suite, folder: str | Path) -> None:
    """Weights and data as safetensors, then the manifest last: its presence marks a complete suite."""
    from safetensors.torch import save_file

    folder = Path(folder)
    weights = {f"pretrained/{k}": v for k, v in suite.pretrained.items()}
    for t in suite.tasks:
        weights.update({f"finetuned/{t}/{k}": v for k, v in suite.finetuned[t].items()})
        weights.update({f"heads/{t}/{k}": v for k, v in suite.heads[t].items()})
    data = {}
    for t, d in suite.data.items():
        data.update({f"{t}/test_images": d.test_images, f"{t}/test_labels": d.test_labels})
        if d.train_images is not None:
            data.update({f"{t}/train_images": d.train_images, f"{t}/train_labels": d.train_labels})
    for fname, tensors in (("weights.safetensors", weights), ("data.safetensors", data)):
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        atomic_write(folder / fname, lambda tmp, t=tensors: save_file(t, tmp))
    manifest = {
        "format": SUITE_FORMAT,
        "name": suite.name,
        "tasks": suite.tasks,
        "classnames": {t: suite.data[t].classnames for t in suite.tasks},
        "encoder_config": suite.encoder_config,
        "info": suite.info,
    }
    save_json(manifest, folder / "manifest.json")


def load(folder: str | Path) -> Suite:
    from safetensors.torch import load_file

    folder = Path(folder)
    manifest_path = folder / "manifest.json"
    if not manifest_path.is_file():
        raise CheckpointError(f"{folder}: no manifest.json (the suite was never completely built)")
    manifest = load_json(manifest_path)
    if manifest.get("format") != SUITE_FORMAT:
        raise CheckpointError(f"{manifest_path}: suite format {manifest.get('format')} but this code reads {SUITE_FORMAT}; rebuild it")
    try:
        weights = load_file(str(folder / "weights.safetensors"))
        data = load_file(str(folder / "data.safetensors"))
    except Exception as e:
        raise CheckpointError(f"{folder}: suite files are unreadable ({e}); delete the folder to rebuild") from None

    def group(prefix: str) -> dict:
        return {k[len(prefix) :]: v for k, v in weights.items() if k.startswith(prefix)}

    tasks = manifest["tasks"]
    task_data = {
        t: TaskData(
            t,
            manifest["classnames"][t],
            data[f"{t}/test_images"],
            data[f"{t}/test_labels"],
            data.get(f"{t}/train_images"),
            data.get(f"{t}/train_labels"),
        )
        for t in tasks
    }
    task_data = {t: d.with_val_from_train(VAL_FRACTION) if d.train_images is not None else d for t, d in task_data.items()}
    return Suite(
        manifest["name"],
        manifest["encoder_config"],
        group("pretrained/"),
        {t: group(f"finetuned/{t}/") for t in tasks},
        {t: group(f"heads/{t}/") for t in tasks},
        task_data,
        manifest["info"],
    )


def load_or_build(name: str, seed: int = 0, cache_dir: str | Path = "cache", progress: ProgressFn | None = None) -> Suite:
    """Load the cached suite, or build and cache it (first use, or when the cached folder is damaged)."""
    folder = suite_dir(name, seed, cache_dir)
    suite = _load_intact(folder)
    if suite is not None:
        return suite
    with exclusive(folder.parent / f".{folder.name}.lock", lambda: progress and progress(0.0, "waiting for another process building this suite")):
        suite = _load_intact(folder)  # built by the process we waited for
        if suite is not None:
            return suite
        remove_stale_temps(folder)
        suite = build(name, seed, progress)
        save(suite, folder)
    return suite


def _load_intact(folder: Path) -> Suite | None:
    """The cached suite, or None when it was never completely built or is damaged (then warned about, its manifest
    deleted so it is built again)."""
    return read_cached(folder / "manifest.json", lambda _: load(folder), "suite cache")
