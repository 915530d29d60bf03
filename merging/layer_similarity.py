"""Layer by layer (issue 19, view 4): how similar a merged model's features are to the individual model's, per block.

Per layer (each block's token-mean output, then the final feature): linear CKA (Kornblith et al., ICML 2019,
https://arxiv.org/abs/1905.00414; ``merging.metrics.linear_cka``) with the 25-75 % range over bootstrap resamples of
the samples, and the per-sample cosine with its 25-75 % range over samples; and the layer x layer CKA matrix of two
models (Kornblith et al., Fig. 5). Rows of the two feature sets are the same test images (``merging.features``).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from merging.features import FINAL, Features
from merging.metrics import linear_cka
from merging.progress import ProgressFn, scaled

BOOTSTRAP = 20


def per_sample_cosine(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """cos(aₙ, bₙ) of every row pair: [N]."""
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1).numpy()


def bootstrap_cka(a: torch.Tensor, b: torch.Tensor, resamples: int = BOOTSTRAP, seed: int = 0) -> np.ndarray:
    """Linear CKA on ``resamples`` bootstrap resamples of the rows (the same rows on both sides): [resamples]."""
    g = torch.Generator().manual_seed(seed)
    n = len(a)
    return np.array([linear_cka(a[idx], b[idx]) for idx in (torch.randint(0, n, (n,), generator=g) for _ in range(resamples))])


def layer_profile(reference: Features, others: Mapping[str, Features], resamples: int = BOOTSTRAP, seed: int = 0) -> pd.DataFrame:
    """Tidy ``model, layer, depth, metric, value, q25, q75`` of each model against ``reference`` at every block and the final
    feature: ``cka`` (value on all samples, band over bootstrap resamples) and ``cosine`` (median, band over samples)."""
    rows = []
    for name, fs in others.items():
        if not torch.equal(fs.indices, reference.indices):
            raise ValueError(f"{name}'s features are not the reference's samples")
        for depth, layer in enumerate(reference.layers[1:] + [FINAL]):
            x, y = reference.layer(layer), fs.layer(layer)
            boot = bootstrap_cka(x, y, resamples, seed)
            cos = per_sample_cosine(x, y)
            rows.append((name, layer, depth, "cka", linear_cka(x, y), *np.nanpercentile(boot, [25, 75])))
            rows.append((name, layer, depth, "cosine", float(np.median(cos)), *np.percentile(cos, [25, 75])))
    return pd.DataFrame(rows, columns=["model", "layer", "depth", "metric", "value", "q25", "q75"])


def cka_matrix(a: Features, b: Features) -> pd.DataFrame:
    """[La, Lb] linear CKA of every layer of ``a`` (rows) with every layer of ``b`` (columns): blocks, then the final
    feature; widths may differ (the final feature is narrower than the residual stream)."""
    la, lb = a.layers[1:] + [FINAL], b.layers[1:] + [FINAL]
    return pd.DataFrame([[linear_cka(a.layer(x), b.layer(y)) for y in lb] for x in la], index=la, columns=lb)


def layer_view(suite, base: str, task: str, n: int = 200, preset: str | None = None, seed: int = 0, cache_dir: str | Path = "cache",
               device: str | None = None, progress: ProgressFn | None = None) -> tuple[pd.DataFrame, dict[str, pd.DataFrame]]:
    """The view for one base merge and one task: the profile of ``merged`` and ``merged + Surgery`` against the individual
    model, and the layer x layer CKA of each against the individual model and of the individual model with itself.
    Runs and per-block features come from the cache (computed on first use)."""
    from merging.artifacts import run_features
    from merging.methods import get_method
    from merging.runs import RunConfig, run

    suite.check_tasks([task])
    configs = {
        "individual": RunConfig(suite.name, "individual", seed=seed),
        "merged": RunConfig(suite.name, base, preset=preset if get_method(base).presets else None, seed=seed),
        "merged + Surgery": RunConfig(suite.name, "surgery", {"base": base}, preset=preset, seed=seed),
    }
    feats: dict[str, Features] = {}
    for k, (label, config) in enumerate(configs.items()):
        part = scaled(progress, k / len(configs), (k + 1) / len(configs), f"{label}: ")
        result = run(config, suite, cache_dir, device, part)
        feats[label] = run_features(result, suite, [task], n, 0, True, cache_dir, device=device, progress=part)[task]
    ref = feats["individual"]
    profile = layer_profile(ref, {k: v for k, v in feats.items() if k != "individual"})
    matrices = {label: cka_matrix(fs, ref) for label, fs in feats.items()}
    return profile, matrices
