"""Spine benchmarks: suite build time, and evaluation throughput next to a raw open_clip forward.

    .venv/bin/python benchmarks/bench_spine.py --suite mini8 [--rebuild]

Prints a markdown table. The raw forward is the same encoder on the same preprocessed batches, with no
heads, no task loop and no bookkeeping: the ratio is what MergeLens's evaluation costs on top of it.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.evaluation import evaluate  # noqa: E402
from merging.methods import get_method, make_params  # noqa: E402
from merging.suites import get_suite  # noqa: E402
from merging.suites import mini8 as builtin  # noqa: E402


def machine() -> str:
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="mini8")
    ap.add_argument("--rebuild", action="store_true", help="time a fresh build in a temporary cache")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    rows = []
    if args.rebuild:
        with tempfile.TemporaryDirectory() as tmp:
            t0 = time.perf_counter()
            suite = get_suite(args.suite, cache_dir=tmp)
            rows.append(("suite build (fresh, incl. save)", f"{time.perf_counter() - t0:.1f} s", ", ".join(f"{k} {v:.1f}s" for k, v in suite.info["build_seconds"].items())))
            t0 = time.perf_counter()
            builtin.load(builtin.suite_dir(args.suite, 0, tmp))
            rows.append(("suite load from cache", f"{time.perf_counter() - t0:.2f} s", ""))
    suite = get_suite(args.suite)
    method = get_method("task_arithmetic")
    model = method.build(suite, make_params(method)).eval()
    n = sum(len(suite.data[t].test_images) for t in suite.tasks)
    evaluate(model, suite, device="cpu")  # warm-up
    best_eval = min(_timed(lambda: evaluate(model, suite, device="cpu")) for _ in range(args.repeats))
    batches = [suite.data[t].preprocess(suite.data[t].test_images[i : i + 256]) for t in suite.tasks for i in range(0, len(suite.data[t].test_images), 256)]
    encoder = model.encoder

    def raw() -> None:
        with torch.no_grad():
            for b in batches:
                encoder(b)

    raw()
    best_raw = min(_timed(raw) for _ in range(args.repeats))
    rows.append(("evaluate() all tasks, batch 256", f"{n / best_eval:.0f} img/s", f"{n} images, best of {args.repeats}"))
    rows.append(("raw open_clip forward, same batches", f"{n / best_raw:.0f} img/s", "preprocessed tensors, encoder only"))
    rows.append(("ratio evaluate / raw", f"{best_raw / best_eval:.2f}", "1.0 = no overhead"))
    print(f"machine: {machine()}\n")
    print("| measurement | value | notes |\n|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} |")


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
