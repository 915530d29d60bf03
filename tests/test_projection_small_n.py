"""Every projection on few points, in 2-D and 3-D: it fits, falls back with a note the figure shows, or refuses in
one line; and a damaged projection cache entry is refitted, never read as valid."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from merging import projection
from merging.errors import ConfigError, DataError
from merging.features import Features
from merging.projection import embed, fit_embedding, joint_projection, projection_key, resolved_params, scatter_figure

ROOT = Path(__file__).resolve().parents[1]
LABEL = {"pca": "PCA", "tsne": "t-SNE", "umap": "UMAP"}
AXES = "xyz"
PERPLEXITY, N_NEIGHBORS = 30, 15  # the defaults: t-SNE takes 3 x perplexity neighbours, UMAP n_neighbors


def sizes(dim: int) -> list[int]:
    """1-5, dim+1 and dim+2 (UMAP's spectral start solves for dim+1 eigenvectors), around n_neighbors and 3 x perplexity."""
    return sorted({1, 2, 3, 4, 5, dim + 1, dim + 2, N_NEIGHBORS, N_NEIGHBORS + 1, N_NEIGHBORS + 2,
                   3 * PERPLEXITY, 3 * PERPLEXITY + 1, 3 * PERPLEXITY + 2})


CASES = [(m, dim, n) for m in ("pca", "tsne", "umap") for dim in (2, 3) for n in sizes(dim)]


def points(n: int, d: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def flat_note(n: int, dim: int) -> str:
    rank = n - 1
    if rank >= dim:
        return ""
    flat = AXES[rank:dim]
    return f"{n} points span at most {rank} dimension{'s' * (rank != 1)}: {', '.join(flat)} {'is' if len(flat) == 1 else 'are'} 0"


def expected_note(method: str, dim: int, n: int) -> str:
    """The rules, written out: what each method does with n random points in 64 dims."""
    notes = []
    if method == "tsne" and n < 4:
        notes, method = ["t-SNE needs at least 4 points (perplexity >= 1): drawn with PCA"], "pca"
    if method == "umap" and n < 3:
        notes, method = ["UMAP needs at least 3 points (n_neighbors >= 2): drawn with PCA"], "pca"
    if method == "pca":
        notes.append(flat_note(n, dim))
    if method == "tsne" and n - 1 < 3 * PERPLEXITY:
        notes.append(f"perplexity lowered from {PERPLEXITY} to {(n - 1) / 3:.3g}: {n} points allow at most (N-1)/3")
    if method == "umap" and n <= N_NEIGHBORS:
        notes.append(f"n_neighbors lowered from {N_NEIGHBORS} to {n - 1}: {n} points have at most N-1 neighbours")
    if method == "umap" and n < dim + 2:
        notes.append(f"started from PCA, not spectral: the spectral start needs at least {dim + 2} points")
    return "; ".join(filter(None, notes))


@pytest.mark.parametrize(("method", "dim", "n"), CASES, ids=[f"{m}-{d}d-n{n}" for m, d, n in CASES])
def test_every_projection_of_few_points_fits_falls_back_with_a_note_or_refuses_in_one_line(method, dim, n):
    x = points(n)
    if n < 2:
        with pytest.raises(DataError) as e:
            fit_embedding(x, method, dim)
        assert str(e.value) == (f"cannot project {n} point with {LABEL[method]} in {dim}-D: "
                                "a projection needs at least 2 points; pick more samples or models")
        return
    fit = fit_embedding(x, method, dim)
    assert fit.coords.shape == (n, dim) and np.isfinite(fit.coords).all()
    assert fit.note == expected_note(method, dim, n)
    if "drawn with PCA" in fit.note:
        assert np.array_equal(fit.coords, embed(x, "pca", dim))
    if method == "pca" or "drawn with PCA" in fit.note:  # the axes N points cannot span are exactly 0, the others are not
        assert not fit.coords[:, : min(n - 1, dim)].std(axis=0).min() == 0
        assert not fit.coords[:, min(n - 1, dim):].any()
    assert len(np.unique(fit.coords.round(4), axis=0)) == n  # distinct points stay apart
    assert np.array_equal(fit.coords, embed(x, method, dim))  # deterministic by seed


@pytest.mark.parametrize("method", ["pca", "tsne", "umap"])
@pytest.mark.parametrize("dim", [2, 3])
@pytest.mark.parametrize("n", [2, 3, 5, 100])
def test_identical_rows_are_drawn_at_one_spot_with_a_note(method, dim, n):
    x = np.tile(points(1), (n, 1))
    fit = fit_embedding(x, method, dim)
    assert fit.coords.shape == (n, dim) and not fit.coords.any()
    assert fit.note == f"all {n} points are identical: drawn at one spot"


@pytest.mark.parametrize("method", ["pca", "tsne", "umap"])
@pytest.mark.parametrize("dim", [2, 3])
def test_a_few_distinct_rows_repeated_still_fit(method, dim):
    x = points(2)[np.arange(40) % 2]
    fit = fit_embedding(x, method, dim)
    assert fit.coords.shape == (40, dim) and np.isfinite(fit.coords).all()
    assert "identical" not in fit.note and "drawn with PCA" not in fit.note


def test_tsne_whose_distances_underflow_falls_back_to_pca_with_a_note():
    x = (1e-30 * points(30, 8)).astype(np.float32)  # squared distances underflow to 0: openTSNE gives NaN
    fit = fit_embedding(x, "tsne", 2)
    assert np.isfinite(fit.coords).all() and fit.note == "t-SNE gave non-finite coordinates: drawn with PCA"


@pytest.mark.parametrize(("method", "n"), [("tsne", 30), ("umap", 4)])
def test_features_with_fewer_dims_than_the_view_start_from_a_random_layout(method, n):
    """t-SNE's PCA start, and UMAP's where its spectral start cannot run, need as many feature dims as output dims."""
    fit = fit_embedding(points(n, 2), method, 3)
    assert fit.coords.shape == (n, 3) and np.isfinite(fit.coords).all()
    assert "random layout" in fit.note
    pca = fit_embedding(points(n, 2), "pca", 3)
    assert pca.note == f"{n} points span at most 2 dimensions: z is 0" and not pca.coords[:, 2].any()


@pytest.mark.parametrize(("method", "params", "message"), [
    ("umap", {"n_neighbors": 1}, "projection 'umap': n_neighbors must be an integer >= 2, got 1"),
    ("umap", {"n_neighbors": 2.5}, "projection 'umap': n_neighbors must be an integer >= 2, got 2.5"),
    ("umap", {"min_dist": -0.1}, "projection 'umap': min_dist must be a number in [0, 1], got -0.1"),
    ("tsne", {"perplexity": 0}, "projection 'tsne': perplexity must be a number > 0, got 0"),
    ("tsne", {"perplexity": "30"}, "projection 'tsne': perplexity must be a number > 0, got '30'"),
    ("tsne", {"n_jobs": 0}, "projection 'tsne': n_jobs must be a non-zero integer (-1: all cores), got 0"),
])
def test_out_of_range_parameters_are_one_line_errors(method, params, message):
    with pytest.raises(ConfigError) as e:
        fit_embedding(points(20), method, 2, **params)
    assert str(e.value) == message


def test_no_points_no_dims_nan_and_a_bad_dim_are_refused_in_one_line():
    for x, words in [(points(0), "cannot project 0 points with UMAP in 2-D: a projection needs at least 2 points"),
                     (np.zeros((5, 0), np.float32), "cannot project 5 points with UMAP in 2-D: the features have no dimensions"),
                     (np.full((5, 3), np.nan, np.float32), "cannot project 5 points with UMAP in 2-D: the features hold NaN or Inf")]:
        with pytest.raises(DataError, match=words.replace("(", r"\(")) as e:
            fit_embedding(x, "umap", 2)
        assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="projection dim must be 2 or 3, got 4"):
        fit_embedding(points(5), "pca", 4)


# -- joint_projection: the note on the frame and the figure, and the cache ------------------------------------------------


def features(x: np.ndarray, key: str = "", task: str = "t") -> Features:
    n = len(x)
    labels = torch.arange(n) % 2
    return Features(task, ["c0", "c1"], torch.arange(n), labels, labels.roll(1), torch.as_tensor(x), key=key)


def test_the_note_travels_with_the_frame_and_into_the_figure_title(tmp_path):
    sets = {"individual": features(points(2, seed=1), "r1/t/n2"), "merged": features(points(2, seed=2), "r2/t/n2")}
    df = joint_projection(sets, "umap", dim=3, cache_dir=tmp_path)
    note = expected_note("umap", 3, 4)
    assert df.attrs["note"] == note and df.shape[0] == 4 and {"x", "y", "z"} <= set(df.columns)
    fig = scatter_figure(df, title="UMAP of 4 points")
    assert fig.layout.title.text == f"UMAP of 4 points<br><sup>{note}</sup>"
    again = joint_projection(sets, "umap", dim=3, cache_dir=tmp_path)  # from the cache: the note was stored with it
    assert again.attrs["note"] == note and np.array_equal(again[["x", "y", "z"]].to_numpy(), df[["x", "y", "z"]].to_numpy())
    plain = joint_projection({"a": features(points(30))}, "pca")
    assert plain.attrs["note"] == "" and scatter_figure(plain, title="T").layout.title.text == "T"


def test_the_bias_page_scatter_shows_the_note_under_its_title(monkeypatch):
    import ui

    frame = joint_projection({"individual": features(points(2, seed=1)), "merged": features(points(2, seed=2))}, "tsne")
    monkeypatch.setattr(ui, "projected", lambda *a: frame)
    monkeypatch.setattr(ui, "suite_fingerprint", lambda name: "small-n-fingerprint")
    ui._bias_scatter.clear()
    try:
        fig = ui.bias_scatter("small-n", {}, "cpu", 2, "t", "tsne", ("individual", "merged"), "model", title="t: TSNE")
    finally:
        ui._bias_scatter.clear()
    assert fig.layout.title.text == f"t: TSNE<br><sup>{expected_note('tsne', 2, 4)}</sup>"


def cached_case(tmp_path: Path, method: str = "tsne", dim: int = 2):
    sets = {"a": features(points(50, seed=1), "run1/t/n50"), "b": features(points(50, seed=2), "run2/t/n50")}  # no small-N note
    key = projection_key(sets, "final", method, dim, 0, resolved_params(method))
    return sets, tmp_path / "projections" / f"{key}.safetensors"


def damage(path: Path, how: str) -> None:
    if how == "garbage":
        path.write_bytes(b"not a safetensors file at all" * 10)
    elif how == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif how == "empty":
        path.write_bytes(b"")
    elif how == "wrong shape":
        save_file({"coords": torch.zeros(99, 2)}, str(path))
    elif how == "wrong dims":
        save_file({"coords": torch.zeros(100, 3)}, str(path))
    elif how == "nan":
        save_file({"coords": torch.full((100, 2), float("nan"))}, str(path))
    elif how == "no coords":
        save_file({"other": torch.zeros(100, 2)}, str(path))


@pytest.mark.parametrize("how", ["garbage", "truncated", "empty", "wrong shape", "wrong dims", "nan", "no coords"])
def test_a_damaged_cached_projection_is_refitted_with_one_warning_naming_it(tmp_path, caplog, how):
    sets, path = cached_case(tmp_path)
    fresh = joint_projection(sets, "tsne")
    first = joint_projection(sets, "tsne", cache_dir=tmp_path)
    assert path.is_file() and np.array_equal(first[["x", "y"]].to_numpy(), fresh[["x", "y"]].to_numpy())
    damage(path, how)
    with caplog.at_level("WARNING"):
        again = joint_projection(sets, "tsne", cache_dir=tmp_path)
    assert np.array_equal(again[["x", "y"]].to_numpy(), fresh[["x", "y"]].to_numpy())
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and str(path) in warned[0] and "damaged projection cache" in warned[0] and "\n" not in warned[0]
    caplog.clear()
    with caplog.at_level("WARNING"):  # rewritten whole: the next call reads it without a word
        joint_projection(sets, "tsne", cache_dir=tmp_path)
    assert not caplog.records


def test_a_cached_entry_is_used_only_when_its_shape_matches(tmp_path, monkeypatch):
    sets, path = cached_case(tmp_path, "pca")
    joint_projection(sets, "pca", cache_dir=tmp_path)
    coords = torch.arange(200, dtype=torch.float32).reshape(100, 2)
    save_file({"coords": coords}, str(path))  # a well-formed entry of the right shape is trusted as it is

    def refit(*_a, **_k):
        raise AssertionError("the projection should have come from the cache")

    monkeypatch.setattr(projection, "fit_embedding", refit)
    assert np.array_equal(joint_projection(sets, "pca", cache_dir=tmp_path)[["x", "y"]].to_numpy(), coords.numpy())


# -- the CLI ---------------------------------------------------------------------------------------------------------------


def cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "merging", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_cli_refuses_a_one_point_projection_in_one_line_and_notes_a_fallback(micro_suite, micro_cache, tmp_path):
    common = ["--suite", "micro", "--task", micro_suite.tasks[0], "--cache-dir", str(micro_cache), "--device", "cpu"]
    tiny = cli("project", "--methods", "individual", "--n", "1", "--projection", "umap", "--dim", "3",
               "--csv", str(tmp_path / "p.csv"), *common)
    assert tiny.returncode == 2 and "Traceback" not in tiny.stderr
    assert tiny.stderr.strip().splitlines() == [
        "error: cannot project 1 point with UMAP in 3-D: a projection needs at least 2 points; pick more samples or models"]
    small = cli("project", "--methods", "individual,task_arithmetic", "--n", "2", "--projection", "umap", "--dim", "3",
                "--csv", str(tmp_path / "p.csv"), *common)
    assert small.returncode == 0 and "Traceback" not in small.stderr
    assert f"note: UMAP 3-D of 4 points: {expected_note('umap', 3, 4)}" in small.stderr.splitlines()
