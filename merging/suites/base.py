"""A ``Suite``: pretrained encoder, one fine-tuned encoder and one fixed head per task, and each task's data.

The analogue of FusionBench's model pool plus task pool (STYLE.md, FusionBench): methods read the
weights and the unlabeled test images; evaluation reads the labeled test data. A task may also hold a
labeled validation split (``val``), read only to choose a hyperparameter (``merging.selection``), never the test split.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merging.errors import ConfigError, DataError
from merging.hashing import Digest, FileDigests, state_digest
from merging.model import build_encoder, make_heads
from merging.task_vectors import task_vectors

StateDict = dict[str, torch.Tensor]
_LOCATION_FIELDS = ("folder", "val_from")
"""TaskData fields that say where the data lies, not what it is: moving a folder changes no result."""
VAL_SEED = 0
"""The seed of every validation split carved from a train split (``carve_indices``)."""


def carve_indices(n: int, fraction: float, seed: int = VAL_SEED) -> torch.Tensor:
    """A fixed random ``fraction`` of ``range(n)`` (at least one), sorted: the rows of a train split that form a
    validation split. Deterministic in ``n``, ``fraction`` and ``seed``, so a saved suite carves the same images again."""
    if not 0.0 < fraction < 1.0:
        raise ConfigError(f"a validation fraction must lie strictly between 0 and 1, got {fraction!r}")
    k = min(n, max(1, round(fraction * n)))
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return order[:k].sort().values


def take(images: Any, indices: torch.Tensor) -> Any:
    """``images`` at ``indices``: a tensor's rows, or a lazy image list's (``LazyImages.take``) without decoding any."""
    return images[indices] if isinstance(images, torch.Tensor) else images.take(indices)


@dataclass
class TaskData:
    """Images are stored as uint8 [N, H, W, 3] and normalized per batch by ``preprocess``."""

    name: str
    classnames: list[str]
    test_images: torch.Tensor
    test_labels: torch.Tensor
    train_images: torch.Tensor | None = None
    train_labels: torch.Tensor | None = None
    mean: float = 0.5
    std: float = 0.25
    val_images: torch.Tensor | None = None
    """The labeled validation split, read only to choose a hyperparameter (``scaling=auto``), never to report a number."""
    val_labels: torch.Tensor | None = None
    val_from: str = ""
    """Where the validation split came from, in words (a folder, or ``10 % of train (seed 0)``); empty when there is none."""

    def __post_init__(self) -> None:
        if len(self.test_images) == 0:
            raise DataError(f"task {self.name!r}: the test set is empty")
        if len(self.test_images) != len(self.test_labels):
            raise DataError(f"task {self.name!r}: {len(self.test_images)} test images but {len(self.test_labels)} labels")
        top = int(self.test_labels.max())
        if top >= len(self.classnames):
            raise DataError(f"task {self.name!r}: label {top} but only {len(self.classnames)} class names")
        if (self.val_images is None) != (self.val_labels is None):
            raise DataError(f"task {self.name!r}: a validation split needs both images and labels")
        if self.val_images is not None:
            if len(self.val_images) == 0 or len(self.val_images) != len(self.val_labels):
                raise DataError(f"task {self.name!r}: {len(self.val_images)} validation images but {len(self.val_labels)} labels")
            top = int(self.val_labels.max())
            if top >= len(self.classnames) or int(self.val_labels.min()) < 0:
                raise DataError(f"task {self.name!r}: validation label {top} is outside the {len(self.classnames)} classes")

    def with_val_from_train(self, fraction: float) -> TaskData:
        """This task with a validation split carved from its train split (``carve_indices``); the train split is left
        as it is, so a model fine-tuned on train has seen these images (as users' checkpoints have seen their train split)."""
        if self.train_images is None:
            raise DataError(f"task {self.name!r}: no train split to carve a validation split from; add a val split instead")
        rows = carve_indices(len(self.train_images), fraction)
        return replace(self, val_images=take(self.train_images, rows), val_labels=self.train_labels[rows],
                                   val_from=f"{100 * fraction:g} % of train (seed {VAL_SEED})")

    @property
    def num_classes(self) -> int:
        return len(self.classnames)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [B, H, W, 3] -> float [B, 3, H, W], normalized."""
        return (images.permute(0, 3, 1, 2).float() / 255.0 - self.mean) / self.std

    def batches(self, split: str = "test", batch_size: int = 256, indices: torch.Tensor | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        images, labels = self.split(split)
        order = torch.arange(len(images)) if indices is None else indices
        for i in range(0, len(order), batch_size):
            idx = order[i : i + batch_size]
            yield self.preprocess(images[idx]), labels[idx]

    def digest(self, files: FileDigests) -> str:
        """Digest of everything here that can change a number: every image (tensor bytes, or each file's
        bytes in order), every label, the class names in order, the normalization; not the folder's path."""
        d = Digest(type(self).__name__)
        for f in fields(self):
            if f.name in _LOCATION_FIELDS:
                continue
            value = getattr(self, f.name)
            d.update(f.name)
            paths = getattr(value, "files", None)
            if paths is not None:  # images read from files (``ImageFiles``): their bytes, in label order
                d.update(list(value.shape)).update(files.digests(paths))
            else:
                d.update(value)
        return d.hexdigest()

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "test":
            return self.test_images, self.test_labels
        if split == "train" and self.train_images is not None:
            return self.train_images, self.train_labels
        if split == "val" and self.val_images is not None:
            return self.val_images, self.val_labels
        if split == "val":
            raise DataError(f"task {self.name!r} has no validation split: give a real suite a val/ folder beside test/ "
                            "or 'val_fraction: 0.1' in its config (the built-in suites carve one from train)")
        raise DataError(f"task {self.name!r} has no {split!r} split")


@dataclass
class Suite:
    name: str
    encoder_config: dict
    pretrained: StateDict
    finetuned: dict[str, StateDict]
    heads: dict[str, dict[str, torch.Tensor]]
    data: dict[str, TaskData]
    info: dict = field(default_factory=dict)
    file_memo: str | Path | None = None
    """Where digests of image files are remembered by size and mtime (``hashing.FileDigests``); None: in memory."""
    _digests: dict = field(default_factory=dict, repr=False, compare=False)
    """Digests of the parts computed so far, shared with ``subset``s (each part is read once)."""

    def __post_init__(self) -> None:
        for t in self.finetuned:
            if t not in self.heads:
                raise ConfigError(f"suite {self.name!r}: task {t!r} has no head")
            if t not in self.data:
                raise ConfigError(f"suite {self.name!r}: task {t!r} has no data")
            n_head = self.heads[t]["weight"].shape[0]
            if n_head != self.data[t].num_classes:
                raise DataError(f"suite {self.name!r}: task {t!r} head has {n_head} classes but the data has {self.data[t].num_classes}")

    @property
    def tasks(self) -> list[str]:
        return list(self.finetuned)

    def check_tasks(self, tasks: list[str] | None) -> list[str]:
        if tasks is None:
            return self.tasks
        unknown = [t for t in tasks if t not in self.finetuned]
        if unknown:
            raise ConfigError(f"unknown task(s) {unknown} in suite {self.name!r}; known: {', '.join(self.tasks)}")
        return list(tasks)

    def build_encoder(self) -> nn.Module:
        return build_encoder(self.encoder_config)

    def make_heads(self, trainable: bool = False) -> nn.ModuleDict:
        return make_heads(self.heads, trainable)

    def task_vectors(self, tasks: list[str] | None = None) -> list[StateDict]:
        return task_vectors(self.pretrained, [self.finetuned[t] for t in self.check_tasks(tasks)])

    def _part(self, key: tuple, compute: Callable[[], Any]) -> Any:
        if key not in self._digests:
            self._digests[key] = compute()
        return self._digests[key]

    def part_digests(self, task: str) -> dict[str, str]:
        """Digests of what task ``task``'s results depend on besides the pretrained weights: its fine-tuned
        weights, its head and its data (every byte of each)."""
        files = self._part(("files",), lambda: FileDigests(self.file_memo))
        return {
            "finetuned": self._part(("finetuned", task), lambda: state_digest(self.finetuned[task])),
            "head": self._part(("head", task), lambda: state_digest(self.heads[task])),
            "data": self._part(("data", task), lambda: self.data[task].digest(files)),
        }

    @cached_property
    def fingerprint(self) -> str:
        """Digest of everything a run on this suite (these tasks, in this order) depends on.

        Every byte of the pretrained, fine-tuned and head weights and of every test, train and validation image, each
        label, the class names and their order, the encoder config: any change gives a new fingerprint,
        so the runs it affects are computed again (a run's key holds the fingerprint of its own tasks
        only, so runs on other tasks stay cached). Read once per suite object (``_digests``).
        """
        pretrained = self._part(("pretrained",), lambda: state_digest(self.pretrained))
        d = Digest(self.name, self.encoder_config, pretrained)
        for t in self.tasks:
            d.update(t).update(self.part_digests(t))
        return d.hexdigest(16)

    @cached_property
    def checkpoint_family(self) -> dict[str, str]:
        """Which checkpoints the numbers come from: ``{"suite", "layout", "weights"}``, ``weights`` a short
        digest of the pretrained, fine-tuned and head weights only (the data may differ; the weights may not).
        Tables and exports show it next to every number, and refuse to mix two families silently."""
        pretrained = self._part(("pretrained",), lambda: state_digest(self.pretrained))
        d = Digest(self.encoder_config, pretrained)
        for t in self.tasks:
            d.update(t).update(self._part(("finetuned", t), lambda t=t: state_digest(self.finetuned[t])))
            d.update(self._part(("head", t), lambda t=t: state_digest(self.heads[t])))
        return {"suite": self.name, "layout": str(self.info.get("layout", "built-in")), "weights": d.hexdigest(8)}

    def subset(self, tasks: list[str]) -> Suite:
        """The same suite restricted to some tasks (the number-of-tasks ablation)."""
        tasks = self.check_tasks(tasks)
        return Suite(
            name=self.name,
            encoder_config=self.encoder_config,
            pretrained=self.pretrained,
            finetuned={t: self.finetuned[t] for t in tasks},
            heads={t: self.heads[t] for t in tasks},
            data={t: self.data[t] for t in tasks},
            info=self.info,
            file_memo=self.file_memo,
            _digests=self._digests,
        )
