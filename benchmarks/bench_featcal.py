"""FeatCal vs Surgery on the same base, and the storage lane's build time and size (issue #18).

  .venv/bin/python benchmarks/bench_featcal.py [--suite mini8] [--skip-vit-b32]

Part 1: on the suite, FeatCal (256 unlabeled train images per task, the released defaults) and Surgery (fast and
paper presets) on task arithmetic λ = 0.3, each computed from scratch (``force``) in its own fresh process, one
after the other: adaptation seconds, average accuracy and the process's peak RSS (and its RSS before the run, so
the increment is visible). FeatCal's paper: 53 s vs Surgery's 217 s on a GPU (≈4× faster), CPU RSS 22.8 vs 69.3 GiB.

Part 2: TALL masks and EMR's build time and stored MB on the suite and on a generated ViT-B/32-sized suite
(open_clip ViT-B-32 image tower with random weights, 8 task vectors of 2 % of each tensor's norm, rank 8 plus
noise): what a user's real 8-task checkpoint costs to turn into a storage-lane model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

CHILD = """
import json, resource, sys, time
sys.path.insert(0, {root!r})
from merging.runs import RunConfig, run
from merging.suites import get_suite
suite = get_suite({suite!r}, cache_dir={cache!r})
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t0 = time.perf_counter()
result = run(RunConfig({suite!r}, {method!r}, {params!r}, {preset!r}), suite, cache_dir={cache!r}, device="cpu", force=True)
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({{"adapt_s": result["seconds"]["adapt"], "wall_s": wall, "average": result["average"], "rss_before_mb": before / 1024,
                  "peak_rss_mb": peak / 1024, "data": result["data"], "extra_mb": result["storage"]["extra_mb"]}}))
"""


def fresh_run(suite: str, method: str, params: dict, preset: str | None, cache: str) -> dict:
    code = CHILD.format(root=str(ROOT), suite=suite, method=method, params=params, preset=preset, cache=cache)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    return json.loads(out.stdout.strip().splitlines()[-1])


def featcal_vs_surgery(suite: str, cache: str) -> list[dict]:
    rows = []
    for label, method, params, preset in [("FeatCal (256 train images/task)", "featcal", {}, None),
                                          ("Surgery, fast preset (250 iterations)", "surgery", {}, "fast"),
                                          ("Surgery, paper preset (500 iterations)", "surgery", {}, "paper")]:
        r = fresh_run(suite, method, params, preset, cache)
        rows.append({"method": label, **r})
        print(f"{label}: adapt {r['adapt_s']:.1f} s, accuracy {r['average']:.1f}, peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(before the run {r['rss_before_mb']:.0f} MB)", flush=True)
    return rows


def vit_b32_suite(tasks: int = 8, seed: int = 0):
    """An 8-task suite of ViT-B/32 image-tower size with random weights and structured task vectors (nothing downloaded)."""
    import torch

    from merging.model import create_open_clip
    from merging.suites.base import Suite, TaskData

    torch.manual_seed(seed)
    config = {"kind": "open_clip", "name": "ViT-B-32"}
    pretrained = {k: v.detach().clone() for k, v in create_open_clip("ViT-B-32").visual.state_dict().items()}
    finetuned, heads, data = {}, {}, {}
    for t in range(tasks):
        state = {}
        for k, v in pretrained.items():
            if v.dim() == 2:
                update = torch.randn(v.shape[0], 8) @ torch.randn(8, v.shape[1]) + 0.3 * torch.randn_like(v)
            else:
                update = torch.randn_like(v)
            state[k] = v + update * (0.02 * v.norm() / update.norm().clamp_min(1e-12))
        finetuned[f"task{t}"] = state
        heads[f"task{t}"] = {"weight": torch.randn(10, 512), "bias": torch.zeros(10)}
        images = torch.zeros(1, 224, 224, 3, dtype=torch.uint8)
        data[f"task{t}"] = TaskData(f"task{t}", [str(i) for i in range(10)], images, torch.zeros(1, dtype=torch.long))
    return Suite("vit-b32-random", config, pretrained, finetuned, heads, data, {})


def storage_lane(suite) -> list[dict]:
    import resource

    from merging.runs import RunConfig, build_model
    from merging.storage import storage_report

    rows = []
    params = sum(v.numel() for v in suite.pretrained.values())
    for method in ("tall_masks", "emr"):
        t0 = time.perf_counter()
        model = build_model(RunConfig(suite.name, method), suite, device="cpu")[0]
        seconds = time.perf_counter() - t0
        report = storage_report(model, suite.pretrained, suite.heads)
        rows.append({"suite": suite.name, "method": method, "build_s": seconds, "total_mb": report["total_mb"], "extra_mb": report["extra_mb"],
                     "encoder_params": params, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})
        print(f"{suite.name} {method}: build {seconds:.1f} s, stored {report['total_mb']:.1f} MB ({report['extra_mb']:.1f} MB beyond one merged model)",
              flush=True)
        del model
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", default="mini8")
    parser.add_argument("--cache-dir", default=str(ROOT / "cache"))
    parser.add_argument("--skip-vit-b32", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "featcal_vs_surgery.json"))
    args = parser.parse_args()
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; load {os.getloadavg()[0]:.2f}", flush=True)
    report = {"load_before": os.getloadavg()[0], "featcal_vs_surgery": featcal_vs_surgery(args.suite, args.cache_dir)}
    from merging.suites import get_suite

    report["storage_lane"] = storage_lane(get_suite(args.suite, cache_dir=args.cache_dir))
    if not args.skip_vit_b32:
        report["storage_lane"] += storage_lane(vit_b32_suite())
    report["load_after"] = os.getloadavg()[0]
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
