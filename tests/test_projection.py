"""Joint projections: row alignment, determinism, the cache, faithfulness on clustered data, HTML."""

import warnings

import numpy as np
import pytest
import torch

from merging import projection
from merging.errors import ConfigError
from merging.features import Features
from merging.metrics import trustworthiness
from merging.projection import embed, joint_projection, write_html


def clusters(n_per: int = 60, k: int = 4, d: int = 64, gap: float = 20.0, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = gap * rng.normal(size=(k, d))
    labels = np.repeat(np.arange(k), n_per)
    return (centres[labels] + rng.normal(size=(len(labels), d))).astype(np.float32), labels


def features(x: np.ndarray, labels: np.ndarray, key: str = "", task: str = "t") -> Features:
    n = len(x)
    lab = torch.as_tensor(labels, dtype=torch.int64)
    names = [f"c{i}" for i in range(int(lab.max()) + 1)]
    return Features(task, names, torch.arange(n), lab, lab.roll(1), torch.as_tensor(x), key=key)


def test_joint_pca_keeps_rows_aligned_and_identical_inputs_identical():
    x, y = clusters()
    shifted = x + np.float32(3.0)
    sets = {"a": features(x, y), "b": features(x, y), "c": features(shifted, y)}
    df = joint_projection(sets, "pca")
    assert list(df.columns[:2]) == ["x", "y"] and len(df) == 3 * len(x)
    a, b, c = (df[df.model == m].reset_index(drop=True) for m in "abc")
    assert (a["sample"] == b["sample"]).all() and (a["label"] == c["label"]).all() and (a["classname"] == b["classname"]).all()
    assert np.array_equal(a[["x", "y"]].to_numpy(), b[["x", "y"]].to_numpy())
    assert not np.allclose(a[["x", "y"]].to_numpy(), c[["x", "y"]].to_numpy())
    assert (a["correct"] == (a["label"] == a["prediction"])).all() and not a["correct"].all()


def test_pca_3d_and_tsne_are_deterministic_by_seed():
    x, y = clusters(n_per=30)
    df = joint_projection({"a": features(x, y)}, "pca", dim=3)
    assert {"x", "y", "z"} <= set(df.columns)
    one, two = embed(x, "tsne", seed=1), embed(x, "tsne", seed=1)
    assert one.shape == (len(x), 2) and np.array_equal(one, two)
    assert not np.allclose(one, embed(x, "tsne", seed=2))


def test_projection_of_separated_clusters_is_trustworthy():
    x, _ = clusters()
    for method in ("pca", "tsne"):
        assert trustworthiness(x, embed(x, method), k=5) > 0.9
    noise = np.random.default_rng(0).normal(size=(len(x), 2))
    assert trustworthiness(x, noise, k=5) < 0.6


def test_projection_is_cached_by_inputs_and_settings(tmp_path, monkeypatch):
    x, y = clusters(n_per=20)
    sets = {"a": features(x, y, key="run1/t/n80"), "b": features(x + 1, y, key="run2/t/n80")}
    first = joint_projection(sets, "tsne", cache_dir=tmp_path, perplexity=10)

    def refit(*_a, **_k):
        raise AssertionError("the projection should have come from the cache")

    monkeypatch.setattr(projection, "fit_embedding", refit)
    again = joint_projection(sets, "tsne", cache_dir=tmp_path, perplexity=10)
    assert np.array_equal(first[["x", "y"]].to_numpy(), again[["x", "y"]].to_numpy())
    with pytest.raises(AssertionError, match="cache"):
        joint_projection(sets, "tsne", cache_dir=tmp_path, perplexity=5)
    with pytest.raises(AssertionError, match="cache"):
        joint_projection({"b": sets["b"], "a": sets["a"]}, "tsne", cache_dir=tmp_path, perplexity=10)


def test_bad_settings_name_the_alternatives():
    x, _ = clusters(n_per=5)
    with pytest.raises(ConfigError, match="pca, tsne, umap"):
        embed(x, "isomap")
    with pytest.raises(ConfigError, match="perplexity"):
        embed(x, "tsne", n_neighbors=5)


def test_html_is_self_contained_with_hover(tmp_path):
    x, y = clusters(n_per=10)
    df = joint_projection({"merged": features(x, y), "individual": features(x + 1, y)}, "pca")
    path = write_html(df, tmp_path / "s.html", color="classname")
    text = path.read_text()
    assert path.stat().st_size > 1_000_000 and '<script src="https://cdn' not in text
    assert "predicted_classname" in text and "merged" in text and "individual" in text


@pytest.mark.slow
def test_umap_warnings_on_a_disconnected_graph_do_not_become_errors(caplog):
    """Three far-apart clusters with 5 neighbours: a kNN graph of 3 components; warnings are errors here."""
    x, _ = clusters(n_per=30, k=3, gap=1000.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(UserWarning):  # what a user running with -W error would get from umap itself
            projection.import_umap().UMAP(n_neighbors=5, random_state=0).fit_transform(x)
        with caplog.at_level("INFO", logger="merging.projection"):
            out = embed(x, "umap", n_neighbors=5)
    assert out.shape == (90, 2) and np.isfinite(out).all()
    assert trustworthiness(x, out, k=5) > 0.8
    assert any(r.message.startswith("umap: ") for r in caplog.records)
