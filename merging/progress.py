"""Progress reporting shared by the library, the CLI (tqdm) and the app (a callback)."""

from __future__ import annotations

import re
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
            progress(i / total, f"{desc} {i}/{total}")
        yield item
    if progress is not None:
        progress(1.0, f"{desc} {total}/{total}" if total else desc)


def scaled(progress: ProgressFn | None, start: float, end: float, prefix: str = "") -> ProgressFn | None:
    """A sub-range of an outer progress bar, for a step that is one part of a longer job."""
    if progress is None:
        return None

    def inner(fraction: float, message: str) -> None:
        progress(start + (end - start) * fraction, f"{prefix}{message}")

    return inner


def time_left(elapsed: float, fraction: float) -> str:
    """An estimate of the time left, from the time so far and the fraction done ("" until there is something to go on)."""
    if fraction <= 0.02 or elapsed < 3 or fraction >= 1.0:
        return ""
    left = elapsed * (1.0 - fraction) / fraction
    if left < 60:
        return f"about {max(5, int(round(left / 5.0)) * 5)} s left"
    if left < 3600:
        return f"about {int(round(left / 60.0))} min left"
    return f"about {left / 3600.0:.1f} h left"


def line_progress(stream=None, every: float = 2.0) -> ProgressFn:
    """A ``ProgressFn`` for the CLI: one line (percent, message, elapsed, time left) at most every ``every`` seconds,
    and whenever the step changes, so a long command without a terminal (a log, CI) still says what it does."""
    import time

    out = stream if stream is not None else sys.stderr
    start, last = time.perf_counter(), {"t": -every, "step": None}

    def report(fraction: float, message: str) -> None:
        now = time.perf_counter()
        step = re.sub(r"\d+/\d+", "", message)
        if now - last["t"] < every and step == last["step"] and fraction < 1.0:
            return
        last.update(t=now, step=step)
        elapsed = now - start
        eta = time_left(elapsed, fraction)
        print(f"[{100 * fraction:5.1f}%] {message} ({elapsed:.0f} s{', ' + eta if eta else ''})", file=out, flush=True)

    return report
