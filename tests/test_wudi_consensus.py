"""WUDI-Merging and Consensus merging with TALL masks against their recipes (algorithms_frontier.md §5, §6, §12)."""

from __future__ import annotations

import pytest
import torch

from merging import masks
from merging import task_vectors as tv
from merging.errors import ConfigError
from merging.methods.base import build_params
from merging.methods.consensus import Consensus, ConsensusParams, consensus_merge
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties
from merging.methods.wudi import WUDI_KEYS, Wudi, WudiParams, is_wudi_key, wudi_merge, wudi_objective, wudi_solve

REGISTRY = {"wudi": Wudi(), "consensus": Consensus(), "task_arithmetic": TaskArithmetic(), "ties": Ties()}


def _models(n: int = 3, seed: int = 0, dtype: torch.dtype = torch.float32, spread: float = 0.1):
    """A pretrained state dict with a matrix, a vector and an integer buffer, and ``n`` fine-tuned ones."""
    g = torch.Generator().manual_seed(seed)
    base = {"a": torch.randn(5, 4, generator=g, dtype=dtype), "b": torch.randn(6, generator=g, dtype=dtype), "step": torch.tensor(7)}
    fts = [{k: v + spread * torch.randn(v.shape, generator=g, dtype=dtype) if v.is_floating_point() else v + 1 for k, v in base.items()}
           for _ in range(n)]  # fmt: skip
    return base, fts


def _block_models(n: int = 3, seed: int = 0, spread: float = 1e-3):
    """A one-block open_clip-style state dict: the four WUDI matrices plus biases, LayerNorms and embeddings."""
    g = torch.Generator().manual_seed(seed)
    p = "transformer.resblocks.0."
    shapes = {
        "class_embedding": (8,), "positional_embedding": (5, 8), "proj": (8, 4), "conv1.weight": (8, 3, 2, 2),
        p + "ln_1.weight": (8,), p + "attn.in_proj_weight": (24, 8), p + "attn.in_proj_bias": (24,),
        p + "attn.out_proj.weight": (8, 8), p + "attn.out_proj.bias": (8,), p + "mlp.c_fc.weight": (16, 8),
        p + "mlp.c_fc.bias": (16,), p + "mlp.c_proj.weight": (8, 16), p + "mlp.c_proj.bias": (8,),
    }  # fmt: skip
    base = {k: torch.randn(s, generator=g) for k, s in shapes.items()}
    fts = {f"t{i}": {k: v + spread * torch.randn(v.shape, generator=g) for k, v in base.items()} for i in range(n)}
    return base, fts


# ---------------------------------------------------------------- TALL masks and Consensus (§6)


def _loop_masks(vectors, multi, lambdas):
    """Plain Python, entry by entry: keep j for task t when |τ_t[j]| > λ_t·|τ_MTL[j] − τ_t[j]|."""
    out = []
    for vec, lam in zip(vectors, lambdas, strict=True):
        mask = {}
        for k in multi:
            flat_t, flat_m = vec[k].reshape(-1).tolist(), multi[k].reshape(-1).tolist()
            mask[k] = torch.tensor([abs(t) > abs(m - t) * lam for t, m in zip(flat_t, flat_m, strict=True)]).reshape(multi[k].shape)
        out.append(mask)
    return out


def test_tall_masks_equal_a_plain_loop():
    base, fts = _models(n=4, dtype=torch.float64)  # float64: Python floats round exactly like the tensors
    vectors, multi = masks.multi_task_vector(base, fts, "task_arithmetic")
    lambdas = [0.2, 0.35, 0.5, 0.6]
    expected = _loop_masks(vectors, multi, lambdas)
    got = masks.tall_masks(vectors, multi, lambdas)
    for e, m in zip(expected, got, strict=True):
        assert set(m) == {"a", "b"}
        for k in m:
            assert m[k].dtype == torch.bool and torch.equal(m[k], e[k])
    assert 0 < sum(int(m[k].sum()) for m in got for k in m) < sum(m[k].numel() for m in got for k in m)  # a real mix
    counts = masks.mask_counts(vectors, multi, lambdas)
    for k in counts:
        assert torch.equal(counts[k], sum(e[k].int() for e in expected))


def test_tall_mask_is_strict_and_lambda_zero_keeps_every_nonzero_entry():
    vec = {"w": torch.tensor([1.0, 0.0, -2.0, 0.5])}
    multi = {"w": torch.tensor([3.0, 1.0, -2.0, 1.5])}  # |τ_MTL − τ| = 2, 1, 0, 1
    assert masks.tall_mask(vec, multi, 0.5)["w"].tolist() == [False, False, True, False]  # 1 > 1 and 0.5 > 0.5 are false
    assert masks.tall_mask(vec, multi, 0.0)["w"].tolist() == [True, False, True, True]


def test_consensus_k1_keeps_every_entry_some_mask_keeps_and_k_above_t_keeps_none():
    base, fts = _models(n=3, seed=2, dtype=torch.float64)
    vectors, multi = masks.multi_task_vector(base, fts, "task_arithmetic")
    expected = _loop_masks(vectors, multi, [0.4] * 3)
    any_mask = {k: torch.stack([e[k] for e in expected]).any(0) for k in multi}
    keep1 = masks.consensus_mask(vectors, multi, 0.4, 1)
    for k in multi:
        assert torch.equal(keep1[k], any_mask[k])
    keep2 = masks.consensus_mask(vectors, multi, 0.4, 2)
    assert all(torch.equal(keep2[k] & ~keep1[k], torch.zeros_like(keep2[k])) for k in multi)  # k=2 keeps a subset of k=1
    assert not all(torch.equal(keep2[k], keep1[k]) for k in multi)
    none = consensus_merge(base, fts, k=4, tall_lambda=0.4, scaling=0.7)
    for k in base:
        assert torch.equal(none[k], base[k])  # k > T: the pretrained model


def test_consensus_formula_with_k2():
    base, fts = _models(n=4, seed=3, dtype=torch.float64)
    vectors, multi = masks.multi_task_vector(base, fts, "task_arithmetic")
    expected = _loop_masks(vectors, multi, [0.4] * 4)
    merged = consensus_merge(base, fts, k=2, tall_lambda=0.4, scaling=0.3)
    for k in ("a", "b"):
        keep = sum(e[k].int() for e in expected) >= 2
        tau_sum = sum(f[k] - base[k] for f in fts)
        assert torch.allclose(merged[k], base[k] + 0.3 * tau_sum * keep, atol=1e-12)
    assert torch.equal(merged["step"], base["step"])  # integer tensors come from the pretrained file


def test_consensus_ta_with_all_masks_full_equals_task_arithmetic():
    base, fts = _models(n=3, seed=4)
    # λ = 0 and no zero entry: every mask is full, so any k <= T keeps everything.
    for k in (0, 3):
        merged = Consensus().merge_state_dicts(base, {f"t{i}": f for i, f in enumerate(fts)}, ConsensusParams(k=k, tall_lambda=0.0, scaling=0.3))
        ta = tv.task_arithmetic(base, fts, 0.3)
        for key in base:
            assert torch.allclose(merged[key], ta[key], atol=1e-6)
            assert merged[key].dtype == base[key].dtype


def test_consensus_ties_k0_equals_ties_and_masks_compare_untrimmed_vectors():
    base, fts = _models(n=3, seed=5)
    merged = consensus_merge(base, fts, k=0, tall_lambda=0.4, vectors="ties", scaling=0.3, density=0.2)
    ties = tv.ties(base, fts, 0.3, 0.2)
    for key in base:
        assert torch.allclose(merged[key], ties[key], atol=1e-6)
    vectors, multi = masks.multi_task_vector(base, fts, "ties", 0.2)
    raw = tv.task_vectors(base, fts)
    for v, r in zip(vectors, raw, strict=True):
        assert all(torch.equal(v[k], r[k]) for k in r)  # untrimmed τ_t, as the official TIES branch
    kept = tv.ties_vectors(base, fts, 0.2)
    assert all(torch.allclose(multi[k], sum(v[k] for v in kept), atol=1e-7) for k in multi)


def test_consensus_params_and_errors():
    method = REGISTRY["consensus"]
    params = build_params(method, {"k": "3", "tall_lambda": "0.6", "vectors": "ties"}, None, REGISTRY)
    assert (params.k, params.tall_lambda, params.vectors) == (3, 0.6, "ties")
    for bad in ({"k": -1}, {"tall_lambda": -0.1}, {"vectors": "dare"}, {"density": 1.5}):
        with pytest.raises(ConfigError, match=f"'{next(iter(bad))}'"):
            build_params(method, bad, None, REGISTRY)
    base, fts = _models(n=2)
    vectors, multi = masks.multi_task_vector(base, fts)
    with pytest.raises(ConfigError, match="tall_lambda: got 3 values for 2 tasks"):
        masks.tall_masks(vectors, multi, [0.2, 0.3, 0.4])


def test_consensus_builds_a_model_on_the_tiny_suite(tiny_suite):
    model = Consensus().build(tiny_suite, ConsensusParams())
    d = tiny_suite.data["a"]
    with torch.no_grad():
        logits = model.logits(d.preprocess(d.test_images[:4]), "a")
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()


# ---------------------------------------------------------------- WUDI (§5)


def _official_loop(vectors: torch.Tensor, steps: int, lr: float) -> torch.Tensor:
    """The official update written out plainly: autograd on Σ_t ‖(x − τ_t) τ_tᵀ‖² / ‖τ_t‖², torch Adam."""
    x = torch.nn.Parameter(vectors.sum(0).clone())
    optimizer = torch.optim.Adam([x], lr=lr, weight_decay=0)
    for _ in range(steps):
        loss = sum(((x - t) @ t.T).square().sum() / t.square().sum() for t in vectors)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return x.detach()


def test_wudi_update_matches_a_plain_autograd_adam_loop():
    g = torch.Generator().manual_seed(0)
    vectors = 1e-2 * torch.randn(3, 6, 4, generator=g)
    for steps, lr in ((5, 1e-3), (20, 1e-5)):
        got = wudi_solve(vectors, steps, lr)
        want = _official_loop(vectors, steps, lr)
        assert (got - vectors.sum(0)).abs().max() > 0.5 * steps * lr  # it really moved
        assert torch.allclose(got, want, atol=1e-5, rtol=0)


def test_wudi_objective_decreases_over_its_steps():
    g = torch.Generator().manual_seed(1)
    vectors = 1e-3 * torch.randn(4, 12, 8, generator=g)
    losses = [wudi_objective(wudi_solve(vectors, s), vectors).item() for s in (0, 1, 10, 50, 150, 300)]
    assert all(later < earlier for earlier, later in zip(losses, losses[1:], strict=False)), losses
    assert losses[-1] < 0.7 * losses[0], losses


def test_wudi_zero_steps_is_the_sum_of_task_vectors_on_linear_keys_and_pretrained_elsewhere():
    base, fts = _block_models()
    merged = Wudi().merge_state_dicts(base, fts, WudiParams(steps=0))
    for k, v in base.items():
        if is_wudi_key(k):
            assert torch.allclose(merged[k], v + sum(f[k] - v for f in fts.values()), atol=1e-7)
        else:
            assert torch.equal(merged[k], v)


def test_wudi_non_linear_keys_stay_pretrained_and_linear_keys_move():
    base, fts = _block_models()
    merged = Wudi().merge_state_dicts(base, fts, WudiParams(steps=30))
    linear = [k for k in base if is_wudi_key(k)]
    assert len(linear) == 4 and all(any(s in k for k in linear) for s in WUDI_KEYS)
    for k, v in base.items():
        if k in linear:
            assert not torch.allclose(merged[k], v + sum(f[k] - v for f in fts.values()), atol=1e-7)
        else:  # biases, LayerNorms, embeddings, conv1, proj: θ₀ (the official apply_to skips them)
            assert torch.equal(merged[k], v)


def test_wudi_is_invariant_to_task_order_and_deterministic():
    base, fts = _block_models(n=4, seed=2)
    params = WudiParams(steps=50)
    a = Wudi().merge_state_dicts(base, fts, params)
    b = Wudi().merge_state_dicts(base, dict(reversed(list(fts.items()))), params)
    again = Wudi().merge_state_dicts(base, fts, params)
    for k in base:
        assert torch.allclose(a[k], b[k], atol=1e-6)
        assert torch.equal(a[k], again[k])


def test_wudi_one_task_returns_the_finetuned_linear_weights():
    base, fts = _block_models(n=1)
    (ft,) = fts.values()
    merged = Wudi().merge_state_dicts(base, fts, WudiParams())
    for k in base:
        assert torch.equal(merged[k], ft[k] if is_wudi_key(k) else base[k])


def test_wudi_drops_zero_tasks_from_its_loss():
    base, fts = _block_models(n=3, seed=3)
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    frozen = dict(fts["t2"], **{key: base[key].clone()})
    with_zero = wudi_merge(base, [fts["t0"], fts["t1"], frozen], steps=40)
    without = wudi_merge(base, [fts["t0"], fts["t1"]], steps=40)
    assert torch.isfinite(with_zero[key]).all()
    assert torch.equal(with_zero[key], without[key])  # a zero task neither adds a NaN nor moves the solution
    all_zero = wudi_merge(base, [dict(f, **{key: base[key].clone()}) for f in fts.values()], steps=40)
    assert torch.equal(all_zero[key], base[key])  # a key no task changed stays at θ₀


def test_wudi_keeps_dtypes_and_builds_a_model_on_the_tiny_suite(tiny_suite):
    half = {k: v.half() for k, v in tiny_suite.pretrained.items()}
    merged = wudi_merge(half, [{k: v.half() for k, v in f.items()} for f in tiny_suite.finetuned.values()], steps=5)
    assert all(merged[k].dtype == torch.float16 for k in half)
    model = Wudi().build(tiny_suite, build_params(REGISTRY["wudi"], {"steps": "10"}, None, REGISTRY))
    d = tiny_suite.data["b"]
    with torch.no_grad():
        logits = model.logits(d.preprocess(d.test_images[:4]), "b")
    assert logits.shape == (4, 4) and torch.isfinite(logits).all()


def test_wudi_errors_name_the_problem():
    method = REGISTRY["wudi"]
    for bad in ({"steps": -1}, {"lr": 0.0}, {"steps": "many"}):
        with pytest.raises(ConfigError, match=f"'{next(iter(bad))}'"):
            build_params(method, bad, None, REGISTRY)
    base, fts = _models()
    with pytest.raises(ConfigError, match="no block linear weight"):
        wudi_merge(base, fts)
    with pytest.raises(ConfigError, match="expected a 2-D weight matrix"):
        wudi_merge({"mlp.c_fc.weight": torch.zeros(2, 2, 2)}, [{"mlp.c_fc.weight": torch.ones(2, 2, 2)}])
