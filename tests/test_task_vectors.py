"""The static merges equal their formulas (algorithms.md §1), on hand-made tensors and state dicts."""

import pytest
import torch

from merging import task_vectors as tv


def _sd(*values):
    return {"w": torch.tensor(values, dtype=torch.float32)}


def _models(seed=0, n=3, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    base = {"a": torch.randn(4, 5, generator=g).to(dtype), "b": torch.randn(7, generator=g).to(dtype), "step": torch.tensor(3)}
    fts = [{k: (v + 0.1 * torch.randn(v.shape, generator=g).to(dtype)) if v.is_floating_point() else v + 1 for k, v in base.items()} for _ in range(n)]
    return base, fts


def test_weight_averaging_is_the_mean_of_finetuned_weights():
    base, fts = _models()
    merged = tv.weight_averaging(base, fts)
    for k in ("a", "b"):
        assert torch.allclose(merged[k], torch.stack([f[k] for f in fts]).mean(0), atol=1e-6)
    assert torch.equal(merged["step"], base["step"])  # integer tensors come from the pretrained file


def test_task_arithmetic_with_one_over_t_equals_weight_averaging():
    base, fts = _models(n=4)
    ta = tv.task_arithmetic(base, fts, 1 / 4)
    wa = tv.weight_averaging(base, fts)
    for k in ("a", "b"):
        assert torch.allclose(ta[k], wa[k], atol=1e-6)


def test_task_arithmetic_formula():
    base, fts = _models()
    merged = tv.task_arithmetic(base, fts, 0.3)
    expected = base["a"] + 0.3 * sum(f["a"] - base["a"] for f in fts)
    assert torch.allclose(merged["a"], expected, atol=1e-6)


def test_merging_one_model_with_scaling_one_returns_it():
    base, fts = _models(n=1)
    for merged in (tv.task_arithmetic(base, fts, 1.0), tv.ties(base, fts, 1.0, 1.0), tv.weight_averaging(base, fts)):
        for k in ("a", "b"):
            assert torch.allclose(merged[k], fts[0][k], atol=1e-6)


def test_ties_density_one_without_sign_conflicts_equals_task_arithmetic():
    g = torch.Generator().manual_seed(1)
    base = {"a": torch.randn(6, 3, generator=g), "b": torch.randn(5, generator=g)}
    signs = {k: torch.sign(torch.randn(v.shape, generator=g)) for k, v in base.items()}
    fts = [{k: v + signs[k] * torch.rand(v.shape, generator=g) for k, v in base.items()} for _ in range(3)]
    ties = tv.ties(base, fts, scaling=0.3, density=1.0)
    ta = tv.task_arithmetic(base, fts, 0.3)
    for k in base:
        assert torch.allclose(ties[k], ta[k], atol=1e-6)


def test_trim_keeps_int_d_density_plus_one_entries():
    flat = torch.tensor([0.5, -3.0, 1.0, 2.0, -0.1, 4.0, 0.2, -6.0, 0.7, 9.0])
    mask = tv.trim_mask(flat, 0.2)  # d=10, k = 10 - 2 = 8: threshold = 8th smallest |v| = 4.0
    assert mask.sum().item() == 3
    assert set(torch.nonzero(mask).flatten().tolist()) == {5, 7, 9}
    assert tv.trim_mask(flat, 1.0).all()


def test_elect_sign_zero_takes_majority_sign():
    trimmed = torch.tensor([[1.0, -2.0, 0.0, 3.0], [-1.0, -1.0, 0.0, 1.0]])
    # column sums: 0, -3, 0, 4 -> signs 0, -1, 0, +1 ; majority sign = sign(-1 + 1) = 0 -> zeros stay 0
    assert tv.elect_sign(trimmed).tolist() == [0.0, -1.0, 0.0, 1.0]
    trimmed = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 1.0, 5.0]])
    # sums 0, 3, 5 -> 0, +1, +1; majority +1 -> first becomes +1
    assert tv.elect_sign(trimmed).tolist() == [1.0, 1.0, 1.0]


def test_ties_hand_computed():
    base = {"w": torch.zeros(4)}
    fts = [_sd(3.0, -1.0, 0.5, 2.0), _sd(-2.0, -4.0, 0.1, 1.0)]
    # density 0.5: d=4, k=2. model 1 |v| = [3,1,.5,2], 2nd smallest 1 -> keep >=1: [3,-1,0,2]
    # model 2 |v| = [2,4,.1,1], 2nd smallest 1 -> keep >=1: [-2,-4,0,1]
    # sums: [1,-5,0,3] -> signs [+,-,0->majority(+1-1+1=+1)... ,+]
    merged = tv.ties(base, fts, scaling=1.0, density=0.5)
    # disjoint sum: col0 (+): 3 ; col1 (-): -1-4=-5 ; col2: 0 ; col3 (+): 2+1=3
    assert merged["w"].tolist() == [3.0, -5.0, 0.0, 3.0]


def test_ties_per_tensor_trims_each_tensor():
    base = {"a": torch.zeros(4), "b": torch.zeros(4)}
    fts = [{"a": torch.tensor([10.0, 9.0, 8.0, 7.0]), "b": torch.tensor([0.4, 0.3, 0.2, 0.1])}]
    glob = tv.ties(base, fts, 1.0, 0.25)
    per = tv.ties(base, fts, 1.0, 0.25, per_tensor=True)
    assert glob["b"].abs().sum() == 0  # globally the small tensor is trimmed away
    assert per["b"].tolist() == pytest.approx([0.4, 0.3, 0.0, 0.0])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_merges_keep_dtype(dtype):
    base, fts = _models(dtype=dtype)
    for merged in (tv.weight_averaging(base, fts), tv.task_arithmetic(base, fts, 0.3), tv.ties(base, fts, 0.3, 0.2)):
        assert merged["a"].dtype == dtype and merged["step"].dtype == torch.int64


def test_streamed_ties_equals_the_official_flattened_computation():
    """``_ties_rows`` works key by key; the official code stacks the flattened task vectors (ties_merging_utils.py):
    trim each row at its k-th smallest |v|, elect sign(sum) with exact zeros set to the majority sign, keep the agreeing
    entries. Both must give the same per-task vectors and merge, including zeros filled by the majority sign."""
    gen = torch.Generator().manual_seed(3)
    pre = {"a.weight": torch.randn(6, 5, generator=gen), "a.bias": torch.randn(5, generator=gen), "step": torch.tensor(4)}
    fts = [{k: (v + torch.randn(v.shape, generator=gen) if v.is_floating_point() else v) for k, v in pre.items()} for _ in range(3)]
    fts[1]["a.bias"][0] = pre["a.bias"][0] - (fts[0]["a.bias"][0] - pre["a.bias"][0])  # two tasks cancel: a zero sum
    fts[2]["a.bias"][0] = pre["a.bias"][0]
    keys = tv.float_keys(pre)
    for density in (0.3, 0.7, 1.0):
        stacked = torch.stack([tv.flatten(v, keys) for v in tv.task_vectors(pre, fts)])
        kept = stacked * torch.stack([row.abs() >= row.abs().kthvalue(row.numel() - int(row.numel() * density)).values if density < 1 else
                                      torch.ones_like(row, dtype=torch.bool) for row in stacked])
        sign = torch.sign(kept.sum(0))
        sign[sign == 0] = torch.sign(sign.sum())
        reference = kept * torch.where(sign > 0, kept > 0, kept < 0)
        got = tv.ties_vectors(pre, fts, density)
        for i in range(3):
            assert torch.equal(tv.flatten(got[i], keys), reference[i])
        merged = tv.ties(pre, fts, 0.4, density)
        expected = tv.unflatten(tv.flatten(pre, keys) + 0.4 * reference.sum(0), pre, keys)
        for k in keys:
            torch.testing.assert_close(merged[k], expected[k], rtol=0, atol=1e-6)
        assert torch.equal(merged["step"], pre["step"])
