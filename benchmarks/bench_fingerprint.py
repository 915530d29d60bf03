"""What the suite fingerprint costs: every byte of weights and images hashed (``merging.hashing``).

Three measurements, each next to a reference measured in the same run:

- ``mini8``: ``Suite.fingerprint`` of the built suite (a fresh object each time, so nothing is remembered),
  against loading the suite from the cache;
- a ViT-B/32-sized checkpoint set: an open_clip ``ViT-B-32`` image tower with random weights (nothing is
  downloaded) as the pretrained model plus 8 perturbed copies, 9 x 88M float32 parameters;
  ``state_digest`` of all 9 against the old fingerprint's per-tensor sums and against one ``clone`` (a
  memory copy) of the same tensors;
- 10,000 image files (``bench_suite_check.write_images``: JPEG and PNG, 64-224 px): ``FileDigests``
  with no memo (every file read and hashed), and again with the memo a first pass wrote (only stat
  calls), against a sequential loop that reads every file's bytes.

    .venv/bin/python benchmarks/bench_fingerprint.py [--images 10000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402

from merging.hashing import FileDigests, state_digest  # noqa: E402


def timed(fn, repeat: int = 3) -> tuple[float, object]:
    """The best of ``repeat`` wall-clock seconds, and the last result."""
    best, out = float("inf"), None
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t0)
    return best, out


def mini8(cache_dir: Path) -> dict:
    from merging.suites import get_suite

    get_suite("mini8", cache_dir=cache_dir)  # built once, outside the timing
    load_s, suite = timed(lambda: get_suite("mini8", cache_dir=cache_dir))
    fp_s, _ = timed(lambda: get_suite("mini8", cache_dir=cache_dir).fingerprint)
    nbytes = sum(v.numel() * v.element_size() for g in [suite.pretrained, *suite.finetuned.values()] for v in g.values())
    nbytes += sum(d.test_images.numel() + (d.train_images.numel() if d.train_images is not None else 0) for d in suite.data.values())
    return {"load_s": load_s, "load_and_fingerprint_s": fp_s, "fingerprint_s": fp_s - load_s, "MB": nbytes / 1e6}


def vit_b32(n_tasks: int = 8) -> dict:
    from merging.model import create_open_clip

    model = create_open_clip("ViT-B-32", quick_gelu=True)
    visual = {k: v.detach().clone() for k, v in model.visual.state_dict().items()}
    del model
    g = torch.Generator().manual_seed(0)
    states = [visual] + [{k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in visual.items()} for _ in range(n_tasks)]
    nbytes = sum(v.numel() * v.element_size() for s in states for v in s.values())
    digest_s, _ = timed(lambda: [state_digest(s) for s in states])
    sums_s, _ = timed(lambda: [[float(v.double().sum()) for v in s.values()] for s in states])
    clone_s, _ = timed(lambda: [[v.clone() for v in s.values()] for s in states])
    return {"GB": nbytes / 1e9, "params_per_model": sum(v.numel() for v in visual.values()), "state_digest_s": digest_s,
            "GB_per_s": nbytes / 1e9 / digest_s, "old_sums_s": sums_s, "clone_s": clone_s}


def images(n: int) -> dict:
    from bench_suite_check import write_images

    tmp = Path(tempfile.mkdtemp(prefix="bench-fingerprint-"))
    try:
        files = write_images(tmp / "data", ["task"], 10, n)
        nbytes = sum(os.path.getsize(f) for f in files)
        read_s, _ = timed(lambda: [Path(f).read_bytes() for f in files])
        cold_s, digests = timed(lambda: FileDigests(None).digests(files))
        memo = tmp / "memo.json"
        FileDigests(memo).digests(files)
        warm_s, again = timed(lambda: FileDigests(memo).digests(files))
        assert again == digests
        return {"images": n, "MB": nbytes / 1e6, "read_s": read_s, "digest_no_memo_s": cold_s, "digest_with_memo_s": warm_s}
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=10_000)
    parser.add_argument("--cache-dir", type=Path, default=ROOT / "cache")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = {"load_average": os.getloadavg(), "threads": torch.get_num_threads(), "mini8": mini8(args.cache_dir), "vit_b32": vit_b32(),
           "images": images(args.images)}
    m, v, i = out["mini8"], out["vit_b32"], out["images"]
    print(f"mini8 ({m['MB']:.1f} MB of weights and images): load {m['load_s']:.3f} s, fingerprint {m['fingerprint_s']:.3f} s "
          f"({m['fingerprint_s'] / m['load_s']:.2f}x the load)")
    print(f"ViT-B/32 x 9 ({v['GB']:.2f} GB): state_digest {v['state_digest_s']:.2f} s ({v['GB_per_s']:.1f} GB/s); old per-tensor sums "
          f"{v['old_sums_s']:.2f} s; one clone {v['clone_s']:.2f} s; digest / sums = {v['state_digest_s'] / v['old_sums_s']:.2f}, "
          f"digest / clone = {v['state_digest_s'] / v['clone_s']:.2f}")
    print(f"{i['images']} images ({i['MB']:.0f} MB): reading every file {i['read_s']:.2f} s; digests without memo {i['digest_no_memo_s']:.2f} s "
          f"({i['digest_no_memo_s'] / i['read_s']:.2f}x the read), with the memo {i['digest_with_memo_s']:.2f} s "
          f"({i['digest_with_memo_s'] / i['read_s']:.2f}x)")
    print(f"load average at start {out['load_average']}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
