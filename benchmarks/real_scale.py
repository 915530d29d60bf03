"""A ViT-B/32-sized rehearsal of the real-checkpoint path, nothing downloaded (issue #22, part 1).

    .venv/bin/python benchmarks/real_scale.py generate --root /tmp/real_scale [--images 64]
    .venv/bin/python benchmarks/real_scale.py rehearse --root /tmp/real_scale [--layouts open_clip,task_vectors,hf] [--methods all]
    .venv/bin/python benchmarks/real_scale.py throughput [--batch 64]
    .venv/bin/python benchmarks/real_scale.py table --csv benchmarks/results/real_scale_cpu.csv

``generate`` writes, from fixed seeds, one set of weights in the three layouts users hold: an open_clip
``ViT-B-32`` with random weights as the pretrained CLIP (text tower included: the zero-shot heads come
from it), 8 fine-tuned image towers θ₀ + τ_t, and 224-px-and-up image folders per task (test and
train; JPEG and PNG, RGB, L, RGBA and P modes, mixed sizes). Each task vector is structured like a
fine-tuning update: per weight matrix a low-rank part shared in part across tasks plus noise, scaled
per tensor to a relative size ‖τ_t‖/‖θ₀‖ between 1 % and 3 % (the issue's range; a published figure
for ViT-B/32 was not found in the library).

``rehearse`` runs each step as its own process through the product's CLI (``python -m merging ...``):
conversion (task_vectors), ``suite check``, every registered method, feature extraction, a joint UMAP
and the bias metrics, then every page of the app in Chromium; it records wall time, peak RSS (of the
step's process; for the app, of the server and its job processes together) and, on CUDA, peak GPU
memory into a CSV, one row per (layout, step). Adaptation methods run a shortened schedule on CPU
(``SHORT``): the table says which. ``table`` prints the BENCHMARKS.md table from the CSV.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import threading
import time
import types
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

TASKS = ("SUN397", "Cars", "RESISC45", "EuroSAT", "SVHN", "GTSRB", "MNIST", "DTD")
ARCH = "ViT-B-32"
RELATIVE_SIZE = (0.01, 0.03)
"""‖τ_t‖/‖θ₀‖ per tensor, task t spread evenly over this range."""
RANK = 8
SHARED = 0.3
"""Fraction of each task vector's low-rank part shared by all tasks (task vectors are not orthogonal in practice)."""
NOISE = 0.2
"""Fraction of each task vector's norm that is i.i.d. noise (the rest is low-rank)."""
MODES = (("RGB", "jpg"), ("L", "png"), ("RGBA", "png"), ("P", "png"), ("RGB", "png"), ("L", "jpg"))
SHORT = {
    "adamerging": {"steps": 3},
    "wemoe": {"steps": 3},
    "tinting": {"epochs": 1},
    "surgery_v2": {"iterations": 3},
}
"""CPU-shortened schedules (one step of each already costs tens of seconds at this size); on CUDA the fast preset runs as is."""
PAPER = {
    "emr": "461 MB extra for 8 ViT-B/32 tasks (EMR-Merging; algorithms_frontier.md §7)",
    "featcal": "53 s on a GPU at 256 images/task, CPU RSS 22.8 GiB, against Surgery's 217 s and 69.3 GiB (FeatCal README; §10)",
}
"""Published ViT-B/32 figures the table sets beside ours (only those ``../shared`` cites with a source)."""


# --------------------------------------------------------------------------------------------- generate


def _task_vector(theta: torch.Tensor, shared: torch.Tensor | None, rel: float, gen: torch.Generator) -> torch.Tensor:
    if theta.ndim >= 2:
        m = theta.reshape(theta.shape[0], -1)
        own = torch.randn(m.shape[0], RANK, generator=gen) @ torch.randn(RANK, m.shape[1], generator=gen)
        low = SHARED * shared.reshape(m.shape) + (1 - SHARED) * own / own.norm() if shared is not None else own / own.norm()
        tau = (1 - NOISE) * low / low.norm() + NOISE * (n := torch.randn(m.shape, generator=gen)) / n.norm()
    else:
        tau = torch.randn(theta.shape, generator=gen)
    scale = theta.norm() if theta.norm() > 0 else torch.tensor(theta.numel() ** 0.5 * 0.02)
    return (rel * scale * tau / tau.norm()).reshape(theta.shape)


def _finetuned(visual0: dict, seed: int) -> dict[str, dict]:
    import torch

    gen = torch.Generator().manual_seed(seed)
    shared = {}
    for k, v in visual0.items():
        if v.ndim >= 2:
            m = v.reshape(v.shape[0], -1)
            s = torch.randn(m.shape[0], RANK, generator=gen) @ torch.randn(RANK, m.shape[1], generator=gen)
            shared[k] = s / s.norm()
    out = {}
    for i, task in enumerate(TASKS):
        rel = RELATIVE_SIZE[0] + (RELATIVE_SIZE[1] - RELATIVE_SIZE[0]) * i / (len(TASKS) - 1)
        out[task] = {k: (v + _task_vector(v, shared.get(k), rel, gen)).contiguous() for k, v in visual0.items()}
    return out


def _write_images(root: Path, images: int, seed: int) -> None:
    """``<root>/<task>/<split>/<label index>/*``: each class a hue and a shape size, so classes differ."""
    import numpy as np
    from PIL import Image, ImageDraw

    from merging.suites import templates as tpl

    for ti, task in enumerate(TASKS):
        folders = [str(i) for i in range(len(tpl.classnames(task)))]  # label-index folders (class names hold "/")
        for si, split in enumerate(("test", "train")):
            rng = np.random.default_rng([seed, ti, si])
            for j in range(images):
                c = j % len(folders)
                h, w = (int(x) for x in rng.integers(200, 400, 2))
                hue = (c * 0.61803) % 1.0
                base = np.stack([np.linspace(0, 1, w)[None, :].repeat(h, 0) * (0.5 + 0.5 * np.cos(2 * np.pi * (hue + k / 3))) for k in range(3)], -1)
                img = Image.fromarray((255 * np.clip(base + 0.15 * rng.standard_normal((h, w, 3)), 0, 1)).astype(np.uint8))
                r = int(min(h, w) * (0.15 + 0.3 * ((c * 7) % 10) / 10))
                cy, cx = int(rng.integers(r, h - r)), int(rng.integers(r, w - r))
                ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=tuple(int(x) for x in rng.integers(0, 256, 3)))
                mode, ext = MODES[j % len(MODES)]
                folder = root / task.lower() / split / folders[c]
                folder.mkdir(parents=True, exist_ok=True)
                img.convert(mode).save(folder / f"{j:04d}.{ext}", quality=90) if ext == "jpg" else img.convert(mode).save(folder / f"{j:04d}.{ext}")


def _hf_clip_config(model: torch.nn.Module) -> object:
    from transformers import CLIPConfig

    v, t = model.visual, model.transformer
    width = v.conv1.out_channels
    return CLIPConfig(
        text_config=dict(hidden_size=t.width, intermediate_size=4 * t.width, num_attention_heads=t.resblocks[0].attn.num_heads,
                         num_hidden_layers=len(t.resblocks), vocab_size=model.vocab_size, max_position_embeddings=model.context_length,
                         eos_token_id=49407, hidden_act="gelu"),
        vision_config=dict(hidden_size=width, intermediate_size=4 * width, num_attention_heads=v.transformer.resblocks[0].attn.num_heads,
                           num_hidden_layers=len(v.transformer.resblocks), image_size=224, patch_size=v.conv1.kernel_size[0], hidden_act="gelu"),
        projection_dim=model.text_projection.shape[1],
    )


class _Modeling(types.ModuleType):
    """Stands for task_vectors' ``src.modeling`` while pickling (removed before conversion, as on a user's machine)."""


def _pickle_task_vectors_layout(root: Path, model, finetuned: dict[str, dict]) -> None:
    import torch

    modeling = _Modeling("src.modeling")

    class ImageEncoder(torch.nn.Module):
        def __init__(self, clip):
            super().__init__()
            self.model = clip
            delattr(self.model, "transformer")

    ImageEncoder.__module__, ImageEncoder.__qualname__ = "src.modeling", "ImageEncoder"
    modeling.ImageEncoder = ImageEncoder
    sys.modules["src"], sys.modules["src.modeling"] = types.ModuleType("src"), modeling
    try:
        folder = root / ARCH
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(ImageEncoder(copy.deepcopy(model)), folder / "zeroshot.pt")
        for task, state in finetuned.items():
            m = copy.deepcopy(model)
            m.visual.load_state_dict(state)
            (folder / task).mkdir(exist_ok=True)
            torch.save(ImageEncoder(m), folder / task / "finetuned.pt")
    finally:
        del sys.modules["src"], sys.modules["src.modeling"]


def generate(root: Path, images: int, seed: int = 0) -> dict[str, Path]:
    """Write the three layouts and their suite configs under ``root``; returns config path by layout."""
    import open_clip
    import torch
    import yaml
    from safetensors.torch import save_file
    from transformers import CLIPModel, CLIPVisionModel

    from merging.suites.clip.hf_keys import open_clip_to_hf_clip, open_clip_vision_to_hf

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.create_model(ARCH, pretrained=None).eval()
    full = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    visual0 = {k[7:]: v for k, v in full.items() if k.startswith("visual.")}
    finetuned = _finetuned(visual0, seed + 1)
    _write_images(root / "data", images, seed)
    base = {"model": ARCH, "data_root": "data", "tasks": list(TASKS), "val_fraction": 0.25}

    oc = root / "open_clip"
    oc.mkdir(exist_ok=True)
    save_file(full, oc / "pretrained.safetensors")
    for t, s in finetuned.items():
        save_file(s, oc / f"{t}.safetensors")
    configs = {"open_clip": {**base, "name": "rehearsal-open_clip", "layout": "open_clip", "pretrained": "open_clip/pretrained.safetensors",
                             "finetuned": "open_clip/{task}.safetensors"}}

    hf = root / "hf"
    config = _hf_clip_config(model)
    clip_hf = CLIPModel(config)
    clip_hf.load_state_dict(open_clip_to_hf_clip(full))
    clip_hf.save_pretrained(hf / "pretrained")
    experts = {}
    for i, (t, s) in enumerate(finetuned.items()):  # FusionBench's experts: CLIPVisionModel folders, and bare files with the prefix
        state, _ = open_clip_vision_to_hf(s, prefix="" if i % 2 == 0 else "vision_model.")
        if i % 2 == 0:
            vm = CLIPVisionModel(config.vision_config)
            vm.load_state_dict(state)
            vm.save_pretrained(hf / f"expert_{t}")
            experts[t] = f"hf/expert_{t}"
        else:
            save_file({k: v.contiguous() for k, v in state.items()}, hf / f"expert_{t}.safetensors")
            experts[t] = f"hf/expert_{t}.safetensors"
    configs["hf"] = {**base, "name": "rehearsal-hf", "layout": "hf", "pretrained": "hf/pretrained", "finetuned": experts}

    _pickle_task_vectors_layout(root / "tv", model, finetuned)
    configs["task_vectors"] = {**base, "name": "rehearsal-task_vectors", "layout": "task_vectors", "root": "converted",
                               "text_weights": "open_clip/pretrained.safetensors"}
    paths = {}
    for layout, cfg in configs.items():
        paths[layout] = root / f"{layout}.yaml"
        paths[layout].write_text(yaml.safe_dump(cfg, sort_keys=False))
    norms = [float(sum((finetuned[t][k] - visual0[k]).norm() ** 2 for k in visual0) ** 0.5 / sum(v.norm() ** 2 for v in visual0.values()) ** 0.5) for t in TASKS]
    (root / "generated.json").write_text(json.dumps({"images_per_task": images, "seed": seed, "relative_task_vector_norm": norms}, indent=1))
    return paths


# --------------------------------------------------------------------------------------------- measure


def _tree_rss_mb(root_pid: int, exclude: tuple[str, ...] = ("chrom",)) -> float:
    """Resident memory of ``root_pid`` and its descendants (from /proc), leaving out the browser."""
    children: dict[int, list[int]] = {}
    names: dict[int, str] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        name, rest = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2 :].split()
        children.setdefault(int(rest[1]), []).append(int(entry))
        names[int(entry)] = name
    total, stack = 0.0, [root_pid]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        if any(x in names.get(pid, "") for x in exclude):
            continue
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) / 1024
        except OSError:
            pass
    return total


class TreePeak:
    """Samples the summed RSS of a process tree every ``every`` seconds; ``peak`` is the largest sum seen."""

    def __init__(self, pid: int, every: float = 0.25):
        self.pid, self.every, self.peak = pid, every, 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, _tree_rss_mb(self.pid))
            self._stop.wait(self.every)

    def __enter__(self) -> TreePeak:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def measured(argv: list[str], env: dict[str, str], log: Path) -> dict:
    """Run ``python -m merging ARGV`` in a worker process; wall seconds, its peak RSS and (CUDA) peak GPU memory."""
    gpu = log.with_suffix(".gpu.json")
    gpu.unlink(missing_ok=True)
    t0 = time.perf_counter()
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, __file__, "worker", "--gpu-json", str(gpu), "--", *argv], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
        with TreePeak(proc.pid) as peak:
            _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    gpu_mb = json.loads(gpu.read_text())["gpu_peak_mb"] if gpu.is_file() else None
    tail = log.read_text().strip().splitlines()[-1:] if log.is_file() else []
    return {"wall_s": round(wall, 1), "peak_rss_mb": round(max(usage.ru_maxrss / 1024, peak.peak)), "gpu_peak_mb": gpu_mb, "rc": rc,
            "note": "" if rc == 0 else (tail[0][:200] if tail else f"exit {rc}")}


def worker(argv: list[str], gpu_json: Path) -> int:
    import torch

    from merging.cli import main

    rc = main(argv)
    if torch.cuda.is_available():
        gpu_json.write_text(json.dumps({"gpu_peak_mb": round(torch.cuda.max_memory_allocated() / 2**20)}))
    return rc


def _latest_result(cache: Path, config: Path, method: str) -> dict | None:
    best = None
    for path in (cache / "runs").glob(f"{method}-*/result.json"):
        r = json.loads(path.read_text())
        if r.get("method") == method and Path(str(r.get("suite", ""))) == config and (best is None or r["created"] > best["created"]):
            best = r
    return best


def _methods(which: str) -> list[str]:
    from merging.methods import list_methods

    names = list_methods()
    return names if which == "all" else [m for m in which.split(",") if m]


VARIANTS = {"surgery_v2": ("surgery", ["version=2"]), "task_arithmetic_auto": ("task_arithmetic", ["scaling=auto"])}
"""Rehearsal steps that are a registered method with settings: SurgeryV2, and λ chosen on the validation split."""


def _method_argv(step: str, config: Path, cuda: bool) -> tuple[list[str], str]:
    method, fixed = VARIANTS.get(step, (step, []))
    short = [] if cuda else [f"{k}={v}" for k, v in SHORT.get(step, {}).items()]
    argv = ["run", "--suite", str(config), "--method", method]
    for s in fixed + short:
        argv += ["--set", s]
    return argv, "fast preset" + (f", shortened: {', '.join(short)}" if short else "")


def browse(config: Path, cache: Path, env: dict[str, str], shots: Path, pages: tuple[str, ...]) -> list[dict]:
    """Open ``pages`` of the app on ``config`` in Chromium; per page: seconds until it is idle with its charts drawn, and
    the peak RSS of the server and its job processes so far."""
    from playwright.sync_api import sync_playwright

    from app_server import CHROMIUM, CHROMIUM_ARGS, serve_process

    rows = []
    server_env = {**env, "MERGELENS_DEFAULT_SUITE": str(config), "MERGELENS_CACHE": str(cache)}
    with serve_process(server_env, shots / "server.log", timeout=120) as (url, proc), TreePeak(proc.pid) as peak, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        for name in pages:
            t0 = time.perf_counter()
            error = _open_page(page, f"{url}/{name}")
            wall = time.perf_counter() - t0
            page.screenshot(path=str(shots / f"{name or 'overview'}.png"))
            rows.append({"step": "page", "method": name or "overview", "wall_s": round(wall, 1), "peak_rss_mb": round(peak.peak),
                         "rc": 0 if not error else 1, "note": error})
        browser.close()
    return rows


PAGES = ("", "tour", "merge", "representation_bias", "method_comparison", "why_merges_fail", "ablations")
IDLE = "[data-testid='stApp'][data-test-script-state='notRunning']"


def _pages(which: str) -> tuple[str, ...]:
    if which == "all":
        return PAGES
    return () if which == "none" else tuple("" if p == "overview" else p for p in which.split(","))


def _open_page(page, url: str, timeout_ms: int = 2_400_000) -> str:
    """Load ``url``; wait until the script is idle, no spinner or progress bar is left and no exception is shown."""
    page.goto(url)
    page.wait_for_selector("[data-testid='stApp'][data-test-connection-state='CONNECTED']", timeout=120_000)
    deadline, quiet = time.time() + timeout_ms / 1000, 0
    while time.time() < deadline and quiet < 2:  # idle and no progress bar or spinner twice, 3 s apart (a job may start late)
        page.wait_for_selector(IDLE, timeout=timeout_ms)
        time.sleep(3)
        busy = page.locator("[data-testid='stSpinner'], [data-testid='stProgress'], [data-testid='stStatusWidget']").count()
        quiet = 0 if busy else quiet + 1
    errors = page.locator("[data-testid='stException']")
    return errors.first.inner_text()[:200].replace("\n", " ") if errors.count() else ""


def rehearse(root: Path, layouts: list[str], methods: list[str], out_csv: Path, cache: Path, pages: tuple[str, ...], append: bool = False) -> None:
    import pandas as pd
    import torch

    cuda = torch.cuda.is_available()
    env = {**os.environ, "NUMBA_CACHE_DIR": str(ROOT / "cache" / "numba"), "MERGELENS_CACHE": str(cache)}
    logs = root / "logs"
    logs.mkdir(exist_ok=True)
    rows: list[dict] = pd.read_csv(out_csv).to_dict("records") if append and out_csv.is_file() else []
    gen = json.loads((root / "generated.json").read_text())

    def record(layout: str, step: str, method: str, res: dict, **extra) -> None:
        row = {"layout": layout, "step": step, "method": method, **res, **extra, "load": round(os.getloadavg()[0], 2), "device": "cuda" if cuda else "cpu",
               "images_per_task": gen["images_per_task"]}
        rows.append(row)
        print(json.dumps(row), flush=True)
        pd.DataFrame(rows).to_csv(out_csv, index=False)

    for layout in layouts:
        config = root / f"{layout}.yaml"
        if layout == "task_vectors":
            record(layout, "convert", "", measured(["convert", "--root", str(root / "tv"), "--model", ARCH, "--out", str(root / "converted"), "--trust"], env,
                                                    logs / f"{layout}-convert.log"))
        record(layout, "suite check", "", measured(["suite", "check", str(config)], env, logs / f"{layout}-check.log"))
        for method in methods:
            argv, schedule = _method_argv(method, config, cuda)
            res = measured(argv + ["--cache", str(cache)], env, logs / f"{layout}-{method}.log")
            r = _latest_result(cache, config, VARIANTS.get(method, (method,))[0]) if res["rc"] == 0 else None
            extra = {"schedule": schedule if r is not None and r["data"]["split"] else ""}
            if r is not None:
                extra.update(weights=r["checkpoints"]["weights"], chosen=r["selection"]["chosen"] if "selection" in r else "")
                extra.update(average=round(r["average"], 2), params_total=r["parameters"]["total"], params_trainable=r["parameters"]["trainable"],
                             stored_mb=round(r["storage"]["total_mb"], 1), extra_mb=round(r["storage"]["extra_mb"], 1),
                             adapt_s=round(r["seconds"]["adapt"], 1), evaluate_s=round(r["seconds"]["evaluate"], 1), published=PAPER.get(method, ""))
            record(layout, "run", method, res, **extra)
        common = ["--suite", str(config), "--n", "0", "--cache", str(cache)]
        record(layout, "features", "task_arithmetic", measured(["features", *common, "--method", "task_arithmetic", "--layers"], env, logs / f"{layout}-features.log"))
        record(layout, "project (umap)", "individual,task_arithmetic,ties", measured(
            ["project", *common, "--methods", "individual,task_arithmetic,ties", "--projection", "umap", "--html", str(logs / f"{layout}-umap.html")], env,
            logs / f"{layout}-project.log"))
        record(layout, "bias metrics", "task_arithmetic,ties", measured(["metrics", *common, "--methods", "task_arithmetic,ties", "--layers"], env,
                                                                         logs / f"{layout}-metrics.log"))
        if pages:
            shots = root / "shots" / layout
            shots.mkdir(parents=True, exist_ok=True)
            for row in browse(config, cache, env, shots, pages):
                record(layout, row.pop("step"), row.pop("method"), row)


# --------------------------------------------------------------------------------------------- throughput


def throughput(batch: int, repeats: int) -> dict:
    """Images/s of MergeLens's feature extraction (``representations.extract`` of a merged model: features,
    predictions, and with ``layers`` every block's token mean) against a raw open_clip ``model.visual``
    forward, on the same batch and weights, interleaved in one process (best of ``repeats``)."""
    import open_clip
    import torch

    from merging.model import StaticModel, make_heads
    from merging.representations import extract
    from merging.suites.base import TaskData

    torch.manual_seed(0)
    visual = open_clip.create_model(ARCH, pretrained=None).visual.eval()
    state = {k: v.detach().clone() for k, v in visual.state_dict().items()}
    images = torch.randint(0, 256, (batch, 224, 224, 3), dtype=torch.uint8)
    data = TaskData("t", ["a", "b"], images, torch.zeros(batch, dtype=torch.long))
    model = StaticModel(visual, state, ["t"], make_heads({"t": {"weight": torch.randn(2, 512)}}, False)).eval()
    runs = {
        "raw open_clip forward": lambda: visual(data.preprocess(images)),
        "extract (final features)": lambda: extract(model, data, "t", batch_size=batch, device="cpu"),
        "extract (final + every block)": lambda: extract(model, data, "t", layers=True, batch_size=batch, device="cpu"),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    with torch.inference_mode():
        visual(data.preprocess(images[:4]))
        for _ in range(repeats):
            for name, fn in runs.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
    raw = min(times["raw open_clip forward"])
    return {"batch": batch, "threads": torch.get_num_threads(), "load": round(os.getloadavg()[0], 2),
            **{name: {"img_s": round(batch / min(t), 2), "ratio_to_raw": round(raw / min(t), 3)} for name, t in times.items()}}


# --------------------------------------------------------------------------------------------- table


def table(csv: Path) -> str:
    import pandas as pd

    df = pd.read_csv(csv).astype(object).fillna("")
    lines = []
    for layout, part in df.groupby("layout", sort=False):
        lines += [f"**{layout} layout** ({part['device'].iloc[0]}, {int(part['images_per_task'].iloc[0])} test images per task, weights "
                  f"{', '.join(sorted({str(w) for w in part.get('weights', []) if w != ''}))})", "",
                  "| step | method | wall s | peak RSS MB | adapt s | evaluate s | params total / trainable | stored MB (extra) | schedule | published |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for _, r in part.iterrows():
            params = f"{int(r['params_total']) / 1e6:.1f}M / {int(r['params_trainable']) / 1e6:.2f}M" if r.get("params_total", "") != "" else ""
            stored = f"{r['stored_mb']} ({r['extra_mb']})" if r.get("stored_mb", "") != "" else ""
            method = str(r["method"]) + (f" (chose λ = {r['chosen']})" if r.get("chosen", "") != "" else "")
            status = "" if int(r["rc"]) == 0 else f" **failed**: {r['note']}"
            lines.append(f"| {r['step']} | {method}{status} | {r['wall_s']} | {r['peak_rss_mb']} | {r.get('adapt_s', '')} | {r.get('evaluate_s', '')} | "
                         f"{params} | {stored} | {r.get('schedule', '')} | {PAPER.get(str(r['method']), '')} |")
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    g = sub.add_parser("generate")
    g.add_argument("--root", type=Path, required=True)
    g.add_argument("--images", type=int, default=32, help="test (and train) images per task")
    r = sub.add_parser("rehearse")
    r.add_argument("--root", type=Path, required=True)
    r.add_argument("--layouts", default="open_clip,task_vectors,hf")
    r.add_argument("--methods", default="all", help="comma-separated, or all (every registered method, plus surgery_v2 and task_arithmetic_auto)")
    r.add_argument("--cache", type=Path, default=None, help="cache folder (default: <root>/cache)")
    r.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results" / "real_scale_cpu.csv")
    r.add_argument("--pages", default="all", help="pages to open in Chromium: all, none, or comma-separated (overview is the empty name)")
    r.add_argument("--append", action="store_true", help="add rows to an existing --csv")
    t = sub.add_parser("throughput")
    t.add_argument("--batch", type=int, default=64)
    t.add_argument("--repeats", type=int, default=3)
    tb = sub.add_parser("table")
    tb.add_argument("--csv", type=Path, default=ROOT / "benchmarks" / "results" / "real_scale_cpu.csv")
    w = sub.add_parser("worker")
    w.add_argument("--gpu-json", type=Path, required=True)
    w.add_argument("argv", nargs=argparse.REMAINDER)
    args = ap.parse_args()
    if args.cmd == "generate":
        print(json.dumps({k: str(v) for k, v in generate(args.root, args.images).items()}))
    elif args.cmd == "rehearse":
        methods = _methods(args.methods)
        if args.methods == "all":
            methods.insert(methods.index("surgery") + 1, "surgery_v2")
            methods.insert(methods.index("task_arithmetic") + 1, "task_arithmetic_auto")
        rehearse(args.root, args.layouts.split(","), methods, args.csv, args.cache or args.root / "cache", _pages(args.pages), args.append)
    elif args.cmd == "throughput":
        print(json.dumps(throughput(args.batch, args.repeats)))
    elif args.cmd == "table":
        print(table(args.csv))
    else:
        sys.exit(worker([a for a in args.argv if a != "--"], args.gpu_json))


if __name__ == "__main__":
    main()
