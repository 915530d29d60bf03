"""WEMoE inference costs: batched MoE vs the per-sample reference, WEMoE vs a static merge, parameter counts.

    .venv/bin/python benchmarks/bench_wemoe.py --suite micro [--images 192] [--batch-size 64] [--threads 1] [--device cuda]

Prints markdown tables. The per-sample path is the reference of ``tests/test_wemoe.py`` (W(x) built
for each sample, then a functional MLP: the original code's loop); the batched path is what ``wemoe``
runs. Routers are randomised so that samples really route differently.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging import task_vectors as tv  # noqa: E402
from merging.methods import get_method, make_params  # noqa: E402
from merging.model import StaticModel  # noqa: E402
from merging.runs import count_parameters  # noqa: E402
from merging.suites import get_suite  # noqa: E402


def reference_mlp():
    spec = importlib.util.spec_from_file_location("wemoe_reference", ROOT / "tests" / "test_wemoe.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.reference_mlp


@torch.no_grad()
def throughput(model, images: torch.Tensor, task: str, batch_size: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Best-of-``repeats`` images per second, and the logits (CUDA work is synchronised before each clock read)."""
    model.logits(images[:batch_size], task)
    best = float("inf")
    for _ in range(repeats):
        sync(images.device)
        t0 = time.perf_counter()
        out = torch.cat([model.logits(images[i : i + batch_size], task) for i in range(0, len(images), batch_size)])
        sync(images.device)
        best = min(best, time.perf_counter() - t0)
    return len(images) / best, out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def hardware(device: str) -> str:
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def nonzero(model) -> int:
    return sum(int((t != 0).sum()) for t in [*model.parameters(), *model.buffers()])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="micro")
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--images", type=int, default=192)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu", help="cpu or cuda")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    suite = get_suite(args.suite, cache_dir=args.cache_dir)
    task = suite.tasks[0]
    per_task = -(-args.images // len(suite.tasks))
    images = torch.cat([suite.data[t].preprocess(suite.data[t].test_images[:per_task]) for t in suite.tasks])[: args.images].to(args.device)

    wemoe = get_method("wemoe")
    model = wemoe.build(suite, make_params(wemoe, {}, "paper")).to(args.device).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.normal_(0.0, 0.5)
    static = StaticModel(suite.build_encoder(), tv.task_arithmetic(suite.pretrained, list(suite.finetuned.values()), 0.3), suite.tasks, suite.make_heads()).to(args.device).eval()

    batched_ips, batched = throughput(model, images, task, args.batch_size, args.repeats)
    static_ips, _ = throughput(static, images, task, args.batch_size, args.repeats)
    reference = reference_mlp()
    for layer in model.moe_layers():
        layer.forward = lambda x, layer=layer: reference(layer, x)
    sample_ips, per_sample = throughput(model, images, task, args.batch_size, args.repeats)

    print(f"suite {args.suite} ({len(suite.tasks)} tasks), {len(images)} images, batch {args.batch_size}, "
          f"{args.threads} thread(s), torch {torch.__version__}, {hardware(args.device)}\n")
    print("| model | img/s | vs static merge |")
    print("|---|---|---|")
    for name, ips in [("static merge (task arithmetic 0.3)", static_ips), ("WEMoE, batched (ours)", batched_ips), ("WEMoE, per-sample W(x) (reference)", sample_ips)]:
        print(f"| {name} | {ips:,.0f} | {ips / static_ips:.3f}x |")
    print(f"\nbatched / per-sample throughput: {batched_ips / sample_ips:.1f}x; max |logit difference|: {(batched - per_sample).abs().max().item():.2e}\n")

    rows = [("task_arithmetic", {}), ("wemoe", {}), ("wemoe", {"prune": 0.9, "shared_router": True}), ("wemoe", {"router_depth": 1}), ("tinting", {}), ("tinting", {"layer": "ln_post"})]
    print("| method | params | trainable | total | total nonzero |")
    print("|---|---|---|---|---|")
    for name, overrides in rows:
        method = get_method(name)
        built = method.build(suite, make_params(method, overrides, "paper" if method.presets else None))
        counts = count_parameters(built)
        label = ", ".join(f"{k}={v}" for k, v in overrides.items()) or "defaults"
        print(f"| {name} | {label} | {counts['trainable']:,} | {counts['total']:,} | {nonzero(built):,} |")


if __name__ == "__main__":
    main()
