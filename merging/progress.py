"""Progress reporting shared by the library, the CLI (tqdm) and the app (a callback)."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Iterator
from typing import TypeVar

from tqdm.auto import tqdm

T = TypeVar("T")
ProgressFn = Callable[[float, str], None]
"""``progress(fraction_done, message)``; the app draws it with st.progress, the CLI with tqdm."""


def track(items: Iterable[T], total: int | None = None, desc: str = "", progress: ProgressFn | None = None) -> Iterator[T]:
    """Iterate with a progress bar: tqdm on a terminal, and ``progress`` when a caller gives one."""
    if total is None and hasattr(items, "__len__"):
        total = len(items)  # type: ignore[arg-type]
    bar = tqdm(items, total=total, desc=desc, leave=False, disable=not sys.stderr.isatty(), dynamic_ncols=True)
    every = max(1, (total or 100) // 100)
    for i, item in enumerate(bar):
        if progress is not None and total and i % every == 0:
            progress(i / total, desc)
        yield item
    if progress is not None:
        progress(1.0, desc)


def scaled(progress: ProgressFn | None, start: float, end: float, prefix: str = "") -> ProgressFn | None:
    """A sub-range of an outer progress bar, for a step that is one part of a longer job."""
    if progress is None:
        return None

    def inner(fraction: float, message: str) -> None:
        progress(start + (end - start) * fraction, f"{prefix}{message}")

    return inner
