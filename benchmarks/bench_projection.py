"""Projection and feature-extraction timings; prints markdown tables.

Projections run on synthetic clustered 128-d features (a Gaussian mixture of 10 classes): the micro
suite has only 3 x 96 test images, too few for N = 1k-20k. Every method gets the same PCA-to-50 step
(``merging.projection.reduce_pca``, timed separately) and runs single-threaded, as the app runs them:
PCA (sklearn), t-SNE (openTSNE, and sklearn's ``TSNE``, the baseline users would otherwise pick) and UMAP
(umap-learn). "first" is the first call in this process (imports and numba compilation included for the
first N), "warm" a second identical call. UMAP's process start-up is also timed in fresh processes with
an empty and with a filled numba cache. Feature extraction is timed on the micro suite against a raw
forward pass of the same encoder on the same images.

    .venv/bin/python benchmarks/bench_projection.py --sizes 1000,5000,20000
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / "cache" / "numba"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from merging.projection import PCA_DIMS, embed, reduce_pca  # noqa: E402

COLD_START = (
    "import time; t = time.perf_counter(); from merging.projection import warm_up; "
    "warm_up(n=1000); print(time.perf_counter() - t)"
)


def clustered(n: int, d: int = 128, classes: int = 10, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = 6.0 * rng.normal(size=(classes, d))
    labels = rng.integers(0, classes, size=n)
    scales = rng.uniform(0.5, 2.0, size=classes)[labels, None]
    return (centres[labels] + scales * rng.normal(size=(n, d))).astype(np.float32)


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def sklearn_tsne(x: np.ndarray) -> np.ndarray:
    from sklearn.manifold import TSNE

    return TSNE(n_components=2, perplexity=30.0, init="pca", random_state=0).fit_transform(reduce_pca(x, PCA_DIMS, 0))


def bench_projections(sizes: list[int], methods: list[str], sklearn_max: int) -> list[str]:
    rows = ["| N | method | first (s) | warm (s) |", "|---:|---|---:|---:|"]
    runners = [  # (method group, row name, function)
        ("pca", "pca-50 pre-step", lambda x: reduce_pca(x, PCA_DIMS, 0)),
        ("pca", "pca", lambda x: embed(x, "pca")),
        ("tsne", "tsne (openTSNE)", lambda x: embed(x, "tsne")),
        ("umap", "umap (umap-learn)", lambda x: embed(x, "umap")),
        ("tsne", "tsne (sklearn)", sklearn_tsne),
    ]
    for n in sizes:
        x = clustered(n)
        for group, name, fn in runners:
            if group not in methods:
                continue
            if name == "tsne (sklearn)" and n > sklearn_max:
                rows.append(f"| {n} | {name} | skipped (> --sklearn-max) | |")
                continue
            first, warm = timed(lambda fn=fn: fn(x)), timed(lambda fn=fn: fn(x))
            rows.append(f"| {n} | {name} | {first:.2f} | {warm:.2f} |")
            print(rows[-1], flush=True)
    return rows


def bench_umap_start() -> list[str]:
    """Fresh processes: import + a 1k-point UMAP, with an empty numba cache, then with the one it filled."""
    rows = ["| UMAP in a fresh process (import + 1k-point fit) | seconds |", "|---|---:|"]
    with tempfile.TemporaryDirectory() as numba_dir:
        env = {**os.environ, "NUMBA_CACHE_DIR": numba_dir, "PYTHONPATH": str(ROOT)}
        for label in ("empty numba cache", "numba cache filled by the run above"):
            out = subprocess.run([sys.executable, "-c", COLD_START], env=env, cwd=ROOT, capture_output=True, text=True, check=True)
            rows.append(f"| {label} | {float(out.stdout.split()[-1]):.2f} |")
            print(rows[-1], flush=True)
    return rows


def bench_features(device: str, images_per_task: int, cache_dir: str) -> list[str]:
    """Images/s of ``extract`` vs ``encoder(images)`` on the micro suite (test images tiled to the count)."""
    from merging.representations import cached_features, extract
    from merging.runs import RunConfig, build_model
    from merging.suites import get_suite

    suite = get_suite("micro", cache_dir=cache_dir)
    rows = [f"| model | path | images | images/s ({device}) |", "|---|---|---:|---:|"]
    for method in ("task_arithmetic", "individual"):
        model = build_model(RunConfig("micro", method), suite, device=device)[0].eval().to(device)
        total = {"raw forward": 0.0, "extract (encode+head)": 0.0, "extract + blocks": 0.0, "cached read": 0.0}
        count = 0
        with tempfile.TemporaryDirectory() as tmp:
            for task in suite.tasks:
                data = suite.data[task]
                idx = torch.arange(images_per_task) % len(data.test_labels)
                states = getattr(model, "states", None)
                encoder = model.encoder

                @torch.no_grad()
                def raw(data=data, idx=idx, task=task, states=states, encoder=encoder):
                    for images, _ in data.batches("test", 256, idx):
                        x = images.to(device)
                        out = torch.func.functional_call(encoder, states[task], (x,)) if states else encoder(x)
                    if device.startswith("cuda"):
                        torch.cuda.synchronize()
                    return out

                raw()  # warm-up
                total["raw forward"] += timed(raw)
                total["extract (encode+head)"] += timed(lambda data=data, task=task, idx=idx: extract(model, data, task, idx, device=device))
                total["extract + blocks"] += timed(lambda data=data, task=task, idx=idx: extract(model, data, task, idx, layers=True, device=device))
                cached_features(model, "bench", suite, task, idx, layers=True, cache_dir=tmp, device=device)
                total["cached read"] += timed(lambda task=task, idx=idx: cached_features(model, "bench", suite, task, idx, layers=True, cache_dir=tmp, device=device))
                count += len(idx)
        for path, secs in total.items():
            rows.append(f"| {method} | {path} | {count} | {count / secs:,.0f} |")
            print(rows[-1], flush=True)
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", default="1000,5000,20000")
    p.add_argument("--methods", default="pca,tsne,umap", help="subset of pca,tsne,umap (sklearn's TSNE runs with tsne)")
    p.add_argument("--sklearn-max", type=int, default=20000, help="skip sklearn's TSNE above this N")
    p.add_argument("--images-per-task", type=int, default=2048)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--cache-dir", default=str(ROOT / "cache"))
    p.add_argument("--skip-features", action="store_true")
    p.add_argument("--skip-cold-start", action="store_true")
    args = p.parse_args()
    if args.device == "cpu":
        torch.set_num_threads(min(2, os.cpu_count() or 1))
    sizes = [int(s) for s in args.sizes.split(",")]
    methods = [m.strip() for m in args.methods.split(",")]
    print(f"# bench_projection: torch {torch.__version__}, {os.cpu_count()} CPUs, device {args.device}\n", flush=True)
    tables = [bench_projections(sizes, methods, args.sklearn_max)]
    if "umap" in methods and not args.skip_cold_start:
        tables.append(bench_umap_start())
    if not args.skip_features:
        tables.append(bench_features(args.device, args.images_per_task, args.cache_dir))
    print("\n" + "\n\n".join("\n".join(t) for t in tables))


if __name__ == "__main__":
    main()
