"""A ``Suite``: pretrained encoder, one fine-tuned encoder and one fixed head per task, and each task's data.

The analogue of FusionBench's model pool plus task pool (STYLE.md, FusionBench): methods read the
weights and the unlabeled test images; evaluation reads the labeled test data.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from functools import cached_property

import torch
from torch import nn

from merging.errors import ConfigError, DataError
from merging.model import build_encoder, make_heads
from merging.task_vectors import task_vectors

StateDict = dict[str, torch.Tensor]


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

    def __post_init__(self) -> None:
        if len(self.test_images) == 0:
            raise DataError(f"task {self.name!r}: the test set is empty")
        if len(self.test_images) != len(self.test_labels):
            raise DataError(f"task {self.name!r}: {len(self.test_images)} test images but {len(self.test_labels)} labels")
        top = int(self.test_labels.max())
        if top >= len(self.classnames):
            raise DataError(f"task {self.name!r}: label {top} but only {len(self.classnames)} class names")

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

    def split(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        if split == "test":
            return self.test_images, self.test_labels
        if split == "train" and self.train_images is not None:
            return self.train_images, self.train_labels
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

    @cached_property
    def fingerprint(self) -> str:
        """Content hash of the weights' shapes and a checksum of each, plus the data sizes; cheap and stable."""
        h = hashlib.sha256(json.dumps({"name": self.name, "encoder": self.encoder_config}, sort_keys=True, default=str).encode())
        for group in [self.pretrained, *self.finetuned.values(), *self.heads.values()]:
            for k in sorted(group):
                v = group[k]
                h.update(k.encode())
                h.update(str(tuple(v.shape)).encode())
                h.update(f"{float(v.double().sum()):.10e}".encode())
        for t, d in self.data.items():
            h.update(f"{t}:{len(d.test_images)}:{int(d.test_labels.sum())}".encode())
        return h.hexdigest()[:16]

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
        )
