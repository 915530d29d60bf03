"""Sweep executors: wall time of a small Task Arithmetic lambda sweep, in-process vs a process pool vs Ray.

    .venv/bin/python benchmarks/bench_sweeps.py [--suite micro] [--values 0.1,0.2,...] [--seeds 0,1] [--workers 2]

Each executor runs the same sweep in its own fresh temporary cache (holding only the built suite), so
every point is computed; Ray's time includes starting and stopping its local instance. Prints a
markdown table: wall seconds, points per minute, and the ratio to the in-process executor.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from merging.suites import get_suite  # noqa: E402
from merging.sweeps import SweepConfig, parse_values, run_sweep  # noqa: E402


def machine() -> str:
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, load {load:.1f}, torch {torch.__version__}"


def timed(config: SweepConfig, suite_dir: Path, executor: str, workers: int) -> tuple[float, int]:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(suite_dir, Path(tmp) / "suites")
        t0 = time.perf_counter()
        out = run_sweep(config, cache_dir=tmp, device="cpu", executor=executor, workers=workers)
        return time.perf_counter() - t0, out.computed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="micro")
    ap.add_argument("--values", default="0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8")
    ap.add_argument("--seeds", default="0")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--cache-dir", default="cache", help="where the suite is built (copied into each fresh cache)")
    ap.add_argument("--executors", default="local,pool,ray")
    args = ap.parse_args()
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    get_suite(args.suite, cache_dir=args.cache_dir)
    config = SweepConfig(args.suite, "task_arithmetic", {"scaling": parse_values(args.values)}, seeds=tuple(int(s) for s in args.seeds.split(",")))
    runs = {"local": ("local", 1), "pool": ("local", args.workers), "ray": ("ray", args.workers)}
    rows = []
    for name in args.executors.split(","):
        executor, workers = runs[name]
        seconds, points = timed(config, Path(args.cache_dir) / "suites", executor, workers)
        rows.append((name, workers, points, seconds))
    base = rows[0][3]
    print(f"machine: {machine()}\nsweep: task_arithmetic on {args.suite}, scaling {args.values}, seeds {args.seeds}\n")
    print("| executor | workers | points | wall s | points/min | time vs local |")
    print("|---|---|---|---|---|---|")
    for name, workers, points, seconds in rows:
        print(f"| {name} | {workers} | {points} | {seconds:.1f} | {60 * points / seconds:.1f} | {seconds / base:.2f} |")


if __name__ == "__main__":
    main()
