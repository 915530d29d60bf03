"""A suite config -> a ``Suite`` (``load_clip_suite``), and the same steps as a report (``check_suite``, ``check``).

``check`` lives here, not in ``config``, so that the config parser imports nothing of the loader:
the loader reads the config, never the other way round.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from merging.errors import MergeLensError
from merging.progress import ProgressFn, track
from merging.suites.base import Suite
from merging.suites.clip.datasets import DatasetTaskData, ImageRows, load_data
from merging.suites.clip.heads import check_tokens, head_path, load_head, make_tokenizer, prompt_blob, text_state, zero_shot_heads
from merging.suites.clip.images import FolderTaskData, describe_skipped, unreadable_images, val_transform
from merging.suites.clip.weights import (
    create_clip,
    encoder_config,
    load_finetuned,
    load_pretrained,
    quick_gelu_of,
    register_architecture,
    suite_tasks,
)
from merging.suites.config import SuiteConfig, load_config


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
    data = {t: load_data(config, t, transform) for t in tasks}
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

    def attempt(fn: Callable[[], Any], ok: Callable[[Any], str] | str) -> Any:
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
    classnames: dict[str, list[str]] = {}
    for t in tasks:
        attempt(lambda t=t: load_finetuned(config, t, reference, proj) and None, f"{t}: fine-tuned checkpoint fits {arch}")
        data = attempt(lambda t=t: load_data(config, t, transform), _data_summary)
        if data is not None:
            classnames[t] = data.classnames
            report.extend(_data_lines(data))
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
        text = attempt(lambda: text_state(config, pretrained), f"zero-shot heads from the text tower for: {', '.join(zero_shot)}")
        if text is not None:
            attempt(lambda: _check_prompts(config, pretrained, text, {t: classnames[t] for t in zero_shot if t in classnames}),
                    lambda name: f"prompts tokenized by {name} fit the text tower's vocabulary")
    return report


def _check_prompts(config: SuiteConfig, pretrained: Any, text: tuple, tasks: dict[str, list[str]]) -> str:
    """The zero-shot prompts tokenized as the heads will be; a token id past the vocabulary is a ``ConfigError``."""
    state, where = text
    tokenizer = make_tokenizer(config, pretrained, state)
    check_tokens(tokenizer, prompt_blob(config, tasks), int(state["token_embedding.weight"].shape[0]), where)
    return tokenizer.name


def _data_summary(d: FolderTaskData) -> str:
    """``suite check``'s line for a task's data: images, classes, for table datasets the label range and the names' origin,
    the train split beside it and the validation split (its size and where it came from) that ``scaling=auto`` reads."""
    train = f"; {len(d.train_images)} train images beside it" if d.train_images is not None else ""
    train += f"; {len(d.val_images)} validation images ({d.val_from})" if d.val_images is not None else ""
    if isinstance(d, DatasetTaskData):
        return (f"{d.name}: {len(d.test_images)} test images, {d.num_classes} classes (names from {d.names_from}), "
                f"labels {int(d.test_labels.min())}..{int(d.test_labels.max())} in {d.folder} ({d.data_format}){train}")
    return f"{d.name}: {len(d.test_images)} test images, {d.num_classes} classes in {d.folder}{train}"


def _data_lines(data: FolderTaskData, shown: int = 5) -> list[tuple[bool, str]]:
    """What the data folder held besides classes and images (ok, informational), and whether every counted image decodes."""
    lines = []
    skipped = describe_skipped(data)
    if skipped:
        lines.append((True, skipped))
    if isinstance(data.test_images, ImageRows):
        files, bad = data.test_images.rows, data.test_images.unreadable()
    else:
        files = data.test_images.files
        bad = unreadable_images(files)
    if not bad:
        return [*lines, (True, f"{data.name}: all {len(files)} images decode")]
    named = ", ".join(f"{path} ({why})" for path, why in bad[:shown])
    more = f" and {len(bad) - shown} more" if len(bad) > shown else ""
    lines.append((False, f"{data.name}: {len(bad)} of {len(files)} images cannot be decoded: {named}{more}; replace or remove them"))
    return lines


def check(path: str | Path) -> list[tuple[bool, str]]:
    """Validate a config and everything it points to: ``[(ok, message)]``, one line per item checked.

    Reads every checkpoint (one at a time), every data folder and every head file with the same code
    the loader uses, and decodes every image it counts (in parallel), so a config that checks clean
    loads and runs; it does not build zero-shot heads.
    """
    try:
        config = load_config(path)
    except MergeLensError as e:
        return [(False, str(e))]
    return check_suite(config)
