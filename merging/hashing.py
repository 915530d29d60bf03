"""Content digests of what determines a result: tensors by their bytes, files by their bytes.

A cache key must change when anything that changes a number changes, so digests read every byte, never
a summary (a sum collides under any permutation). xxHash's XXH3-128 (the ``xxhash`` package) reads at
memory speed (BENCHMARKS.md, "The suite fingerprint"); it guards against accidents, not adversaries.
File digests are remembered by (path, size, mtime) in a small JSON memo, so a suite of 10k images is
read once, and again only where a file's size or mtime changed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
import xxhash

from merging.io import atomic_write

CHUNK = 1 << 22
"""Bytes read at a time when hashing a file (4 MiB: streaming, whatever the file's size)."""


class Digest:
    """An incremental XXH3-128 digest fed with strings, tensors, arrays and other digests."""

    def __init__(self, *parts: object):
        self._h = xxhash.xxh3_128()
        for p in parts:
            self.update(p)

    def update(self, part: object) -> Digest:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            self._h.update(f"<tensor {t.dtype} {tuple(t.shape)}>".encode())
            if t.numel():
                self._h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        elif isinstance(part, np.ndarray):
            a = np.ascontiguousarray(part)
            self._h.update(f"<array {a.dtype} {a.shape}>".encode())
            self._h.update(memoryview(a).cast("B"))
        elif isinstance(part, bytes | bytearray | memoryview):
            self._h.update(part)
        else:
            self._h.update(json.dumps(part, sort_keys=True, default=str, ensure_ascii=False).encode())
        self._h.update(b"\x00")
        return self

    def hexdigest(self, length: int = 32) -> str:
        return self._h.hexdigest()[:length]


def tensor_digest(t: torch.Tensor) -> str:
    """Digest of a tensor's dtype, shape and every byte of its values."""
    return Digest(t).hexdigest()


def state_digest(state: Mapping[str, torch.Tensor]) -> str:
    """Digest of a state dict: every key with its tensor's dtype, shape and bytes, in sorted key order."""
    d = Digest()
    for k in sorted(state):
        d.update(k).update(state[k])
    return d.hexdigest()


def file_digest(path: str | Path) -> str:
    """Digest of a file's bytes, read in ``CHUNK``-sized pieces."""
    h = xxhash.xxh3_128()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return h.hexdigest()


class FileDigests:
    """File digests remembered by (size, mtime_ns) in ``memo`` (a JSON file; None keeps them in memory only).

    A file whose size or mtime changed is read again; a damaged memo is ignored and rewritten.
    """

    def __init__(self, memo: str | Path | None = None, workers: int = 8):
        self.memo = Path(memo) if memo is not None else None
        self.workers = workers
        self._known: dict[str, list] = {}
        if self.memo is not None and self.memo.is_file():
            try:
                known = json.loads(self.memo.read_text(encoding="utf-8"))
                self._known = known if isinstance(known, dict) else {}
            except (OSError, ValueError):
                self._known = {}

    def _one(self, path: str) -> tuple[str, list]:
        st = os.stat(path)
        stamp = [st.st_size, st.st_mtime_ns]
        seen = self._known.get(path)
        if isinstance(seen, list) and len(seen) == 3 and seen[:2] == stamp:
            return path, seen
        return path, [*stamp, file_digest(path)]

    def digests(self, paths: Sequence[str | Path]) -> list[str]:
        """The digest of each file, in order (files are read in parallel where the memo does not know them)."""
        names = [str(p) for p in paths]
        with ThreadPoolExecutor(max_workers=self.workers) as pool:
            found = dict(pool.map(self._one, names))
        changed = any(self._known.get(p) != v for p, v in found.items())
        self._known.update(found)
        if changed and self.memo is not None:
            text = json.dumps(self._known, separators=(",", ":"))
            atomic_write(self.memo, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        return [found[p][2] for p in names]
