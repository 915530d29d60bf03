"""Does a metric predict the merge? (issue 19, view 5): the pairwise metrics on constructed inputs and the cached table."""

import numpy as np
import pandas as pd
import pytest
import torch

from merging.pair_metrics import METRICS, correlations, pair_table, subspace_overlaps


def test_subspace_overlap_is_one_for_the_same_subspace_and_zero_for_orthogonal_ones():
    q = torch.linalg.qr(torch.randn(8, 8))[0]
    a = {"w": q[:, :2] @ torch.randn(2, 6)}
    b = {"w": q[:, :2] @ torch.randn(2, 6)}  # the same 2-D column space
    c = {"w": q[:, 4:6] @ torch.randn(2, 6)}  # an orthogonal one
    overlap = subspace_overlaps([a, b, c], ["w"], top_fraction=2 / 6)
    assert overlap[0, 1] == pytest.approx(1.0, abs=1e-5)
    assert overlap[0, 2] == pytest.approx(0.0, abs=1e-5)


def test_correlations_of_a_linear_metric_are_one():
    table = pd.DataFrame({m: np.arange(5.0) * (k + 1) for k, m in enumerate(METRICS)})
    table["normalized_accuracy"] = 2 * np.arange(5.0) + 1
    table.loc[:, "tv_cosine"] = -table["tv_cosine"]
    r = correlations(table).set_index("metric")
    assert r.loc["subspace_overlap", "pearson_r"] == pytest.approx(1.0)
    assert r.loc["tv_cosine", "spearman_r"] == pytest.approx(-1.0)


def test_pair_table_on_a_tiny_suite(tiny_suite, tmp_path):
    table = pair_table(tiny_suite, n=12, cache_dir=tmp_path, device="cpu")
    assert table["pair"].tolist() == ["a + b", "a + c", "b + c"]
    assert table["representation_cka"].between(0, 1).all() and table["subspace_overlap"].between(0, 1).all()
    assert np.isfinite(table["normalized_accuracy"]).all()
    again = pair_table(tiny_suite, n=12, cache_dir=tmp_path, device="cpu")
    assert np.allclose(again[list(METRICS)].to_numpy(), table[list(METRICS)].to_numpy())
