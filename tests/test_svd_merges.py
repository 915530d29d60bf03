"""TSV-M, Iso-C, Iso-CTS and CART (algorithms_frontier.md §0-§4, §12): each method against a deliberately plain numpy
re-implementation written here from the recipe (loops per matrix, no library code), the recipe's invariants, the
zero-task rule, dtypes, and the same merge through ``runs.run`` and the ``merge`` CLI."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import random_suite
from safetensors.torch import load_file, save_file

from merging import svd
from merging import task_vectors as tv
from merging.cli import main
from merging.errors import CheckpointError, ConfigError
from merging.methods import get_method, make_params, specs
from merging.methods.iso_cts import subspace_sizes
from merging.runs import RunConfig, build_model, run

SVD_METHODS = ("tsv_m", "iso_c", "iso_cts", "cart")
MEAN_METHODS = ("tsv_m", "iso_c", "iso_cts")  # the non-matrix mean rule of §0


# ---------------------------------------------------------------------------------------------------------------------
# A plain reference, from the recipe only: numpy float64, one matrix at a time, explicit loops over tasks and slots.


def _np_svd(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    return np.linalg.svd(a, full_matrices=False)  # LAPACK gesdd: an all-zero matrix gives identity bases


def _np_polar(a: np.ndarray) -> np.ndarray:
    p, _, qh = _np_svd(a)
    return p @ qh


def _ref_tsv(taus: list[np.ndarray]) -> np.ndarray:
    t = len(taus)
    m, n = taus[0].shape
    k = min(m, n)
    r = int(k * (1 / t))
    big_u, big_s, big_v = np.zeros((m, k)), np.zeros(k), np.zeros((k, n))
    for i, tau in enumerate(taus):
        u, s, vh = _np_svd(tau)
        for j in range(r):
            big_u[:, i * r + j] = u[:, j]
            big_s[i * r + j] = s[j]
            big_v[i * r + j, :] = vh[j, :]
    return _np_polar(big_u) @ np.diag(big_s) @ _np_polar(big_v)


def _ref_iso_c(taus: list[np.ndarray]) -> np.ndarray:
    total = np.zeros_like(taus[0])
    for tau in taus:
        total = total + tau
    u, s, vh = _np_svd(total)
    return np.mean(s) * (u @ vh)


def _ref_iso_cts(taus: list[np.ndarray], fraction: float) -> np.ndarray:
    t = len(taus)
    m, n_cols = taus[0].shape
    k = min(m, n_cols)
    c0 = int(k * fraction)
    specific_total = round((k - c0) / t) * t
    c = k - specific_total
    n = specific_total // t
    total = np.zeros_like(taus[0])
    for tau in taus:
        total = total + tau
    u, s, vh = _np_svd(total)
    big_u, big_s, big_v = np.zeros((m, k)), np.zeros(k), np.zeros((k, n_cols))
    projector = u[:, :c] @ u[:, :c].T
    for i, tau in enumerate(taus):
        ut, st, vht = _np_svd(tau - projector @ tau)
        for j in range(n):
            big_u[:, i * n + j] = ut[:, j]
            big_s[i * n + j] = st[j]
            big_v[i * n + j, :] = vht[j, :]
    for j in range(c):
        big_u[:, t * n + j] = u[:, j]
        big_s[t * n + j] = s[j]
        big_v[t * n + j, :] = vh[j, :]
    return np.mean(big_s) * (_np_polar(big_u) @ _np_polar(big_v))


def _reference(method: str, pretrained: dict, finetuned: list[dict], params: dict) -> dict[str, np.ndarray]:
    """θ per key in float64 numpy, as the recipe words it (CART literally as the official code: τ̄_k = θ_k − θ_avg and
    λ·Σ_k τ̄_k added on the full-rank keys too)."""
    out = {}
    for key, base in pretrained.items():
        if not base.is_floating_point():
            out[key] = base.numpy()
            continue
        b = base.double().numpy()
        taus = [ft[key].double().numpy() - b for ft in finetuned]
        mean = sum(taus) / len(taus)
        if method == "cart":
            avg = b + mean
            total = np.zeros_like(b)
            for tau in taus:
                centred = (tau + b) - avg
                if ("attn" in key or "mlp" in key) and not ("ln" in key or "bias" in key):
                    u, s, vh = _np_svd(centred)
                    r = max(1, int(params["rank_ratio"] * len(s))) if params["rank_ratio"] > 0 else 0
                    centred = u[:, :r] @ np.diag(s[:r]) @ vh[:r, :]
                total = total + centred
            out[key] = avg + params["scaling"] * total
            continue
        if b.ndim == 2 and "text_projection" not in key:
            merged = {"tsv_m": _ref_tsv, "iso_c": _ref_iso_c}[method](taus) if method != "iso_cts" else _ref_iso_cts(taus, params["common_space_fraction"])
        else:
            merged = mean
        out[key] = b + params["scaling"] * merged
    return out


# ---------------------------------------------------------------------------------------------------------------------
# Tiny state dicts with every tensor kind of an open_clip visual tower.


def _tiny(seed: int = 0, tasks: int = 3, spread: float = 0.1) -> tuple[dict, list[dict]]:
    """k = 8 (in_proj, T=3: r=2 with 2 empty TSV slots; Iso-CTS c=5, n=1), a wide k = 6 matrix, a [5, 8] positional
    embedding (Iso-CTS n=0), a 4-D conv, 1-D bias and LayerNorm, a 0-D scalar, a ``text_projection`` and an int buffer
    that the fine-tuned files change (it must come from θ₀)."""
    g = torch.Generator().manual_seed(seed)
    base = {
        "positional_embedding": torch.randn(5, 8, generator=g),
        "conv1.weight": torch.randn(8, 3, 2, 2, generator=g),
        "blocks.0.ln_1.weight": torch.randn(8, generator=g),
        "blocks.0.attn.in_proj_weight": torch.randn(24, 8, generator=g),
        "blocks.0.attn.in_proj_bias": torch.randn(24, generator=g),
        "blocks.0.mlp.c_fc.weight": torch.randn(6, 10, generator=g),
        "text_projection": torch.randn(8, 4, generator=g),
        "logit_scale": torch.tensor(4.6),
        "num_batches_tracked": torch.tensor([7]),
    }
    finetuned = []
    for i in range(tasks):
        finetuned.append({k: v + spread * torch.randn(v.shape, generator=g) if v.is_floating_point() else v + i + 1 for k, v in base.items()})
    return base, finetuned


PARAMS = {
    "tsv_m": [{"scaling": 1.0}, {"scaling": 0.7}],
    "iso_c": [{"scaling": 1.0}, {"scaling": 1.5}],
    "iso_cts": [{"scaling": 1.0, "common_space_fraction": 0.8}, {"scaling": 1.5, "common_space_fraction": 0.5}],
    "cart": [{"scaling": 2.0, "rank_ratio": 0.12}, {"scaling": 1.5, "rank_ratio": 0.3}],
}


def _merge(method: str, pretrained: dict, finetuned: list[dict], **overrides) -> dict[str, torch.Tensor]:
    m = get_method(method)
    return m.merge_state_dicts(pretrained, {f"t{i}": ft for i, ft in enumerate(finetuned)}, make_params(m, overrides))


@pytest.mark.parametrize("method,params", [(m, p) for m in SVD_METHODS for p in PARAMS[m]])
@pytest.mark.parametrize("seed", [0, 1])
def test_library_equals_a_plain_reference(method, params, seed):
    base, fts = _tiny(seed)
    merged = _merge(method, base, fts, **params)
    expected = _reference(method, base, fts, params)
    assert set(merged) == set(base)
    for k, v in merged.items():
        assert v.dtype == base[k].dtype, k
        np.testing.assert_allclose(v.double().numpy(), expected[k], atol=1e-5, rtol=1e-5, err_msg=f"{method} {k}")


# ---------------------------------------------------------------------------------------------------------------------
# Invariants (§12).


def _matrix_keys(state: dict) -> list[str]:
    return [k for k, v in state.items() if svd.is_matrix(k, v)]


def test_is_matrix_follows_the_official_rule():
    base, _ = _tiny()
    assert _matrix_keys(base) == ["positional_embedding", "blocks.0.attn.in_proj_weight", "blocks.0.mlp.c_fc.weight"]


@pytest.mark.parametrize("scaling", [1.0, 0.5])
def test_tsv_m_with_one_full_rank_task_returns_theta0_plus_alpha_tau(scaling):
    base, fts = _tiny(tasks=1)
    merged = _merge("tsv_m", base, fts, scaling=scaling)
    expected = tv.task_arithmetic(base, fts, scaling)
    for k in base:
        torch.testing.assert_close(merged[k], expected[k], atol=1e-5, rtol=1e-5)
    if scaling == 1.0:
        torch.testing.assert_close(merged["blocks.0.attn.in_proj_weight"], fts[0]["blocks.0.attn.in_proj_weight"], atol=1e-5, rtol=1e-5)


def test_tsv_m_on_mutually_orthogonal_tasks_is_task_arithmetic():
    """Task i lives on its own block of r = k/T left and right singular directions: the slots are already orthonormal,
    the polar factors change nothing, and TSV-M keeps every triplet, so merged = Σ_k τ_k."""
    g = torch.Generator().manual_seed(3)
    m, n, t = 12, 8, 2
    r = min(m, n) // t
    left, _ = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
    right, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    base = {"w": torch.randn(m, n, generator=g, dtype=torch.float64)}
    fts = []
    for i in range(t):
        s = torch.rand(r, generator=g, dtype=torch.float64) + 0.5
        tau = left[:, i * r : (i + 1) * r] @ torch.diag(s) @ right[:, i * r : (i + 1) * r].T
        fts.append({"w": base["w"] + tau})
    merged = _merge("tsv_m", base, fts, scaling=1.0)
    torch.testing.assert_close(merged["w"], tv.task_arithmetic(base, fts, 1.0)["w"], atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("scaling", [1.0, 1.5])
def test_iso_c_merged_update_has_one_singular_value(scaling):
    base, fts = _tiny()
    merged = _merge("iso_c", base, fts, scaling=scaling)
    for k in _matrix_keys(base):
        update = (merged[k] - base[k]).double()
        s = torch.linalg.svdvals(update)
        summed = sum(ft[k].double() - base[k].double() for ft in fts)
        expected = scaling * torch.linalg.svdvals(summed).mean()
        torch.testing.assert_close(s, torch.full_like(s, float(expected)), atol=1e-5, rtol=1e-5)


def test_iso_cts_merged_update_has_one_singular_value():
    base, fts = _tiny()
    merged = _merge("iso_cts", base, fts, scaling=1.0)
    for k in _matrix_keys(base):
        s = torch.linalg.svdvals((merged[k] - base[k]).double())
        assert float(s.max() - s.min()) < 1e-5, k


def test_iso_cts_with_the_whole_space_common_is_iso_c():
    base, fts = _tiny()
    a = _merge("iso_cts", base, fts, scaling=1.3, common_space_fraction=1.0)
    b = _merge("iso_c", base, fts, scaling=1.3)
    for k in base:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("k,t,fraction,sizes", [(768, 8, 0.8, (616, 19)), (32, 4, 0.8, (24, 2)), (32, 4, 0.6, (20, 3)), (17, 4, 0.6, (9, 2)),
                                                 (8, 3, 0.8, (5, 1)), (5, 3, 0.8, (5, 0)), (32, 4, 1.0, (32, 0))])
def test_iso_cts_subspace_sizes_as_the_official_code(k, t, fraction, sizes):
    assert subspace_sizes(k, t, fraction) == sizes
    c, n = sizes
    assert c + t * n == k


def test_iso_cts_refuses_a_negative_common_space_naming_the_tensor():
    g = torch.Generator().manual_seed(0)
    base = {"blocks.0.attn.out_proj.weight": torch.randn(12, 12, generator=g)}
    fts = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(8)]
    with pytest.raises(ConfigError, match=r"'blocks\.0\.attn\.out_proj\.weight'.*common_space_fraction"):
        _merge("iso_cts", base, fts, common_space_fraction=0.0)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_a_failed_svd_is_one_line_naming_the_tensor(method):
    """Finite float32 weights whose task vectors overflow (θ_k − θ₀ = inf) make LAPACK refuse the matrix."""
    base, fts = _tiny()
    key = "blocks.0.attn.in_proj_weight"
    base[key][0, 0] = -3e38
    fts[0][key][0, 0] = 3e38
    with pytest.raises(CheckpointError, match=r"^tensor 'blocks\.0\.attn\.in_proj_weight': the SVD failed \(.*\); check") as e:
        _merge(method, base, fts)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method", SVD_METHODS)
def test_task_order_does_not_matter(method):
    base, fts = _tiny(seed=2)
    a = _merge(method, base, fts)
    b = _merge(method, base, [fts[2], fts[0], fts[1]])
    for k in base:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("method", MEAN_METHODS)
def test_non_matrix_tensors_get_theta0_plus_alpha_mean(method):
    base, fts = _tiny()
    merged = _merge(method, base, fts, scaling=1.7)
    expected = tv.add_scaled(base, tv.task_vectors(base, fts), [1.7 / len(fts)] * len(fts))
    non_matrix = [k for k, v in base.items() if v.is_floating_point() and not svd.is_matrix(k, v)]
    assert set(non_matrix) == {"conv1.weight", "blocks.0.ln_1.weight", "blocks.0.attn.in_proj_bias", "text_projection", "logit_scale"}
    for k in non_matrix:
        torch.testing.assert_close(merged[k], expected[k], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("rank_ratio", [0.0, 1.0])
def test_cart_at_rank_ratio_zero_or_one_is_weight_averaging(rank_ratio):
    base, fts = _tiny()
    merged = _merge("cart", base, fts, scaling=2.0, rank_ratio=rank_ratio)
    expected = tv.weight_averaging(base, fts)
    for k in base:
        torch.testing.assert_close(merged[k], expected[k], atol=1e-5, rtol=1e-5)


def test_cart_changes_only_the_attn_and_mlp_matrices_from_weight_averaging():
    base, fts = _tiny()
    merged = _merge("cart", base, fts)
    wa = tv.weight_averaging(base, fts)
    low_rank = {"blocks.0.attn.in_proj_weight", "blocks.0.mlp.c_fc.weight"}
    for k in base:
        if k in low_rank:
            assert not torch.allclose(merged[k], wa[k], atol=1e-3), k
        else:
            assert torch.equal(merged[k], wa[k]), k


# ---------------------------------------------------------------------------------------------------------------------
# The zero-task rule (§0): a frozen tensor's task keeps its slots with the identity basis; T is not reduced.


def _with_a_frozen_task(seed: int = 4) -> tuple[dict, list[dict]]:
    base, fts = _tiny(seed)
    key = "blocks.0.attn.in_proj_weight"
    fts[1] = {**fts[1], key: base[key].clone()}
    return base, fts


@pytest.mark.parametrize("method", MEAN_METHODS)
def test_a_frozen_task_is_kept_with_the_lapack_identity_basis(method):
    base, fts = _with_a_frozen_task()
    key = "blocks.0.attn.in_proj_weight"
    params = PARAMS[method][0]
    kept = _merge(method, base, fts, **params)[key].double().numpy()
    np.testing.assert_allclose(kept, _reference(method, base, fts, params)[key], atol=1e-5, rtol=1e-5)
    if method != "iso_c":  # Iso-C's sum is the same either way; the slot methods see T (and the zero task's basis)
        dropped = _merge(method, base, [fts[0], fts[2]], **params)[key].double().numpy()
        assert not np.allclose(kept, dropped, atol=1e-3)


def test_thin_svd_sets_the_zero_matrix_basis_whatever_the_backend_returns(monkeypatch):
    """On a GPU cuSOLVER may return another basis for a zero matrix; ``thin_svd`` writes the CPU LAPACK one itself."""
    real = torch.linalg.svd

    def scrambled(a, full_matrices=True):
        u, s, vh = real(a, full_matrices=full_matrices)
        return -u.flip(-1), s, -vh.flip(-2)

    monkeypatch.setattr(torch.linalg, "svd", scrambled)
    stack = torch.stack([torch.randn(5, 3), torch.zeros(5, 3)])
    u, s, vh = svd.thin_svd(stack)
    assert torch.equal(u[1], torch.eye(5, 3)) and torch.equal(vh[1], torch.eye(3)) and torch.equal(s[1], torch.zeros(3))
    assert torch.equal(u[0], -real(stack[0], full_matrices=False)[0].flip(-1))  # a non-zero matrix keeps the backend's basis
    u, s, vh = svd.thin_svd(torch.zeros(2, 4))
    assert torch.equal(u, torch.eye(2)) and torch.equal(vh, torch.eye(2, 4)) and torch.equal(s, torch.zeros(2))


@pytest.mark.parametrize("method", SVD_METHODS)
def test_a_key_whose_task_vectors_are_all_zero_stays_at_theta0(method):
    base, fts = _tiny()
    for key in ("blocks.0.attn.in_proj_weight", "positional_embedding", "conv1.weight"):
        fts = [{**ft, key: base[key].clone()} for ft in fts]
    merged = _merge(method, base, fts)
    for key in ("blocks.0.attn.in_proj_weight", "positional_embedding", "conv1.weight"):
        assert torch.equal(merged[key], base[key]), key


# ---------------------------------------------------------------------------------------------------------------------
# dtypes and non-float entries.


@pytest.mark.parametrize("method", SVD_METHODS)
def test_dtypes_kept_and_non_float_entries_copied_from_theta0(method):
    base, fts = _tiny()
    for key, dt in (("blocks.0.attn.in_proj_weight", torch.float16), ("blocks.0.mlp.c_fc.weight", torch.bfloat16), ("blocks.0.ln_1.weight", torch.float64)):
        base[key] = base[key].to(dt)
        for ft in fts:
            ft[key] = ft[key].to(dt)
    merged = _merge(method, base, fts)
    for k, v in base.items():
        assert merged[k].dtype == v.dtype, k
    assert torch.equal(merged["num_batches_tracked"], base["num_batches_tracked"])
    assert all(not torch.equal(ft["num_batches_tracked"], base["num_batches_tracked"]) for ft in fts)
    as_float32 = _merge(method, {k: v.float() if v.is_floating_point() else v for k, v in base.items()},
                        [{k: v.float() if v.is_floating_point() else v for k, v in ft.items()} for ft in fts])
    torch.testing.assert_close(merged["blocks.0.attn.in_proj_weight"], as_float32["blocks.0.attn.in_proj_weight"].half(), atol=2e-3, rtol=2e-3)


def test_every_hyperparameter_has_help_a_unit_and_its_source():
    for method in SVD_METHODS:
        m = get_method(method)
        assert m.title and m.paper_url.startswith("https://arxiv.org/abs/")
        for h in specs(m):
            assert h.help and h.unit and "algorithms_frontier.md" in h.help, (method, h.name)
    off = {"dare": 0.0, "dare_seed": 0, "lines": False, "lines_alpha": None, "lines_beta": 0.5}  # DARE, LiNeS off (tests/test_modifiers.py)
    assert {h.name: h.default for h in specs(get_method("iso_cts"))} == {"scaling": 1.0, "common_space_fraction": 0.8, **off}
    assert {h.name: h.default for h in specs(get_method("cart"))} == {"scaling": 2.0, "rank_ratio": 0.12, **off}
    with pytest.raises(ConfigError, match="common_space_fraction"):
        make_params(get_method("iso_cts"), {"common_space_fraction": "1.2"})
    with pytest.raises(ConfigError, match="rank_ratio"):
        make_params(get_method("cart"), {"rank_ratio": "-0.1"})


# ---------------------------------------------------------------------------------------------------------------------
# The same merge through runs and through the merge CLI.


@pytest.mark.parametrize("method", SVD_METHODS)
def test_run_on_the_tiny_suite_uses_the_library_merge(method, tmp_path):
    suite = random_suite()
    model = build_model(RunConfig("random", method), suite, tmp_path, "cpu")[0]
    expected = get_method(method).merge_state_dicts(suite.pretrained, suite.finetuned, make_params(get_method(method)))
    state = model.encoder.state_dict()
    for k, v in expected.items():
        assert torch.equal(state[k], v), k
    result = run(RunConfig("random", method), suite, tmp_path, "cpu")
    assert result["method"] == method and set(result["accuracy"]) == set(suite.tasks)
    assert all(0.0 <= a <= 100.0 for a in result["accuracy"].values()) and math.isfinite(result["average"])


@pytest.mark.parametrize("method,sets", [("tsv_m", ["scaling=1.5"]), ("iso_c", ["scaling=1.5"]),
                                         ("iso_cts", ["scaling=1.2", "common_space_fraction=0.5"]), ("cart", ["scaling=1.5", "rank_ratio=0.4"])])
def test_merge_cli_writes_the_library_merge(method, sets, tmp_path):
    base, fts = _tiny()
    save_file(base, tmp_path / "pre.safetensors")
    args = ["merge", "--method", method, "--pretrained", str(tmp_path / "pre.safetensors"), "--finetuned"]
    for i, ft in enumerate(fts):
        save_file(ft, tmp_path / f"t{i}.safetensors")
        args.append(f"t{i}={tmp_path / f't{i}.safetensors'}")
    for s in sets:
        args += ["--set", s]
    out = tmp_path / "merged.safetensors"
    assert main([*args, "--out", str(out)]) == 0
    written = load_file(out)
    expected = _merge(method, base, fts, **dict(s.split("=") for s in sets))
    assert set(written) == set(base)
    for k, v in expected.items():
        assert written[k].dtype == v.dtype and torch.equal(written[k], v), k
