"""Why WEMoE's test-time routing does not beat task arithmetic on mini8: headroom, signal, and what training finds.

    .venv/bin/python benchmarks/wemoe_diagnostics.py [--suite mini8] [--steps 25 100] [--lr 1e-3]

1. Headroom: WEMoE's architecture with *fixed* routing weights, chosen per evaluated task (an oracle: it knows
   each image's task). "own c" puts c on the image's own MLP task vector and 0 on the others; "all c" is the
   input-independent direction (c on every task vector). Accuracy and the summed mean entropy of the heads.
2. Signal: from task arithmetic at 0.3, adding 1.0 to one expert's routing weight in every block: change in
   accuracy and entropy of each evaluated task, for its own expert and (averaged) for the seven others.
3. What training finds: WEMoE's routers (paper architecture, depth 2) trained for a few step counts; the entropy
   it reaches against the oracles' entropy. If training reaches lower entropy than the oracle at lower accuracy,
   the objective, not the optimiser, is what fails.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging.adaptation import entropy  # noqa: E402
from merging.methods import get_method, make_params  # noqa: E402
from merging.methods.base import RunContext  # noqa: E402
from merging.model import MultiTaskModel  # noqa: E402
from merging.suites import get_suite  # noqa: E402


@torch.no_grad()
def accuracy_and_entropy(model: MultiTaskModel, suite, route=None) -> tuple[list[float], list[float]]:
    """Per task: test accuracy (%) and mean prediction entropy of any multi-task model (``tta_trajectory.py`` passes
    AdaMerging too); ``route(k)``, for a WEMoE with constant routers, fixes every block's routing for task k."""
    accuracy, entropies = [], []
    for k, task in enumerate(suite.tasks):
        if route is not None:
            for layer in model.moe_layers():
                layer.router.constant.copy_(route(k))
        data = suite.data[task]
        logits = model.logits(data.preprocess(data.test_images), task)
        accuracy.append(100 * (logits.argmax(-1) == data.test_labels).float().mean().item())
        entropies.append(entropy(logits).item())
    return accuracy, entropies


def row(name: str, accuracy: list[float], entropy: list[float]) -> str:
    return f"| {name} | " + " | ".join(f"{a:.1f}" for a in accuracy) + f" | **{sum(accuracy) / len(accuracy):.1f}** | {sum(entropy):.2f} |"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="mini8")
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--steps", type=int, nargs="+", default=[25, 100])
    ap.add_argument("--lr", type=float, default=1e-3)
    args = ap.parse_args()
    suite = get_suite(args.suite, cache_dir=args.cache_dir)
    method = get_method("wemoe")
    fixed = method.build(suite, make_params(method, {"router_depth": 0}, "fast")).eval()
    n = len(suite.tasks)

    def routing(rest: float, expert: int | None = None, weight: float = 0.0) -> torch.Tensor:
        """``rest`` on every expert, ``weight`` on ``expert``."""
        r = torch.full((n,), rest)
        if expert is not None:
            r[expert] = weight
        return r

    print("| routing (fixed per evaluated task) | " + " | ".join(suite.tasks) + " | avg | summed entropy |")
    print("|" + "---|" * (n + 3))
    base_acc, base_ent = accuracy_and_entropy(fixed, suite, lambda k: routing(0.3))
    print(row("task arithmetic (all 0.3)", base_acc, base_ent))
    for c in (0.5, 1.0, 1.5):
        print(row(f"all {c}", *accuracy_and_entropy(fixed, suite, lambda k, c=c: routing(c))))
    for c in (1.0, 1.5, 2.0):
        print(row(f"oracle: own {c}, others 0", *accuracy_and_entropy(fixed, suite, lambda k, c=c: routing(0.0, k, c))))

    d_acc, d_ent = torch.zeros(n, n), torch.zeros(n, n)
    for j in range(n):
        acc, ent = accuracy_and_entropy(fixed, suite, lambda k, j=j: routing(0.3, j, 1.3))
        d_acc[:, j] = torch.tensor(acc) - torch.tensor(base_acc)
        d_ent[:, j] = torch.tensor(ent) - torch.tensor(base_ent)
    off = ~torch.eye(n, dtype=torch.bool)
    print("\n| evaluated task | own expert +1: accuracy | entropy | each other expert +1 (mean): accuracy | entropy | all seven others' entropy |")
    print("|---|---|---|---|---|---|")
    for k, task in enumerate(suite.tasks):
        print(f"| {task} | {d_acc[k, k]:+.1f} | {d_ent[k, k]:+.2f} | {d_acc[k][off[k]].mean():+.1f} | {d_ent[k][off[k]].mean():+.3f} | {d_ent[k][off[k]].sum():+.2f} |")

    print(f"\n| WEMoE routers trained (depth 2, lr {args.lr}, batch 16 per task) | " + " | ".join(suite.tasks) + " | avg | summed entropy |")
    print("|" + "---|" * (n + 3))
    for steps in args.steps:
        params = make_params(method, {"steps": steps, "lr": args.lr}, "fast")
        torch.manual_seed(0)  # before the build: it draws the routers' initial weights
        model = method.build(suite, params)
        t0 = time.perf_counter()
        method.adapt(model, suite, params, RunContext(seed=0, device="cpu", progress=None))
        print(row(f"{steps} steps ({time.perf_counter() - t0:.0f} s)", *accuracy_and_entropy(model.eval(), suite)))


if __name__ == "__main__":
    main()
