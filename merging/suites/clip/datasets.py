"""A task's images from a Hugging Face dataset saved with ``save_to_disk`` or from parquet files (issue #22, part 3).

FusionBench's image datasets (``tanganke/*`` on the Hub) are tables with an ``image`` column (HF's ``Image``
feature: a struct of encoded ``bytes`` and a ``path``) and a ``label`` column (a ``ClassLabel`` whose
``names`` are the classes). ``datasets.Dataset.save_to_disk`` writes such a table as Arrow IPC *stream*
files listed in ``state.json``; ``to_parquet`` and the Hub write parquet files. Both carry the features as
JSON in the schema metadata (``b"huggingface"``, ``{"info": {"features": ...}}``); ``dataset_info.json``
holds them too. Read here with ``pyarrow`` alone (the ``datasets`` library is not needed to load).

Images are decoded lazily, per indexed row, exactly like ``images.ImageFiles`` (``to_rgb8``, then open_clip's
val_preprocess); Arrow files are memory-mapped and parquet row groups read on demand. The data files'
bytes enter the suite fingerprint through ``ImageRows.files`` (``TaskData.digest``).
"""

from __future__ import annotations

import io
import json
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

import merging.suites.templates as tpl
from merging.errors import DataError
from merging.suites.clip.images import (
    FolderTaskData,
    LazyImages,
    _evenly,
    _pool,
    _read_names,
    _why,
    load_task_data,
    task_names,
    to_rgb8,
    val_split_names,
    with_val_fraction,
)
from merging.suites.config import DATA_FORMATS, SuiteConfig

__all__ = ["DATA_FORMATS", "DatasetTaskData", "ImageRows", "load_data", "load_dataset_task", "locate", "read_split"]


@dataclass
class TableSplit:
    """One split of a table dataset as found: its data files (in row order), labels, and class names if the features name them."""

    files: list[Path]
    labels: np.ndarray
    names: list[str] | None
    where: str
    fmt: str
    image_column: str


def _features(schema_meta: dict | None, info_file: Path | None) -> dict:
    """The HF features mapping from Arrow/parquet schema metadata, else ``dataset_info.json``; ``{}`` if neither."""
    raw = (schema_meta or {}).get(b"huggingface")
    if raw:
        try:
            return json.loads(raw).get("info", {}).get("features", {}) or {}
        except (ValueError, AttributeError):
            pass
    if info_file is not None and info_file.is_file():
        try:
            return json.loads(info_file.read_text(encoding="utf-8")).get("features", {}) or {}
        except (ValueError, AttributeError):
            return {}
    return {}


def _class_names(features: dict, column: str) -> list[str] | None:
    feature = features.get(column)
    if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" and feature.get("names"):
        return [str(n) for n in feature["names"]]
    return None


def _arrow_files(folder: Path) -> list[Path]:
    state = folder / "state.json"
    try:
        listed = json.loads(state.read_text(encoding="utf-8"))["_data_files"]
        return [folder / f["filename"] for f in listed]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{state}: not a dataset saved with save_to_disk ({_why(e)}); save it with datasets' Dataset.save_to_disk") from None


def _open_arrow(path: Path):
    import pyarrow as pa

    try:
        return pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
    except Exception as e:  # pyarrow raises ArrowInvalid / OSError for damaged files
        raise DataError(f"{path}: not a readable Arrow file ({_why(e)}); save the dataset again with save_to_disk") from None


def _parquet(path: Path):
    import pyarrow.parquet as pq

    try:
        return pq.ParquetFile(str(path))
    except Exception as e:  # ArrowInvalid for damaged or non-parquet files
        raise DataError(f"{path}: not a readable parquet file ({_why(e)})") from None


def read_split(location: Path, fmt: str, image_column: str, label_column: str) -> TableSplit:
    """Labels, class names and data files of one split (a ``save_to_disk`` folder, a parquet file or a folder of them)."""
    import pyarrow as pa

    if fmt == "hf_disk":
        files = _arrow_files(location)
        tables = [_open_arrow(f) for f in files]
        schemas = [t.schema for t in tables]
        info = location / "dataset_info.json"
    else:
        if "*" in location.name:  # the Hub's data/<split>-*.parquet shards
            files = sorted(location.parent.glob(location.name))
        else:
            files = sorted(location.glob("*.parquet")) if location.is_dir() else [location]
        if not files:
            raise DataError(f"{location}: no .parquet files in the folder")
        pfs = [_parquet(f) for f in files]
        schemas = [p.schema_arrow for p in pfs]
        info = None
    where = str(location)
    for f, schema in zip(files, schemas, strict=True):
        for col, key in ((image_column, "image_column"), (label_column, "label_column")):
            if col not in schema.names:
                raise DataError(f"{f}: no column {col!r} (columns: {', '.join(schema.names)}); set {key!r} in the suite config")
        label_type = schema.field(label_column).type
        if not pa.types.is_integer(label_type):
            raise DataError(f"{f}: label column {label_column!r} holds {label_type}, not integer class indices; set 'label_column' to the class-index column")
    if fmt == "hf_disk":
        labels = np.concatenate([t.column(label_column).to_numpy(zero_copy_only=False) for t in tables]) if tables else np.zeros(0, int)
    else:
        labels = np.concatenate([p.read(columns=[label_column]).column(0).to_numpy(zero_copy_only=False) for p in pfs])
    if len(labels) and np.isnan(labels.astype(float)).any():
        raise DataError(f"{where}: column {label_column!r} has missing labels; drop those rows or fill them")
    names = _class_names(_features(schemas[0].metadata, info), label_column) if schemas else None
    return TableSplit(files, labels.astype(np.int64), names, where, fmt, image_column)


class ImageRows(LazyImages):
    """A table's image column, decoded on indexing: ``images[idx]`` -> uint8 [B, H, W, 3], like ``ImageFiles``.

    ``rows`` are the table rows shown (after ``limit``); ``files`` are the data files, whose bytes
    ``TaskData.digest`` hashes. Nothing is read until indexed; pickles without its open files.
    """

    def __init__(self, split: TableSplit, rows: Sequence[int], pil_transform: Callable, size: tuple[int, int]):
        self.split = split
        self.rows = list(rows)
        self.files = [str(f) for f in split.files]
        self.pil_transform = pil_transform
        self.size = size
        self._lock = threading.Lock()
        self._state: dict = {}

    def __getstate__(self) -> dict:
        return {**self.__dict__, "_lock": None, "_state": {}}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.rows)

    def take(self, indices: Sequence[int] | torch.Tensor) -> ImageRows:
        return ImageRows(self.split, [self.rows[int(i)] for i in indices], self.pil_transform, self.size)

    def _index(self) -> tuple[list, np.ndarray]:
        """Per data file (or parquet row group): a reader, and the cumulative row offsets."""
        with self._lock:
            if "parts" not in self._state:
                parts, counts = [], []
                for f in self.split.files:
                    if self.split.fmt == "hf_disk":
                        table = _open_arrow(f)
                        parts.append(("arrow", table.column(self.split.image_column)))
                        counts.append(table.num_rows)
                    else:
                        pf = _parquet(f)
                        for g in range(pf.num_row_groups):
                            parts.append(("parquet", (pf, g)))
                            counts.append(pf.metadata.row_group(g).num_rows)
                self._state["parts"], self._state["starts"] = parts, np.concatenate([[0], np.cumsum(counts)])
            return self._state["parts"], self._state["starts"]

    def _cell(self, row: int):
        parts, starts = self._index()
        part = int(np.searchsorted(starts, row, side="right")) - 1
        kind, ref = parts[part]
        if kind == "arrow":
            return ref[row - int(starts[part])].as_py()
        pf, g = ref
        with self._lock:
            cache = self._state.setdefault("groups", {})
            if (part, g) not in cache:
                if len(cache) >= 4:
                    cache.pop(next(iter(cache)))
                cache[(part, g)] = pf.read_row_group(g, columns=[self.split.image_column]).column(0)
            column = cache[(part, g)]
        return column[row - int(starts[part])].as_py()

    def where(self, row: int) -> str:
        return f"{self.split.where} row {row}"

    def decode(self, row: int):
        """The 8-bit RGB picture in table row ``row``; raises what Pillow raises for bad bytes."""
        from PIL import Image

        cell = self._cell(row)
        data = cell.get("bytes") if isinstance(cell, dict) else cell
        if data is None and isinstance(cell, dict) and cell.get("path"):
            raise ValueError(f"the image is stored by path ({cell['path']!r}), not as bytes; save the dataset with embedded images")
        if not isinstance(data, bytes | bytearray):
            raise ValueError(f"column {self.split.image_column!r} holds {type(data).__name__}, not encoded image bytes")
        with Image.open(io.BytesIO(data)) as im:
            im.load()
            return to_rgb8(im)

    def load(self, i: int) -> np.ndarray:
        row = self.rows[i]
        try:
            picture = self.decode(row)
        except Exception as e:  # any decoder failure on untrusted bytes
            raise DataError(f"{self.where(row)}: not a readable image ({_why(e)}); fix or drop the row (`suite check` lists every such row)") from None
        out = np.asarray(self.pil_transform(picture), dtype=np.uint8)
        if out.shape != (*self.size, 3):
            raise DataError(f"{self.where(row)}: preprocessed to {out.shape}, expected {(*self.size, 3)}")
        return out

    def unreadable(self, chunk: int = 64) -> list[tuple[str, str]]:
        """``[(where, why)]`` for every shown row whose image does not decode, in order (``images.unreadable_images``'s twin)."""

        def run(part: Sequence[int]) -> list[tuple[str, str]]:
            bad = []
            for row in part:
                try:
                    self.decode(row)
                except Exception as e:  # as in load
                    bad.append((self.where(row), _why(e)))
            return bad

        parts = [self.rows[i : i + chunk] for i in range(0, len(self.rows), chunk)]
        return [b for found in _pool().map(run, parts) for b in found]


@dataclass
class DatasetTaskData(FolderTaskData):
    """A ``FolderTaskData`` whose images are rows of a saved HF dataset or parquet files."""

    data_format: str = "hf_disk"
    names_from: str = ""
    """Where the class names came from: the dataset's features, the config's file, MergeLens's table, or label numbers."""


def locate(config: SuiteConfig, task: str, split: str) -> Path | None:
    """Where split ``split`` of ``task`` lies in ``config.data_format``, or None when no candidate exists.

    hf_disk: ``<data_root>/<task>/<split>/`` (a ``DatasetDict`` saved at ``<task>``), or ``<task>/`` itself
    when it is one saved ``Dataset`` (used as the test split). parquet: ``<task>/<split>/*.parquet``,
    ``<task>/<split>.parquet``, or the Hub's ``<task>/data/<split>-*.parquet`` (returned as that pattern).
    """
    if task in config.data_folders and split == config.split:
        path = config.data_folders[task]
        if config.data_format == "hf_disk" and (path / "dataset_dict.json").is_file() and (path / split / "state.json").is_file():
            return path / split  # a DatasetDict's folder: its split
        return path if path.exists() else None
    for name in task_names(task):
        root = config.data_root / name
        if config.data_format == "hf_disk":
            if (root / split / "state.json").is_file():
                return root / split
            if split == config.split and (root / "state.json").is_file():
                return root
        else:
            if (root / split).is_dir() and any((root / split).glob("*.parquet")):
                return root / split
            if (root / f"{split}.parquet").is_file():
                return root / f"{split}.parquet"
            if (root / "data").is_dir() and any((root / "data").glob(f"{split}-*.parquet")):
                return root / "data" / f"{split}-*.parquet"
    return None


def _labels_and_names(task: str, split: TableSplit, config: SuiteConfig, names: list[str] | None) -> tuple[list[str], str]:
    if names is not None:
        chosen, origin = names, "the test split"
    elif task in config.classnames:
        chosen, origin = _read_names(config.classnames[task]), "the config's classnames file"
    elif split.names is not None:
        chosen, origin = split.names, "the dataset's features"
    elif tpl.classnames(task) is not None:
        chosen, origin = list(tpl.classnames(task)), "MergeLens's table for this task"
    else:
        top = int(split.labels.max()) if len(split.labels) else 0
        chosen, origin = [str(i) for i in range(top + 1)], "label numbers (no names in the features)"
    if len(split.labels) == 0:
        raise DataError(f"{split.where}: the dataset has no rows")
    low, high = int(split.labels.min()), int(split.labels.max())
    if low < 0 or high >= len(chosen):
        row = int(np.argmax((split.labels < 0) | (split.labels >= len(chosen))))
        bad = int(split.labels[row])
        raise DataError(f"{split.where}: label {bad} in row {row} is outside 0..{len(chosen) - 1}, the {len(chosen)} classes "
                        f"(names from {origin}); fix the label column or give 'classnames' for task {task!r}")
    return chosen, origin


def load_dataset_task(config: SuiteConfig, task: str, transform: tuple) -> DatasetTaskData:
    """The task's test split from a saved HF dataset or parquet files (and its train and validation splits when they
    lie beside it; else a validation split carved from train by ``val_fraction``)."""
    pil, mean, std, size = transform
    location = locate(config, task, config.split)
    if location is None:
        tried = ", ".join(str(config.data_root / n / config.split) for n in task_names(task)[:2])
        hint = "a folder written by save_to_disk" if config.data_format == "hf_disk" else "*.parquet files or <split>.parquet"
        raise DataError(f"missing {config.data_format} data for task {task!r}: none of {tried} holds {hint}; set 'data_folders' to it")
    split = read_split(location, config.data_format, config.image_column, config.label_column)
    classnames, origin = _labels_and_names(task, split, config, None)
    keep = _evenly(len(split.labels), config.limit)
    train_images = train_labels = None
    if config.split != "train" and (train_at := locate(config, task, "train")) is not None and train_at != location:
        train = read_split(train_at, config.data_format, config.image_column, config.label_column)
        _labels_and_names(task, train, config, classnames)
        train_images, train_labels = ImageRows(train, range(len(train.labels)), pil, size), torch.from_numpy(train.labels)
    val_images = val_labels = None
    val_from = ""
    for name in val_split_names(config):
        if (val_at := locate(config, task, name)) is not None and val_at != location:
            val = read_split(val_at, config.data_format, config.image_column, config.label_column)
            _labels_and_names(task, val, config, classnames)
            val_images, val_labels, val_from = ImageRows(val, range(len(val.labels)), pil, size), torch.from_numpy(val.labels), val.where
            break
    data = DatasetTaskData(
        task,
        classnames,
        ImageRows(split, keep, pil, size),
        torch.from_numpy(split.labels[keep]),
        train_images,
        train_labels,
        val_images=val_images,
        val_labels=val_labels,
        val_from=val_from,
        channel_mean=mean,
        channel_std=std,
        folder=split.where,
        data_format=config.data_format,
        names_from=origin,
    )
    return with_val_fraction(data, config, location.parent)


def load_data(config: SuiteConfig, task: str, transform: tuple) -> FolderTaskData:
    """The task's data in the config's ``data_format``: image folders (``images.load_task_data``) or a table dataset."""
    if config.data_format == "folders":
        return load_task_data(config, task, transform)
    return load_dataset_task(config, task, transform)
