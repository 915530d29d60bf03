"""What the SVD-family merges cost (TSV-M, Iso-C, Iso-CTS, CART; ``merging/svd.py``), each next to task arithmetic
measured in the same run on the same inputs.

Two input sets, both held in memory before any timing:

- ``mini8``: the built-in suite's ``pretrained`` and ``finetuned`` state dicts (8 tasks; a width-128 ViT);
- ``ViT-B/32``: an open_clip ``ViT-B-32`` image tower with random weights as θ₀ (nothing is downloaded) and 8
  random task vectors, generated tensor by tensor: every 2-D tensor gets a rank-16 part plus dense noise (80 % / 20 %
  of the squared norm), every other tensor dense noise, each scaled to 2 % of that tensor's norm in θ₀ (a tensor that
  is zero in θ₀, such as the zero-initialised biases, gets 2 % of the tower's root-mean-square entry per entry).

Times are wall-clock seconds of ``merge_state_dicts`` with each method's default hyperparameters (the best of
``--repeat`` runs on mini8; one run per method on ViT-B/32 unless ``--repeat-vit`` says more). The table prints in
markdown, with the load average before and after.

    .venv/bin/python benchmarks/bench_svd_merges.py [--repeat 3] [--repeat-vit 1] [--skip-vit] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging.threads import wait_passively  # noqa: E402

wait_passively()  # before torch loads libgomp: idle OpenMP threads sleep, not spin, beside other processes (merging/threads.py)

import torch  # noqa: E402

from merging.methods import get_method, make_params  # noqa: E402

SVD_METHODS = ("tsv_m", "iso_c", "iso_cts", "cart")
State = dict[str, torch.Tensor]


def merge_seconds(method: str, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, State], repeat: int) -> float:
    """The best of ``repeat`` wall-clock seconds of one default-parameter merge."""
    m = get_method(method)
    params = make_params(m)
    best = math.inf
    for _ in range(repeat):
        t0 = time.perf_counter()
        m.merge_state_dicts(pretrained, finetuned, params)
        best = min(best, time.perf_counter() - t0)
    return best


def compare(name: str, pretrained: Mapping[str, torch.Tensor], finetuned: Mapping[str, State], repeat: int) -> list[dict]:
    ta = merge_seconds("task_arithmetic", pretrained, finetuned, max(repeat, 3))
    rows = []
    for method in SVD_METHODS:
        s = merge_seconds(method, pretrained, finetuned, repeat)
        rows.append({"inputs": name, "method": method, "seconds": s, "task_arithmetic_seconds": ta, "ratio": s / ta})
        print(f"  {name} {method}: {s:.3f} s ({s / ta:.1f}x task arithmetic's {ta:.3f} s)", flush=True)
    return rows


def mini8_states(cache_dir: Path) -> tuple[State, dict[str, State]]:
    from merging.suites import get_suite

    suite = get_suite("mini8", cache_dir=cache_dir)
    return suite.pretrained, suite.finetuned


def random_task_vector(base: Mapping[str, torch.Tensor], generator: torch.Generator, rank: int = 16, relative: float = 0.02,
                       noise_share: float = 0.2) -> State:
    """One task vector, tensor by tensor: low rank plus noise on matrices, noise elsewhere, at ``relative`` of θ₀'s norm."""
    floats = [v for v in base.values() if v.is_floating_point()]
    rms = math.sqrt(sum(float(v.double().square().sum()) for v in floats) / sum(v.numel() for v in floats))
    out: State = {}
    for k, v in base.items():
        if not v.is_floating_point():
            continue
        target = relative * (float(v.norm()) or rms * math.sqrt(v.numel()))
        noise = torch.randn(v.shape, generator=generator)
        if v.dim() == 2:
            low = torch.randn(v.shape[0], rank, generator=generator) @ torch.randn(rank, v.shape[1], generator=generator)
            tau = low * (target * math.sqrt(1 - noise_share) / float(low.norm())) + noise * (target * math.sqrt(noise_share) / float(noise.norm()))
        else:
            tau = noise * (target / float(noise.norm()))
        out[k] = tau
    return out


def vit_b32_states(n_tasks: int = 8, seed: int = 0) -> tuple[State, dict[str, State]]:
    from merging.model import create_open_clip

    model = create_open_clip("ViT-B-32", quick_gelu=True)
    pretrained = {k: v.detach().clone() for k, v in model.visual.state_dict().items()}
    del model
    finetuned = {}
    for i in range(n_tasks):
        g = torch.Generator().manual_seed(seed + i)
        tau = random_task_vector(pretrained, g)
        finetuned[f"task{i}"] = {k: v + tau[k] if k in tau else v.clone() for k, v in pretrained.items()}
    return pretrained, finetuned


def table(rows: list[dict]) -> str:
    lines = ["| inputs | method | merge (s) | task arithmetic (s) | ratio |", "|---|---|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['inputs']} | `{r['method']}` | {r['seconds']:.3f} | {r['task_arithmetic_seconds']:.3f} | {r['ratio']:.1f}x |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    parser.add_argument("--repeat", type=int, default=3, help="runs per method on mini8 (the best counts)")
    parser.add_argument("--repeat-vit", type=int, default=1, help="runs per method on ViT-B/32 (the best counts)")
    parser.add_argument("--skip-vit", action="store_true")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    info = {"load_average_start": os.getloadavg(), "threads": torch.get_num_threads(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "machine": platform.processor() or platform.machine()}
    rows = []
    pretrained, finetuned = mini8_states(args.cache_dir)
    n = sum(v.numel() for v in pretrained.values())
    rows += compare(f"mini8 ({len(finetuned)} tasks, {n / 1e6:.2f}M params)", pretrained, finetuned, args.repeat)
    if not args.skip_vit:
        t0 = time.perf_counter()
        pretrained, finetuned = vit_b32_states()
        n = sum(v.numel() for v in pretrained.values())
        print(f"  ViT-B/32 inputs generated in {time.perf_counter() - t0:.1f} s", flush=True)
        rows += compare(f"ViT-B/32 ({len(finetuned)} tasks, {n / 1e6:.1f}M params)", pretrained, finetuned, args.repeat_vit)
    info["load_average_end"] = os.getloadavg()
    print()
    print(table(rows))
    print(f"\nload average (1, 5, 15 min) at start {tuple(round(x, 2) for x in info['load_average_start'])}, "
          f"at end {tuple(round(x, 2) for x in info['load_average_end'])}; {info['threads']} torch threads on {info['cpus']} CPUs; torch {info['torch']}")
    if args.json:
        args.json.write_text(json.dumps({**info, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
