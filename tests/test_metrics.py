"""Bias metrics: identities, hand-computed values, CKA's invariances, and the tidy table on a real merge."""

import math

import numpy as np
import pytest
import torch

from merging import metrics as M
from merging.artifacts import run_features
from merging.errors import DataError
from merging.runs import RunConfig, run


def rand(n=200, d=12, seed=0):
    return np.random.default_rng(seed).normal(size=(n, d))


def cka_by_hsic(x, y):
    """Kornblith 2019 eq. 3-4 with the centring matrix H, written independently of the implementation."""
    n = len(x)
    h = np.eye(n) - np.ones((n, n)) / n
    k, l_ = x @ x.T, y @ y.T
    hsic = lambda a, b: np.trace(a @ h @ b @ h)  # noqa: E731
    return hsic(k, l_) / math.sqrt(hsic(k, k) * hsic(l_, l_))


def test_identical_features():
    a = rand()
    assert M.mean_l1(a, a) == 0.0 and M.mean_l2(a, a) == 0.0
    assert M.mean_cosine(a, a) == pytest.approx(1.0)
    assert M.linear_cka(a, a) == pytest.approx(1.0)
    assert M.knn_overlap(a, a, k=10) == 1.0


def test_hand_computed_distances():
    a, b = np.zeros((5, 4)), np.full((5, 4), 2.0)
    assert M.mean_l1(a, b) == 2.0 and M.mean_l2(a, b) == pytest.approx(4.0)
    e = np.eye(4)
    assert M.mean_cosine(e, np.roll(e, 1, axis=1)) == pytest.approx(0.0)
    assert M.mean_cosine(e, -3 * e) == pytest.approx(-1.0)
    assert M.mean_l1(torch.ones(3, 2), torch.zeros(3, 2)) == 1.0


@pytest.mark.parametrize("n,d", [(200, 12), (20, 64)])
def test_cka_matches_the_hsic_formula_in_both_forms(n, d):
    a, b = rand(n, d, 0), rand(n, d, 1) + 0.5 * rand(n, d, 0)
    assert M.linear_cka(a, b) == pytest.approx(cka_by_hsic(a - a.mean(0), b - b.mean(0)), rel=1e-9)


def test_cka_is_invariant_to_rotation_and_scale_and_drops_for_shuffled_rows():
    a = rand(200, 12, 0)
    b = a @ rand(12, 12, 2) + 0.3 * rand(200, 12, 3)
    q, _ = np.linalg.qr(rand(12, 12, 4))
    base = M.linear_cka(a, b)
    assert 0.3 < base < 0.99
    assert M.linear_cka(a @ q * 3.7, b) == pytest.approx(base, rel=1e-9)
    assert M.linear_cka(a, 0.01 * b @ q) == pytest.approx(base, rel=1e-9)
    assert M.linear_cka(a, a @ q * 5) == pytest.approx(1.0)
    shuffled = a[np.random.default_rng(5).permutation(len(a))]
    assert M.linear_cka(a, shuffled) < 0.2


def test_knn_overlap_is_one_under_isometries_and_low_for_unrelated_features():
    a = rand(150, 8)
    q, _ = np.linalg.qr(rand(8, 8, 1))
    assert M.knn_overlap(a, a @ q + 4.0, k=7) == 1.0
    assert M.knn_overlap(a, rand(150, 8, 9), k=7) < 0.2


def test_trustworthiness_and_silhouette():
    a = rand(100, 6)
    assert M.trustworthiness(a, a) == pytest.approx(1.0)
    centres = 50 * rand(3, 6, 1)
    labels = np.repeat(np.arange(3), 30)
    x = centres[labels] + rand(90, 6, 2)
    assert M.silhouette(x, labels) > 0.9
    assert M.silhouette(rand(90, 6, 3), labels) < 0.1
    assert math.isnan(M.silhouette(x, np.zeros(90)))


def test_misaligned_inputs_are_refused():
    with pytest.raises(DataError, match="same N"):
        M.mean_l1(rand(10, 3), rand(11, 3))


def test_bias_table_on_micro_matches_direct_calls(micro_suite, micro_cache):
    sets = {}
    for name in ("individual", "task_arithmetic"):
        result = run(RunConfig("micro", name), micro_suite, cache_dir=micro_cache, device="cpu")
        sets[name] = run_features(result, micro_suite, ["colors"], n=40, layers=True, cache_dir=micro_cache, device="cpu")["colors"]
    ind, ta = sets["individual"], sets["task_arithmetic"]
    table = M.bias_table(sets, "individual", layers=ind.layers)
    assert set(table.layer) == {"final", "block0", "block1"}
    get = lambda m, metric, layer="final": table.query("model == @m and metric == @metric and layer == @layer")["value"].item()  # noqa: E731
    assert get("task_arithmetic", "l1") == pytest.approx(M.mean_l1(ind.embedding, ta.embedding)) and get("task_arithmetic", "l1") > 0
    assert get("task_arithmetic", "cka", "block1") == pytest.approx(M.linear_cka(ind.blocks[1], ta.blocks[1]))
    assert get("task_arithmetic", "cka") < 1.0 and 0 <= get("task_arithmetic", "knn_overlap") < 1.0
    assert get("individual", "accuracy") == pytest.approx(ind.accuracy) and get("individual", "accuracy") > get("task_arithmetic", "accuracy")
    assert table.query("model == 'individual' and metric == 'l1'").empty
    wide = M.wide(table)
    assert wide.loc[("colors", "final", "task_arithmetic"), "l2"] == pytest.approx(M.mean_l2(ind.embedding, ta.embedding))
    other = dict(sets, task_arithmetic=run_features(run(RunConfig("micro", "task_arithmetic"), micro_suite, cache_dir=micro_cache, device="cpu"), micro_suite, ["colors"], n=20, cache_dir=micro_cache, device="cpu")["colors"])
    with pytest.raises(DataError, match="not the same samples"):
        M.bias_table(other, "individual")
