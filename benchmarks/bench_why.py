"""What the "Why merges fail" views cost (issue 19's speed figures), and the page's screenshots.

- geometry of mini8 (uncached ``compute_geometry``, default merges TA / TSV-M / Iso-C) and of a ViT-B/32-sized suite (an
  open_clip ``ViT-B-32`` image tower with random weights, 8 random task vectors as in ``bench_svd_merges.py``);
- the λ plane of mnist x digits on mini8 (11 x 11, 200 test images per task), cold in an empty cache, then the revisit;
- the trajectory's cost: each data-dependent method's adaptation (fast preset) with the trajectory recorded (objective,
  parts, coefficients; the analysis option off) and without it (``optimize`` called without a trajectory), alternated;
- the 28 pairwise task-arithmetic merges and metrics of view 5, cold in an empty cache, then the revisit.

    .venv/bin/python benchmarks/bench_why.py [--skip-vit] [--skip-tsv-m] [--only geometry,plane,trajectory,pairs]
    .venv/bin/python benchmarks/bench_why.py --screenshots docs/screenshots   # the page on mini8 in Chromium
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from merging.threads import wait_passively  # noqa: E402

wait_passively()

import torch  # noqa: E402

from merging.suites import get_suite  # noqa: E402


def load() -> str:
    return " / ".join(f"{x:.2f}" for x in os.getloadavg())


def timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return time.perf_counter() - t0, out


def bench_geometry(suite, skip_vit: bool, skip_tsv_m: bool = False) -> None:
    from merging.geometry import compute_geometry, merged_updates

    s, _ = timed(lambda: compute_geometry(suite))
    print(f"| geometry of mini8, uncached (TA, TSV-M, Iso-C spectra) | {s:.2f} s | ≤ 5 s | load {load()} |", flush=True)
    if skip_vit:
        return
    from bench_svd_merges import vit_b32_states

    from merging.suites.base import Suite, TaskData

    pretrained, finetuned = vit_b32_states(8)
    images = torch.zeros(2, 224, 224, 3, dtype=torch.uint8)
    big = Suite("vit-b-32-random", {"kind": "open_clip", "name": "ViT-B-32"}, pretrained, finetuned,
                {t: {"weight": torch.randn(2, 512)} for t in finetuned}, {t: TaskData(t, ["a", "b"], images, torch.tensor([0, 1])) for t in finetuned})
    s, _ = timed(lambda: compute_geometry(big, merges=("task_arithmetic", "iso_c")))
    print(f"| geometry of a ViT-B/32-sized suite (8 tasks, 87.8M params), TA + Iso-C spectra | {s:.1f} s | ≤ 120 s | load {load()} |", flush=True)
    if skip_tsv_m:
        return
    s, _ = timed(lambda: merged_updates(big, ["tsv_m"]))
    print(f"| ... adding TSV-M's spectra: its merge alone | {s:.1f} s | | load {load()} |", flush=True)


def bench_plane(suite) -> None:
    from merging.lambda_plane import lambda_plane

    with tempfile.TemporaryDirectory() as tmp:
        cold, _ = timed(lambda: lambda_plane(suite, "mnist", "digits", cache_dir=tmp, device="cpu"))
        warm, _ = timed(lambda: lambda_plane(suite, "mnist", "digits", cache_dir=tmp, device="cpu"))
    print(f"| λ plane mnist x digits, 11 x 11, 200 images/task: first | {cold:.1f} s | ≤ 60 s | load {load()} |", flush=True)
    print(f"| λ plane: revisit (cached) | {warm:.3f} s | ≤ 2 s | |", flush=True)


def adapt_seconds(suite, name: str, record: bool) -> float:
    import importlib

    from merging import adaptation
    from merging.methods import RunContext, get_method, make_params
    from merging.runs import RunConfig, build_model

    method = get_method(name)
    params = make_params(method, {}, "fast")
    model = build_model(RunConfig("mini8", name, preset="fast"), suite, str(ROOT / "cache"), "cpu")[0]
    module = importlib.import_module(type(method).__module__)
    original = module.optimize
    if not record:
        module.optimize = lambda *a, trajectory=None, **k: adaptation.optimize(*a, **k)
    try:
        model.train()
        t0 = time.perf_counter()
        method.adapt(model, suite, params, RunContext(device="cpu", seed=0))
        return time.perf_counter() - t0
    finally:
        module.optimize = original


def bench_trajectory(suite, methods: list[str]) -> None:
    for name in methods:
        times = {True: [], False: []}
        for record in (False, True) * (1 if name == "wemoe" else 2):  # WEMoE: one pair (about a minute each)
            times[record].append(adapt_seconds(suite, name, record))
        on, off = min(times[True]), min(times[False])
        print(f"| trajectory overhead, {name} (fast): adapt {off:.2f} s without, {on:.2f} s with | {100 * (on / off - 1):+.1f} % | ≤ 5 % | "
              f"load {load()} |", flush=True)


def bench_pairs(suite) -> None:
    from merging.pair_metrics import correlations, pair_table

    with tempfile.TemporaryDirectory() as tmp:
        cold, table = timed(lambda: pair_table(suite, cache_dir=tmp, device="cpu"))
        warm, _ = timed(lambda: pair_table(suite, cache_dir=tmp, device="cpu"))
    print(f"| 28 pairwise TA merges + metrics of mini8: first | {cold:.1f} s | ≤ 180 s | load {load()} |", flush=True)
    print(f"| pairs: revisit (cached) | {warm:.3f} s | | |", flush=True)
    print(correlations(table).round(3).to_string(index=False))


def screenshots(out: Path) -> None:
    """The page on mini8 (the repository's cache) in Chromium, one PNG per tab."""
    from playwright.sync_api import sync_playwright

    from app_server import CHROMIUM, CHROMIUM_ARGS, serve

    out.mkdir(parents=True, exist_ok=True)
    query = 'why-traj-method="adamerging"&why-traj-analysis=true&why-plane-i="mnist"&why-plane-j="digits"&why-layer-task="mnist"'
    with serve({"MERGELENS_CACHE": str(ROOT / "cache"), "MERGELENS_DEFAULT_SUITE": "mini8"}, log=Path(tempfile.gettempdir()) / "why-shots.log") as url, \
            sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1500, "height": 2600})
        page.goto(f"{url}/why_merges_fail?{query}")
        for tab, file, charts in (("Trajectories", "why_trajectories", 2), ("Geometry", "why_geometry", 6), ("λ plane", "why_lambda_plane", 3),
                                  ("Layer by layer", "why_layers", 3), ("Metric vs merge", "why_metric_vs_merge", 1)):
            page.get_by_role("tab", name=tab).click()
            panel = page.get_by_role("tabpanel", name=tab)
            panel.locator(".js-plotly-plot").nth(charts - 1).wait_for(timeout=600_000)
            page.wait_for_timeout(1500)
            page.screenshot(path=str(out / f"{file}.png"), full_page=True)
            print(f"screenshot: {out / f'{file}.png'}", flush=True)
        browser.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--skip-tsv-m", action="store_true", help="do not time TSV-M's merge on the ViT-B/32-sized suite (about 2 min)")
    parser.add_argument("--only", default="geometry,plane,trajectory,pairs")
    parser.add_argument("--methods", default="adamerging,tinting,surgery,wemoe", help="methods of the trajectory-overhead measurement")
    parser.add_argument("--screenshots", type=Path, default=None, help="only take the page's screenshots into this folder")
    args = parser.parse_args()
    if args.screenshots is not None:
        screenshots(args.screenshots)
        return
    torch.set_num_threads(2)
    only = set(args.only.split(","))
    print(f"load before: {load()}; {os.cpu_count()} CPUs")
    print("| what | measured | target | load (1/5/15 min) |\n|---|---:|---:|---|")
    suite = get_suite("mini8", cache_dir=ROOT / "cache")
    if "geometry" in only:
        bench_geometry(suite, args.skip_vit, args.skip_tsv_m)
    if "plane" in only:
        bench_plane(suite)
    if "trajectory" in only:
        bench_trajectory(suite, args.methods.split(","))
    if "pairs" in only:
        bench_pairs(suite)
    print(f"load after: {load()}")


if __name__ == "__main__":
    main()
