"""Features of any ``MultiTaskModel`` on a task's test images, row-aligned with samples, labels and predictions.

Representation bias is a distance between two models' features of the *same* inputs (algorithms.md §2),
so every row carries its test-set index, label and the model's prediction, and two models' features of
one sample set line up row by row. Only ``encode``, ``logits`` and ``block_features`` are called, so
every method in the registry (and any added later) works unchanged. Features are cached by
(run key, task, sample set, layer) as safetensors; a second request is a file read.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable
from pathlib import Path

import torch

from merging.device import autocast, default_device, with_batch_size
from merging.errors import ConfigError
from merging.features import FINAL, Features
from merging.io import load_state_dict, read_cached, remove_stale_temps, save_state_dict
from merging.model import MultiTaskModel
from merging.progress import ProgressFn, track
from merging.suites.base import Suite, TaskData

FEATURES_VERSION = "1"
ModelSource = MultiTaskModel | Callable[[], MultiTaskModel]


def sample_indices(labels: torch.Tensor, n: int | None = None, seed: int = 0) -> torch.Tensor:
    """Up to ``n`` test indices, stratified by class (class counts differ by at most one where the data allows), sorted.

    Deterministic by ``seed``; ``n=None`` or ``n >= len(labels)`` gives every index.
    """
    total = len(labels)
    if n is None or n >= total:
        return torch.arange(total)
    if n <= 0:
        raise ConfigError(f"sample size must be positive, got {n}")
    g = torch.Generator().manual_seed(seed)
    pools = []
    for c in labels.unique().tolist():
        idx = (labels == c).nonzero().flatten()
        pools.append(idx[torch.randperm(len(idx), generator=g)])
    quota = [0] * len(pools)
    left = n
    while left:  # water-filling: each round gives every class that still has images an equal share
        open_ = [i for i, p in enumerate(pools) if quota[i] < len(p)]
        share = max(1, left // len(open_))
        for i in open_:
            take = min(share, len(pools[i]) - quota[i], left)
            quota[i] += take
            left -= take
            if not left:
                break
    return torch.cat([p[:q] for p, q in zip(pools, quota, strict=True)]).sort().values


def sample_set_id(indices: torch.Tensor) -> str:
    digest = hashlib.sha256(indices.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()[:10]
    return f"n{len(indices)}-{digest}"


def features_dir(cache_dir: str | Path, run_key: str, task: str, indices: torch.Tensor, amp: bool = False) -> Path:
    return Path(cache_dir) / "features" / f"v{FEATURES_VERSION}" / run_key / task / (sample_set_id(indices) + ("-amp" if amp else ""))


def feature_files(folder: Path) -> tuple[Path, Path]:
    """The final-feature file and the per-block file of one cached sample set."""
    return folder / f"{FINAL}.safetensors", folder / "blocks.safetensors"


def features_present(cache_dir: str | Path, run_key: str, task: str, indices: torch.Tensor, layers: bool = False, amp: bool = False) -> bool:
    """Whether ``cached_features`` would read this sample set (and its blocks if ``layers``) without extracting."""
    final_path, blocks_path = feature_files(features_dir(cache_dir, run_key, task, indices, amp))
    return final_path.is_file() and (not layers or blocks_path.is_file())


def _logits(model: MultiTaskModel, images: torch.Tensor, z: torch.Tensor, task: str) -> torch.Tensor:
    """The head on the already-encoded ``z`` unless the model overrides ``logits`` (then call it)."""
    if type(model).logits is MultiTaskModel.logits:
        return model.heads[task](z)
    return model.logits(images, task)


def _batches(data: TaskData, indices: torch.Tensor, batch_size: int, desc: str, progress: ProgressFn | None):
    total = math.ceil(len(indices) / batch_size)
    return track(data.batches("test", batch_size, indices), total=total, desc=desc, progress=progress)


@torch.no_grad()
def extract(
    model: MultiTaskModel,
    data: TaskData,
    task: str,
    indices: torch.Tensor | None = None,
    layers: bool = False,
    final: bool = True,
    batch_size: int = 256,
    device: str | None = None,
    progress: ProgressFn | None = None,
    amp: bool = False,
) -> Features:
    """Uncached extraction, batched on ``device``; fp32 unless ``amp`` (bf16 autocast on CUDA).

    fp32 is the default because bias metrics compare small feature differences (algorithms.md §2).
    """
    device = device or default_device()
    model.eval().to(device)
    indices = torch.arange(len(data.test_labels)) if indices is None else indices.to(torch.int64)
    emb, preds, blocks = [], [], []
    if final:
        desc = f"features and block features {task}" if layers else f"features {task}"
        for images, _ in _batches(data, indices, batch_size, desc, progress):
            x = images.to(device)
            with autocast(device, amp):
                z, per_block = model.encode_with_blocks(x, task) if layers else (model.encode(x, task), None)
                preds.append(_logits(model, x, z, task).argmax(-1).cpu())
            emb.append(z.float().cpu())
            if per_block is not None:
                blocks.append([b.float().cpu() for b in per_block])
    elif layers:
        for images, _ in _batches(data, indices, batch_size, f"block features {task}", progress):
            with autocast(device, amp):
                blocks.append([b.float().cpu() for b in model.block_features(images.to(device), task)])
    empty = torch.empty(0)
    return Features(
        task=task,
        classnames=list(data.classnames),
        indices=indices,
        labels=data.test_labels[indices],
        predictions=torch.cat(preds) if preds else empty.long(),
        embedding=torch.cat(emb) if emb else empty,
        blocks=[torch.cat(ls) for ls in zip(*blocks, strict=True)] if blocks else None,
    )


def _read_final(path: Path, indices: torch.Tensor) -> dict[str, torch.Tensor]:
    """A cached sample set's final features, checked to be the requested samples (row-aligned, same length)."""
    saved = load_state_dict(path, check_finite=False)
    n = len(indices)
    if not {"indices", "labels", "predictions", "embedding"} <= set(saved) or any(len(saved[k]) != n for k in ("labels", "predictions", "embedding")):
        raise ValueError("not a complete features file")
    if not torch.equal(saved["indices"], indices):
        raise ValueError("its sample indices differ from the request")
    return saved


def _read_blocks(path: Path) -> list[torch.Tensor]:
    state = load_state_dict(path, check_finite=False)
    return [state[f"block.{i}"] for i in range(len(state))]


def cached_features(
    model: ModelSource,
    run_key: str,
    suite: Suite,
    task: str,
    indices: torch.Tensor | None = None,
    layers: bool = False,
    cache_dir: str | Path = "cache",
    batch_size: int = 256,
    device: str | None = None,
    progress: ProgressFn | None = None,
    amp: bool = False,
) -> Features:
    """Features of ``model`` (or of a zero-argument loader, called only on a cache miss), cached on disk.

    On CUDA out-of-memory the batch size halves and the extraction retries.
    """
    suite.check_tasks([task])
    data = suite.data[task]
    indices = torch.arange(len(data.test_labels)) if indices is None else indices.to(torch.int64)
    folder = features_dir(cache_dir, run_key, task, indices, amp)
    final_path, blocks_path = feature_files(folder)
    remove_stale_temps(folder)
    saved = read_cached(final_path, lambda path: _read_final(path, indices), "features cache")
    blocks = read_cached(blocks_path, _read_blocks, "per-block features cache") if layers else None
    if saved is None or (layers and blocks is None):
        net = model if isinstance(model, MultiTaskModel) else model()
        need_final, need_blocks = saved is None, layers and blocks is None
        fresh, _ = with_batch_size(
            lambda bs: extract(net, data, task, indices, need_blocks, need_final, bs, device, progress, amp), batch_size
        )
        meta = {"version": FEATURES_VERSION, "run_key": run_key, "task": task}
        if need_final:
            saved = {"indices": fresh.indices, "labels": fresh.labels, "predictions": fresh.predictions, "embedding": fresh.embedding}
            save_state_dict(saved, final_path, metadata=meta)
        if need_blocks:
            blocks = list(fresh.blocks or [])
            save_state_dict({f"block.{i}": b for i, b in enumerate(blocks)}, blocks_path, metadata=meta)
    return Features(
        task=task,
        classnames=list(data.classnames),
        indices=indices,
        labels=saved["labels"],
        predictions=saved["predictions"],
        embedding=saved["embedding"],
        blocks=blocks,
        key=f"{run_key}/{task}/{folder.name}",
    )
