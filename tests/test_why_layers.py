"""Layer by layer (issue 19, view 4): CKA of a representation with itself is 1 at every layer, the layer x layer
matrix of the individual model with itself has a unit diagonal, and the view runs on a tiny suite."""

import numpy as np
import pytest
import torch

from merging.features import Features
from merging.layer_similarity import cka_matrix, layer_profile, layer_view


def _features(seed: int, n: int = 40) -> Features:
    g = torch.Generator().manual_seed(seed)
    blocks = [torch.randn(n, 16, generator=g) for _ in range(3)]
    return Features("t", ["x", "y"], torch.arange(n), torch.arange(n) % 2, torch.arange(n) % 2, torch.randn(n, 8, generator=g), blocks)


def test_cka_of_a_representation_with_itself_is_one_at_every_layer():
    a = _features(0)
    profile = layer_profile(a, {"same": a, "other": _features(1)})
    same = profile[profile["model"] == "same"]
    assert same["layer"].tolist() == ["block0", "block0", "block1", "block1", "block2", "block2", "final", "final"]
    assert same[["value", "q25", "q75"]].to_numpy() == pytest.approx(np.ones((8, 3)))
    other = profile[(profile["model"] == "other") & (profile["metric"] == "cka")]
    assert (other["value"] < 0.9).all() and (other["q25"] <= other["q75"]).all()


def test_layer_by_layer_diagonal_of_a_model_with_itself_is_one():
    a = _features(0)
    m = cka_matrix(a, a)
    assert list(m.index) == ["block0", "block1", "block2", "final"]
    assert np.diag(m.to_numpy()) == pytest.approx(np.ones(4))


def test_layer_view_on_a_tiny_suite(tiny_suite, tmp_path):
    profile, matrices = layer_view(tiny_suite, "task_arithmetic", "a", n=12, preset="fast", cache_dir=tmp_path, device="cpu")
    assert set(profile["model"]) == {"merged", "merged + Surgery"}
    assert np.diag(matrices["individual"].to_numpy()) == pytest.approx(np.ones(3))  # 2 blocks and the final feature
    assert profile["value"].between(-1, 1.000001).all()
