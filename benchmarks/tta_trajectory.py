"""Test accuracy and summed entropy *along* one test-time adaptation run, for the entropy-minimising methods.

    .venv/bin/python benchmarks/tta_trajectory.py [--suite mini8] [--preset paper] [--points 10] [--methods adamerging wemoe]

Each method trains once with its preset (seeded as ``python -m merging run`` seeds it); the run's progress
callback pauses it ``--points`` times to evaluate every task's full test set, so the table shows where along the
schedule accuracy peaks and whether the entropy keeps falling after it. Labels are read only for the table,
never by the training. Prints markdown rows.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from wemoe_diagnostics import accuracy_and_entropy  # noqa: E402  (this folder, first on sys.path)

from merging.methods import get_method, make_params  # noqa: E402
from merging.methods.base import RunContext  # noqa: E402
from merging.suites import get_suite  # noqa: E402


def score(model, suite) -> tuple[float, float]:
    """Mean test accuracy (%) over tasks and the summed mean entropy of the heads (the training objective)."""
    accuracy, entropies = accuracy_and_entropy(model, suite)
    return sum(accuracy) / len(accuracy), sum(entropies)


def trajectory(name: str, suite, preset: str, points: int) -> list[tuple[int, float, float]]:
    """(steps done, accuracy, summed entropy) at ``points`` evenly spaced moments of one run, the start included."""
    method = get_method(name)
    params = make_params(method, {}, preset)
    torch.manual_seed(0)
    model = method.build(suite, params)
    every = max(1, params.steps // points)
    rows: list[tuple[int, float, float]] = []

    def progress(fraction: float, _: str) -> None:
        done = round(fraction * params.steps)
        if done % every == 0 and (not rows or rows[-1][0] != done):
            was_training = model.training
            rows.append((done, *score(model.eval(), suite)))
            model.train(was_training)

    method.adapt(model, suite, params, RunContext(seed=0, device="cpu", progress=progress))
    if rows[-1][0] != params.steps:
        rows.append((params.steps, *score(model.eval(), suite)))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="mini8")
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--preset", default="paper")
    ap.add_argument("--points", type=int, default=10)
    ap.add_argument("--methods", nargs="+", default=["adamerging", "wemoe"])
    args = ap.parse_args()
    suite = get_suite(args.suite, cache_dir=args.cache_dir)
    for name in args.methods:
        t0 = time.perf_counter()
        rows = trajectory(name, suite, args.preset, args.points)
        peak = max(rows, key=lambda r: r[1])
        print(f"\n{get_method(name).title}, {args.preset} preset ({time.perf_counter() - t0:.0f} s with the evaluations); "
              f"peak {peak[1]:.1f} at step {peak[0]}, end {rows[-1][1]:.1f}")
        print("| steps | avg accuracy | summed entropy |\n|---|---|---|")
        for steps, accuracy, summed in rows:
            print(f"| {steps} | {accuracy:.1f} | {summed:.2f} |")


if __name__ == "__main__":
    main()
