"""Surgery and AdaMerging costs: cached-feature Surgery vs re-running both encoders, AdaMerging steps/s.

    .venv/bin/python benchmarks/bench_surgery.py --suite micro [--iterations 20] [--threads 1]

Prints a markdown table. Both Surgery loops train the same freshly built modules on the same index
batches; the re-running loop is the reference loop of ``tests/test_surgery.py`` (both encoders on the
batch's images every step, as the original code does), the cached one is what ``surgery`` runs.
AdaMerging steps use the paper's batches (2 x 16 images per task per step).
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging import feature_cache  # noqa: E402
from merging.methods import RunContext, get_method, make_params  # noqa: E402
from merging.methods.surgery import fit_cached, index_schedule, individual_model  # noqa: E402
from merging.runs import RunConfig, build_model  # noqa: E402
from merging.suites import get_suite  # noqa: E402


def reference_fit():
    spec = importlib.util.spec_from_file_location("surgery_reference", ROOT / "tests" / "test_surgery.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_fit


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def bench_surgery(suite, iterations: int) -> list[tuple[str, str, str]]:
    model = build_model(RunConfig(suite.name, "surgery", {"iterations": iterations}, "fast"), suite, device="cpu")[0].train()
    reference = copy.deepcopy(model)
    individual = individual_model(suite, suite.tasks)
    sizes = {t: len(suite.data[t].test_images) for t in suite.tasks}
    schedule = index_schedule(sizes, iterations, 2, 16, torch.Generator().manual_seed(0))
    steps = sum(len(it) for it in schedule)
    cache: dict = {}

    def cached() -> None:
        cache["base"] = {t: feature_cache.encoded(model.base, suite, t) for t in suite.tasks}
        cache["targets"] = {t: feature_cache.encoded(individual, suite, t) for t in suite.tasks}

    t_cache = timed(cached)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    t_fit = timed(lambda: fit_cached(model.final, cache["base"], cache["targets"], schedule, optimizer))
    t_ref = timed(lambda: reference_fit()(reference, individual, suite, schedule, 1e-3))
    diff = max(float((a - b).detach().abs().max()) for a, b in zip(model.final.parameters(), reference.final.parameters(), strict=True))
    images = sum(sizes.values())
    return [
        ("Surgery V1, re-running both encoders every step", f"{t_ref:.2f} s", f"{steps} steps, {steps / t_ref:.0f} steps/s"),
        ("Surgery V1, cached features (cache + train)", f"{t_cache + t_fit:.2f} s", f"cache {t_cache:.2f} s ({images} images x 2 models) + train {t_fit:.2f} s ({steps / t_fit:.0f} steps/s)"),
        ("re-running / cached wall time", f"{t_ref / (t_cache + t_fit):.1f}x", f"train loop alone: {t_ref / t_fit:.1f}x"),
        ("max abs difference of trained weights", f"{diff:.1e}", f"{sum(p.numel() for p in model.final.parameters())} weights"),
    ]


def bench_v2(suite, iterations: int) -> tuple[str, str, str]:
    method = get_method("surgery")
    model, _, params, _ = build_model(RunConfig(suite.name, "surgery", {"version": 2, "iterations": iterations}, "fast"), suite, device="cpu")
    model.train()
    t = timed(lambda: method.adapt(model, suite, params, RunContext()))
    steps = iterations * 2 * len(suite.tasks)
    return ("SurgeryV2 (re-runs the base encoder; targets cached)", f"{t:.2f} s", f"{steps} steps, {steps / t:.0f} steps/s incl. caching")


def bench_adamerging(suite, steps: int) -> list[tuple[str, str, str]]:
    method = get_method("adamerging")
    rows = []
    for granularity, vectors in [("layer", "task_arithmetic"), ("task", "task_arithmetic"), ("layer", "ties")]:
        params = make_params(method, {"steps": steps, "granularity": granularity, "vectors": vectors}, "paper")
        model = method.build(suite, params).train()
        t = timed(lambda: method.adapt(model, suite, params, RunContext()))
        per = len(suite.tasks) * params.batches_per_task * params.batch_size
        rows.append((f"AdaMerging {granularity}-wise on {vectors}", f"{steps / t:.1f} steps/s", f"{steps} steps in {t:.2f} s, {per} images/step"))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--suite", default="micro")
    ap.add_argument("--iterations", type=int, default=20, help="Surgery iterations (each: 2 steps per task)")
    ap.add_argument("--ada-steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 avoids oversubscription on a shared machine)")
    ap.add_argument("--cache-dir", default="cache")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    suite = get_suite(args.suite, cache_dir=args.cache_dir)
    rows = bench_surgery(suite, args.iterations) + [bench_v2(suite, args.iterations)] + bench_adamerging(suite, args.ada_steps)
    print(f"suite {suite.name} ({len(suite.tasks)} tasks), CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("| measurement | value | detail |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
