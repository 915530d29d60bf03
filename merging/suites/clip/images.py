"""A task's test images from ``<data_root>/<task>/<split>/<class>/*``, read lazily, labelled, preprocessed as open_clip does.

Apart from the weights because a real dataset does not fit in memory: ``ImageFiles`` decodes on
indexing, and ``FolderTaskData`` finishes open_clip's ``val_preprocess`` per batch.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

import merging.suites.templates as tpl
from merging.errors import ConfigError, DataError
from merging.suites.base import TaskData
from merging.suites.config import SuiteConfig

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".webp", ".tif", ".tiff")
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
