"""A task's test images from ``<data_root>/<task>/<split>/<class>/*``, read lazily, labelled, preprocessed as open_clip does.

Apart from the weights because a real dataset does not fit in memory: ``ImageFiles`` decodes on
indexing, and ``FolderTaskData`` finishes open_clip's ``val_preprocess`` per batch. Folders are read as
people have them: hidden and system entries (``.ipynb_checkpoints/``, ``__MACOSX/``, ``._x.jpg``,
``Thumbs.db``) are skipped and listed, class names may be in any script, and every image mode and bit
depth decodes to the same 8-bit RGB (``to_rgb8``), in the loader and in ``suite check`` alike.
"""

from __future__ import annotations

import os
import re
import unicodedata
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

import merging.suites.templates as tpl
from merging.errors import ConfigError, DataError
from merging.suites.base import TaskData
from merging.suites.config import VAL_SPLITS, SuiteConfig

if TYPE_CHECKING:
    from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".jfif", ".bmp", ".ppm", ".pgm", ".pbm", ".pnm", ".gif", ".webp", ".tif", ".tiff")
SYSTEM_NAMES = frozenset(
    {
        "__macosx",
        "thumbs.db",
        "ehthumbs.db",
        "ehthumbs_vista.db",
        "desktop.ini",
        "$recycle.bin",
        "system volume information",
        "@eadir",
        "icon\r",
    }
)
"""What macOS zips, Windows Explorer and NAS boxes leave in folders (compared lower-cased); never a class or an image."""
_POOL: ThreadPoolExecutor | None = None


def _pool() -> ThreadPoolExecutor:
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1), thread_name_prefix="images")
    return _POOL


def is_hidden(name: str) -> bool:
    """A hidden or system entry: a dot name (``.ipynb_checkpoints``, ``.DS_Store``, AppleDouble ``._x.jpg``) or one of ``SYSTEM_NAMES``.

    ImageFolder-style loaders count these as classes or images; a notebook's checkpoint folder then
    becomes an extra class and shifts every label after it.
    """
    return name.startswith(".") or name.lower() in SYSTEM_NAMES


def to_rgb8(image: Image.Image) -> Image.Image:
    """One picture as 8-bit RGB, the same whatever mode and bit depth its file was saved in.

    - 8-bit modes (1, L, P, RGB, RGBX, CMYK, YCbCr, LAB, HSV): ``image.convert("RGB")``, exactly what
      torchvision's ImageFolder and open_clip users get, so accuracies match theirs.
    - Alpha (LA, PA, RGBA, P or L with a transparency key, premultiplied La/RGBa) is dropped: each pixel
      keeps the colour stored under it (un-premultiplied), as ``convert("RGB")`` does. Not composited on a
      background, because the benchmark checkpoints were fine-tuned and scored on ``convert("RGB")``.
    - 16-bit samples (I;16, I;16B, I;16L, and I, as Pillow opens 16-bit PGM and some 16-bit TIFF/PNG,
      clipped to 0..65535) keep their high byte, ``v >> 8``: Pillow reads 16-bit RGB and RGBA PNGs that way,
      so a 16-bit picture decodes alike in gray and in colour, and both usual 8-to-16-bit expansions
      (``v * 257``, ``v << 8``) come back exactly; within 1 of ``round(v * 255 / 65535)``. ``convert``
      would clip at 255 instead and turn nearly every pixel white.
    - F (32-bit float) is read on Pillow's own 0..255 scale (what ``convert("F")`` of an 8-bit image holds),
      rounded to nearest and clipped, NaN as 0 (``convert`` truncates). A float image scaled 0..1 comes out
      nearly black: save such files as 8- or 16-bit.
    """
    from PIL import Image

    mode = image.mode
    if mode == "RGB":
        return image
    if mode == "I" or mode.startswith("I;16"):
        a = np.asarray(image)
        gray = (np.clip(a, 0, 65535).astype(np.uint32) >> 8).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    if mode == "F":
        a = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        gray = np.clip(np.rint(a), 0, 255).astype(np.uint8)
        return Image.fromarray(np.repeat(gray[..., None], 3, axis=-1))
    if mode == "La":
        image = image.convert("LA")
    return image.convert("RGB")


def _decode(path: str) -> Image.Image:
    """Open, decode fully and convert one file; raises whatever Pillow raises for a bad file."""
    from PIL import Image

    with Image.open(path) as im:
        im.load()
        return to_rgb8(im)


def _why(e: BaseException) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image file Pillow can identify"
    text = re.sub(r"\s+", " ", str(e)).strip()
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def read_rgb8(path: str) -> Image.Image:
    """The decoded 8-bit RGB picture of one file (``to_rgb8``); a bad file is a one-line ``DataError`` naming it."""
    try:
        return _decode(path)
    except Exception as e:  # any decoder failure on untrusted bytes means this file is unreadable
        raise DataError(f"{path}: not a readable image ({_why(e)}); replace or remove it (`suite check` lists every such file)") from None


def unreadable_images(files: Sequence[str], chunk: int = 64) -> list[tuple[str, str]]:
    """Decode every file exactly as the loader does, in parallel; ``[(path, why)]`` for those that fail, in order.

    Threads, because Pillow releases the GIL while it decodes and converts; files go in chunks so that
    the pool's per-task overhead stays small next to a small image's decode.
    """

    def run(part: Sequence[str]) -> list[tuple[str, str]]:
        bad = []
        for path in part:
            try:
                _decode(path)
            except Exception as e:  # as in read_rgb8
                bad.append((path, _why(e)))
        return bad

    parts = [files[i : i + chunk] for i in range(0, len(files), chunk)]
    return [b for found in _pool().map(run, parts) for b in found]


class LazyImages:
    """Images decoded on indexing: ``images[idx]`` -> uint8 [B, H, W, 3], preprocessed to ``size`` by ``pil_transform``.

    Stands in for ``TaskData.test_images`` (a uint8 tensor) where a real dataset does not fit in memory: ``len``,
    integer, slice, index-tensor and list indexing, ``shape`` and ``dtype`` behave the same; a batch is decoded on a
    thread pool. Subclasses say how many images there are (``__len__``) and how image ``i`` is read (``load``).
    """

    dtype = torch.uint8
    size: tuple[int, int]

    def __len__(self) -> int:
        raise NotImplementedError

    def load(self, i: int) -> np.ndarray:
        raise NotImplementedError

    def take(self, indices: Sequence[int] | torch.Tensor) -> LazyImages:
        """The images at ``indices``, still lazy (a validation split carved from a train split; ``base.take``)."""
        raise NotImplementedError

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), self.size[0], self.size[1], 3)

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




class ImageFiles(LazyImages):
    """A task's images as files (``files``, whose bytes ``TaskData.digest`` hashes).

    The resize and crop of open_clip's val_preprocess happen here; ``/255`` and normalization in
    ``FolderTaskData.preprocess`` (together exactly ``val_preprocess``).
    """

    def __init__(self, files: Sequence[str], pil_transform: Callable, size: tuple[int, int]):
        self.files = list(files)
        self.pil_transform = pil_transform
        self.size = size

    def __len__(self) -> int:
        return len(self.files)

    def take(self, indices: Sequence[int] | torch.Tensor) -> ImageFiles:
        return ImageFiles([self.files[int(i)] for i in indices], self.pil_transform, self.size)

    def load(self, i: int) -> np.ndarray:
        path = self.files[i]
        out = np.asarray(self.pil_transform(read_rgb8(path)), dtype=np.uint8)
        if out.shape != (*self.size, 3):
            raise DataError(f"{path}: preprocessed to {out.shape}, expected {(*self.size, 3)}")
        return out


@dataclass
class FolderTaskData(TaskData):
    """A ``TaskData`` over image files with open_clip's per-channel normalization."""

    channel_mean: tuple[float, float, float] = (0.48145466, 0.4578275, 0.40821073)
    channel_std: tuple[float, float, float] = (0.26862954, 0.26130258, 0.27577711)
    folder: str = ""
    hidden: tuple[str, ...] = field(default_factory=tuple)
    """Hidden and system entries skipped, relative to ``folder`` (folders end in ``/``)."""
    other: tuple[str, ...] = field(default_factory=tuple)
    """Other entries skipped: files beside the class folders, non-image files and sub-folders inside them."""

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


def task_names(task: str) -> list[str]:
    """The folder names a task's data may have: as written, lower-cased, its canonical name and aliases."""
    canonical = tpl.canonical_task(task)
    names = [task, task.lower()]
    if canonical:
        names += [canonical, canonical.lower(), *(a for a, c in tpl.ALIASES.items() if c == canonical)]
    return list(dict.fromkeys(names))


def data_folder(config: SuiteConfig, task: str) -> Path:
    """``<data_root>/<task>/<split>``, trying the task's usual spellings (``DTD``, ``dtd``, ``stanford_cars`` ...)."""
    if task in config.data_folders:
        folder = config.data_folders[task]
        if not folder.is_dir():
            raise DataError(f"{folder}: data folder of task {task!r} does not exist")
        return folder
    tried = []
    for name in task_names(task):
        folder = config.data_root / name / config.split
        if folder.is_dir():
            return folder
        tried.append(str(folder))
    raise DataError(f"missing task folder for {task!r}: none of {', '.join(tried[:3])} exists")


def _read_names(path: Path) -> list[str]:
    """One class name a line; UTF-8, with or without the byte-order mark Windows editors write."""
    if not path.is_file():
        raise ConfigError(f"{path}: no such class-names file")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: class-names file is not UTF-8 text (byte {e.start}); save it as UTF-8") from None
    return [line.strip() for line in text.splitlines() if line.strip()]


def _prefixless(folder: str) -> str:
    """SUN397's class folders carry the first letter as a prefix: ``a_abbey``."""
    return re.sub(r"^[a-z]_", "", folder)


def assign_labels(task: str, folders: Sequence[str], names: Sequence[str] | None, where: str) -> tuple[list[int], list[str]]:
    """Label of each class folder and the class names in label order.

    Folders named by label index (``0``, ``00042``) or by class name: an exact match first, then one
    ignoring case, spaces and punctuation in any script (``templates.normalize_name``), then without
    SUN397's ``a_`` prefix. A folder whose name matches two classes alike, or two folders that map to one
    class, are errors naming them. With no known names, sorted folder names are the classes.
    """
    digits = all(f.isascii() and f.isdigit() for f in folders)
    if names is None:
        if digits:
            labels = [int(f) for f in folders]
            return labels, [str(i) for i in range(max(labels) + 1)]
        return list(range(len(folders))), [unicodedata.normalize("NFC", f).replace("_", " ") for f in folders]
    if digits:
        labels = [int(f) for f in folders]
        over = [f for f, lab in zip(folders, labels, strict=True) if lab >= len(names)]
        if over:
            raise DataError(f"{where}: class folder {over[0]!r} is past the {len(names)} classes of {task!r}")
        return labels, list(names)
    exact: dict[str, dict[int, str]] = {}
    loose: dict[str, dict[int, str]] = {}
    spellings = [*enumerate(names), *((i, n) for i, n in enumerate(tpl.folder_names(task)) if i < len(names))]
    for i, spelling in spellings:
        exact.setdefault(spelling, {}).setdefault(i, spelling)
        key = tpl.normalize_name(spelling)
        if key:
            loose.setdefault(key, {}).setdefault(i, spelling)
    labels = []
    for f in folders:
        hits = exact.get(f) or loose.get(tpl.normalize_name(f)) or loose.get(tpl.normalize_name(_prefixless(f)))
        if not hits:
            raise DataError(
                f"{where}: class folder {f!r} matches none of the {len(names)} class names of {task!r} (e.g. {names[0]!r}); "
                f"name class folders by class name or label index 0..{len(names) - 1}, or give 'classnames' in the config"
            )
        if len(hits) > 1:
            alike = " and ".join(f"{n!r} (label {i})" for i, n in list(hits.items())[:3])
            raise DataError(
                f"{where}: class folder {f!r} matches {alike} of {task!r} alike; "
                f"rename the folder to one class name exactly or to its label index, or make the class names distinct"
            )
        labels.append(next(iter(hits)))
    first: dict[int, str] = {}
    for f, label in zip(folders, labels, strict=True):
        if label in first:
            raise DataError(
                f"{where}: class folders {first[label]!r} and {f!r} both map to class {names[label]!r} (label {label}) of {task!r}; "
                f"merge them or rename one"
            )
        first[label] = f
    return labels, list(names)


def _evenly(n: int, k: int | None) -> list[int]:
    return list(range(n)) if k is None or k >= n else np.linspace(0, n - 1, k).round().astype(int).tolist()


def _entries(path: Path) -> list[os.DirEntry]:
    try:
        with os.scandir(path) as it:
            return sorted(it, key=lambda e: e.name)
    except OSError as e:
        raise DataError(f"{path}: cannot list the folder ({e.strerror}); check it exists and is readable") from None


@dataclass
class SplitListing:
    """A split folder as read: class folders, each one's image files (sorted paths), and what was skipped."""

    classes: list[str]
    files: dict[str, list[str]]
    hidden: list[str]
    other: list[str]


def list_split(folder: Path) -> SplitListing:
    """The class folders of ``<task>/<split>`` and their images, skipping hidden/system and other entries.

    Reads each folder once with ``os.scandir`` (no stat per file on local disks); class folders may be
    symlinks. Skipped entries are kept, relative to ``folder``, so that ``suite check`` can list them.
    """
    classes, files, hidden, other = [], {}, [], []
    for entry in _entries(folder):
        is_dir = entry.is_dir()
        shown = entry.name + ("/" if is_dir else "")
        if is_hidden(entry.name):
            hidden.append(shown)
        elif not is_dir:
            other.append(shown)
        else:
            classes.append(entry.name)
    for cls in classes:
        found = files[cls] = []
        base = str(folder / cls)
        for entry in _entries(folder / cls):
            is_file = entry.is_file()
            shown = f"{cls}/{entry.name}" + ("" if is_file else "/")
            if is_hidden(entry.name):
                hidden.append(shown)
            elif is_file and os.path.splitext(entry.name)[1].lower() in IMAGE_SUFFIXES:
                found.append(os.path.join(base, entry.name))
            else:
                other.append(shown)
    return SplitListing(classes, files, hidden, other)


def _some(items: Sequence[str], k: int = 5) -> str:
    return ", ".join(items[:k]) + (f" and {len(items) - k} more" if len(items) > k else "")


def describe_skipped(data: FolderTaskData) -> str | None:
    """One line saying what the data folder held that is neither a class nor an image, or None."""
    parts = []
    if data.hidden:
        parts.append(f"{len(data.hidden)} hidden/system entr{'y' if len(data.hidden) == 1 else 'ies'}: {_some(data.hidden)}")
    if data.other:
        parts.append(
            f"{len(data.other)} other entr{'y' if len(data.other) == 1 else 'ies'} (not a class folder or image): {_some(data.other)}"
        )
    return f"{data.name}: skipped " + "; ".join(parts) if parts else None


def _labelled_files(folder: Path, task: str, names: list[str] | None) -> tuple[list[Path], list[int], list[str], SplitListing]:
    """A split folder's image files and labels (class folders matched to ``names``), its class names and listing."""
    listing = list_split(folder)
    skipped = f" (skipped {_some(listing.hidden + listing.other)})" if listing.hidden or listing.other else ""
    if not listing.classes:
        raise DataError(f"{folder}: no class folders{skipped}; expected {folder}/<class>/*.png|jpg")
    labels, classnames = assign_labels(task, listing.classes, names, str(folder))
    files, targets = [], []
    for cls, label in zip(listing.classes, labels, strict=True):
        files += listing.files[cls]
        targets += [label] * len(listing.files[cls])
    if not files:
        raise DataError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) in its class folders{skipped}")
    return files, targets, classnames, listing


def with_val_fraction(data: FolderTaskData, config: SuiteConfig, where: Path | str) -> FolderTaskData:
    """``data`` with a validation split carved from its train split when the config sets ``val_fraction`` and no
    val split lies beside the test split (``where``, the task's folder); a one-line ``DataError`` when there is no train split either."""
    if data.val_images is not None or config.val_fraction is None:
        return data
    if data.train_images is None:
        raise DataError(f"task {data.name!r}: 'val_fraction' carves a validation split from the train split, but {where} has neither "
                        f"a train nor a val split beside {config.split!r}; add one of them, or drop 'val_fraction' from {config.path.name}")
    return data.with_val_from_train(config.val_fraction)


def val_split_names(config: SuiteConfig) -> tuple[str, ...]:
    """The split names searched for a validation split; none when the test split itself is named like one."""
    return () if config.split in VAL_SPLITS else VAL_SPLITS


def load_task_data(config: SuiteConfig, task: str, transform: tuple) -> FolderTaskData:
    """The task's test split as a lazy ``FolderTaskData`` (nothing decoded until indexed), and its train split when a
    ``train`` folder sits beside the test folder (read by methods that learn from unlabeled train images: FeatCal),
    and its validation split when a ``val`` (or ``validation``) folder does, else carved from train by ``val_fraction``
    (read only to choose λ, ``merging.selection``).
    Other ``data_format``s (a saved HF dataset, parquet files) are read by ``datasets.load_data``, which calls this for folders."""
    if config.data_format != "folders":
        raise ConfigError(f"{config.path}: data_format {config.data_format!r} is read by merging.suites.clip.datasets.load_data, not from image folders")
    pil, mean, std, size = transform
    folder = data_folder(config, task)
    names = _read_names(config.classnames[task]) if task in config.classnames else tpl.classnames(task)
    files, targets, classnames, listing = _labelled_files(folder, task, names)
    keep = _evenly(len(files), config.limit)
    images = ImageFiles([files[i] for i in keep], pil, size)
    train_images = train_labels = None
    train = folder.parent / "train"
    if folder.name != "train" and train.is_dir():
        train_files, train_targets, _, _ = _labelled_files(train, task, classnames)
        train_images, train_labels = ImageFiles(train_files, pil, size), torch.tensor(train_targets)
    val_images = val_labels = None
    val_from = ""
    for name in val_split_names(config):
        val = folder.parent / name
        if folder.name != name and val.is_dir():
            val_files, val_targets, _, _ = _labelled_files(val, task, classnames)
            val_images, val_labels, val_from = ImageFiles(val_files, pil, size), torch.tensor(val_targets), str(val)
            break
    data = FolderTaskData(
        task,
        classnames,
        images,
        torch.tensor([targets[i] for i in keep]),
        train_images,
        train_labels,
        val_images=val_images,
        val_labels=val_labels,
        val_from=val_from,
        channel_mean=mean,
        channel_std=std,
        folder=str(folder),
        hidden=tuple(listing.hidden),
        other=tuple(listing.other),
    )
    return with_val_fraction(data, config, folder.parent)
