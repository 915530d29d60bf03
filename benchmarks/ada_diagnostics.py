"""Why entropy minimisation does not beat task arithmetic on mini8: two diagnostics.

    .venv/bin/python benchmarks/ada_diagnostics.py [--suite mini8] [--steps 300] [--lr 1e-2]

1. Headroom: the layer-wise coefficients of AdaMerging trained *with labels*, by cross-entropy on the training
   images (never the test images). This oracle bounds what the parametrisation can reach; AdaMerging itself
   never sees labels.
2. Signal: on the merged model at init (task arithmetic, lambda = 0.3), the mean prediction entropy of the
   correct and of the wrong test predictions, and how many of the most confident quarter are wrong.
   Entropy minimisation helps when confident means correct.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from merging.evaluation import evaluate  # noqa: E402
from merging.methods import get_method, make_params  # noqa: E402
from merging.suites import get_suite  # noqa: E402


def supervised_coefficients(suite, steps: int, lr: float, batch_size: int = 16, seed: int = 0) -> tuple[dict, float]:
    """Layer-wise AdaMerging's coefficients fitted by cross-entropy on labelled training images."""
    method = get_method("adamerging")
    model = method.build(suite, make_params(method, {}, "fast"))
    optimizer = torch.optim.Adam([model.encoder.coefficients], lr=lr)
    generator = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    for _ in range(steps):
        images, labels = [], []
        for t in suite.tasks:
            data = suite.data[t]
            idx = torch.randint(len(data.train_images), (batch_size,), generator=generator)
            images.append(data.preprocess(data.train_images[idx]))
            labels.append(data.train_labels[idx])
        features = model.encoder(torch.cat(images)).split(batch_size)
        loss = sum(F.cross_entropy(model.heads[t](f), y) for t, f, y in zip(suite.tasks, features, labels, strict=True))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    seconds = time.perf_counter() - t0
    return evaluate(model, suite, device="cpu"), seconds


@torch.no_grad()
def entropy_signal(suite) -> list[tuple]:
    method = get_method("adamerging")
    model = method.build(suite, make_params(method, {}, "fast")).eval()
    rows = []
    for t in suite.tasks:
        data = suite.data[t]
        logits = model.heads[t](model.encoder(data.preprocess(data.test_images)))
        logp = logits.log_softmax(-1)
        entropy = -(logp.exp() * logp).sum(-1)
        correct = logits.argmax(-1) == data.test_labels
        confident = entropy <= entropy.quantile(0.25)
        rows.append((t, data.num_classes, 100 * correct.float().mean().item(), entropy[correct].mean().item(),
                     entropy[~correct].mean().item(), 100 * (~correct[confident]).float().mean().item()))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", default="mini8")
    ap.add_argument("--cache-dir", default="cache")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--lr", type=float, default=1e-2)
    args = ap.parse_args()
    torch.manual_seed(0)
    suite = get_suite(args.suite, cache_dir=args.cache_dir)
    scores, seconds = supervised_coefficients(suite, args.steps, args.lr)
    accuracy = {t: scores[t]["accuracy"] for t in suite.tasks}
    print(f"supervised layer-wise coefficients (labels of training images, {args.steps} steps, lr {args.lr}, {seconds:.0f} s)\n")
    print("| " + " | ".join(accuracy) + " | avg |")
    print("|" + "---|" * (len(accuracy) + 1))
    print("| " + " | ".join(f"{a:.1f}" for a in accuracy.values()) + f" | {sum(accuracy.values()) / len(accuracy):.1f} |\n")
    print("| task (task arithmetic 0.3) | classes | accuracy | entropy, correct | entropy, wrong | wrong among the most confident 25 % |")
    print("|---|---|---|---|---|---|")
    for t, k, acc, h_ok, h_bad, wrong in entropy_signal(suite):
        print(f"| {t} | {k} | {acc:.1f} | {h_ok:.3f} | {h_bad:.3f} | {wrong:.1f} % |")


if __name__ == "__main__":
    main()
