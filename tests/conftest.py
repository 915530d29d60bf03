"""Shared fixtures: a random in-memory suite (milliseconds) and the trained ``micro`` suite (seconds, once per session)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("NUMBA_CACHE_DIR", str(ROOT / "cache" / "numba"))
torch.set_num_threads(min(2, os.cpu_count() or 1))

from merging.suites.base import Suite, TaskData  # noqa: E402


def random_suite(tasks: tuple[str, ...] = ("a", "b", "c"), width: int = 16, layers: int = 2, classes: tuple[int, ...] = (3, 4, 5), n_test: int = 24, seed: int = 0, spread: float = 0.05) -> Suite:
    """A tiny open_clip ViT with random weights and task vectors of size ``spread``; random images and heads."""
    from merging.model import build_encoder

    torch.manual_seed(seed)
    config = {"kind": "vit", "image_size": 16, "patch_size": 8, "width": width, "layers": layers, "heads": 2, "mlp_ratio": 2.0, "output_dim": 8}
    pretrained = {k: v.detach().clone() for k, v in build_encoder(config).state_dict().items()}
    finetuned, heads, data = {}, {}, {}
    for t, c in zip(tasks, classes, strict=False):
        finetuned[t] = {k: v + spread * torch.randn_like(v) if v.is_floating_point() else v.clone() for k, v in pretrained.items()}
        heads[t] = {"weight": 10 * torch.nn.functional.normalize(torch.randn(c, 8), dim=-1), "bias": torch.zeros(c)}
        images = torch.randint(0, 256, (n_test, 16, 16, 3), dtype=torch.uint8)
        data[t] = TaskData(t, [f"{t}{i}" for i in range(c)], images, torch.arange(n_test) % c, images.clone(), torch.arange(n_test) % c)
    return Suite("random", config, pretrained, finetuned, heads, data, {})


@pytest.fixture
def tiny_suite() -> Suite:
    return random_suite()


@pytest.fixture(scope="session")
def micro_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="session")
def micro_suite(micro_cache):
    from merging.suites import get_suite

    return get_suite("micro", cache_dir=micro_cache)


@pytest.fixture(autouse=True)
def _restore_main_module():
    """AppTest runs page scripts as ``__main__`` and leaves them there; a later spawn-based process pool would
    then re-run a page (and build mini8) in every worker. Put the real ``__main__`` back after each test."""
    main = sys.modules.get("__main__")
    yield
    if main is not None:
        sys.modules["__main__"] = main
