"""How long ``suite check`` takes to decode a data folder, against a plain sequential Pillow loop.

Writes 10,000 small images (default: 1 task x 10 classes, half JPEG and half PNG, 64-224 px, smooth
pictures with some noise so that they compress like photographs) and a tiny open_clip CLIP in the
open_clip layout into a temporary folder, removed at the end. Then times, on the same (page-cached) files:

- ``merging.suites.clip.suite.check(config)``: the whole check (config, checkpoints, folder listing,
  and every image opened, decoded and converted by ``to_rgb8`` in the thread pool);
- the decoding alone (``unreadable_images``: open, decode, ``to_rgb8``, in the thread pool);
- the reference: ``for p in files: PIL.Image.open(p).load()``, sequential.

Imports (open_clip, torch) happen before the timings. Prints seconds, this process's CPU seconds (CPU-s
well under seconds x threads means the machine was busy), images/s and the ratio.

    .venv/bin/python benchmarks/bench_suite_check.py [--images 10000] [--tasks 1] [--classes 10]
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

import numpy as np  # noqa: E402
import open_clip  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import save_file  # noqa: E402

from merging.suites.clip.images import unreadable_images  # noqa: E402
from merging.suites.clip.suite import check  # noqa: E402

ARCH = "mergelens-bench-clip"
TINY = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


def write_images(data: Path, tasks: list[str], classes: int, n: int, seed: int = 0) -> list[str]:
    """``n`` pictures spread over ``tasks`` x ``classes`` folders; every other one a PNG, sizes 64-224 px."""
    rng = np.random.default_rng(seed)
    files = []
    for i in range(n):
        task, cls = tasks[i % len(tasks)], (i // len(tasks)) % classes
        folder = data / task / "test" / f"class_{cls}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = (int(x) for x in rng.integers(64, 225, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)).resize((w, h), Image.BILINEAR)
        pixels = np.clip(np.asarray(coarse, dtype=np.int16) + rng.integers(-8, 9, (h, w, 3)), 0, 255).astype(np.uint8)
        path = folder / f"{i:05d}.{'png' if i % 2 else 'jpg'}"
        Image.fromarray(pixels).save(path, **({"quality": 90} if i % 2 == 0 else {}))
        files.append(str(path))
    return files


def write_suite(root: Path, tasks: list[str]) -> Path:
    cfg_path = root / f"{ARCH}.json"
    cfg_path.write_text(json.dumps(TINY))
    open_clip.add_model_config(cfg_path)
    torch.manual_seed(0)
    model = open_clip.create_model(ARCH, pretrained=None)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, root / "pretrained.safetensors")
    save_file({k[7:]: v for k, v in state.items() if k.startswith("visual.")}, root / "finetuned.safetensors")
    config = {
        "layout": "open_clip",
        "model": ARCH,
        "model_config": str(cfg_path),
        "pretrained": str(root / "pretrained.safetensors"),
        "finetuned": {t: str(root / "finetuned.safetensors") for t in tasks},
        "data_root": str(root / "data"),
        "tasks": tasks,
    }
    path = root / "suite.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def sequential(files: list[str]) -> None:
    for p in files:
        with Image.open(p) as im:
            im.load()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--images", type=int, default=10_000)
    ap.add_argument("--tasks", type=int, default=1)
    ap.add_argument("--classes", type=int, default=10)
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench_suite_check_"))
    try:
        tasks = [f"task{i}" for i in range(args.tasks)]
        t = time.perf_counter()
        files = write_images(root / "data", tasks, args.classes, args.images)
        config = write_suite(root, tasks)
        size = sum(os.path.getsize(p) for p in files)
        print(
            f"wrote {len(files)} images ({size / 2**20:.0f} MiB, {args.tasks} task(s) x {args.classes} classes) in {time.perf_counter() - t:.1f} s"
        )
        print(f"cpus: {os.cpu_count()}, load average: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")

        def timed(fn, *a):
            t, c = time.perf_counter(), time.process_time()
            out = fn(*a)
            return out, time.perf_counter() - t, time.process_time() - c

        _, ref, ref_cpu = timed(sequential, files)
        bad, pool, pool_cpu = timed(unreadable_images, files)
        report, took, took_cpu = timed(check, config)
        problems = [m for ok, m in report if not ok]
        if problems or bad:
            raise SystemExit(f"suite check failed: {problems or bad}")
        decoded = [m for _, m in report if m.endswith("images decode")]
        assert sum(int(m.split("all ")[1].split()[0]) for m in decoded) == len(files), decoded

        print("| what | seconds | CPU-s | images/s |")
        print("|---|---:|---:|---:|")
        print(f"| sequential `Image.open(p).load()` (reference) | {ref:.2f} | {ref_cpu:.2f} | {len(files) / ref:,.0f} |")
        print(f"| decode + `to_rgb8` in the pool (`unreadable_images`) | {pool:.2f} | {pool_cpu:.2f} | {len(files) / pool:,.0f} |")
        print(f"| `suite check` (whole `check(config)`) | {took:.2f} | {took_cpu:.2f} | {len(files) / took:,.0f} |")
        print(
            f"suite check / sequential reference: {took / ref:.2f}x the time ({ref / took:.2f}x as fast); decoding alone {pool / ref:.2f}x"
        )
        print(f"load average after: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
