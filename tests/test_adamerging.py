"""AdaMerging (algorithms.md §1): init equals task arithmetic / TIES at 0.3, entropy falls, clamping holds."""

import pytest
import torch

from merging.adaptation import entropy
from merging.errors import ConfigError
from merging.methods import RunContext, get_method, make_params

ADA = get_method("adamerging")


def _logits(model, suite, task, n=12):
    data = suite.data[task]
    with torch.no_grad():
        return model.logits(data.preprocess(data.test_images[:n]), task)


def _adapt(suite, **overrides):
    params = make_params(ADA, overrides, "fast")
    model = ADA.build(suite, params)
    return model, ADA.adapt(model.train(), suite, params, RunContext(seed=0))


@torch.no_grad()
def _mean_entropy(model, suite):
    """Sum over tasks of the mean entropy on each whole test set (deterministic, unlike the batch curve)."""
    total = 0.0
    for t in model.tasks:
        data = suite.data[t]
        total += float(entropy(model.logits(data.preprocess(data.test_images), t)))
    return total


@pytest.mark.parametrize("granularity", ["task", "layer"])
def test_init_equals_task_arithmetic_and_ties(tiny_suite, granularity):
    for vectors, static, static_params in [("task_arithmetic", "task_arithmetic", {"scaling": 0.3}), ("ties", "ties", {"scaling": 0.3, "density": 0.2})]:
        ada = ADA.build(tiny_suite, make_params(ADA, {"granularity": granularity, "vectors": vectors}))
        ref = get_method(static).build(tiny_suite, make_params(get_method(static), static_params))
        for t in tiny_suite.tasks:
            assert torch.allclose(_logits(ada, tiny_suite, t), _logits(ref, tiny_suite, t), atol=1e-5)
    assert [n for n, p in ada.named_parameters() if p.requires_grad] == ["encoder.coefficients"]


def test_coefficient_shapes_and_info(tiny_suite):
    model, info = _adapt(tiny_suite, steps=3, granularity="layer")
    n_float = sum(v.is_floating_point() for v in tiny_suite.pretrained.values())
    assert model.encoder.coefficients.shape == (n_float, 3)
    assert len(info["coefficients"]) == len(info["tensor_names"]) == n_float
    assert all(len(row) == 3 for row in info["coefficients"])
    assert info["tensor_names"][0] in tiny_suite.pretrained
    assert len(info["entropy"]) == 3
    _, info = _adapt(tiny_suite, steps=2, granularity="task")
    assert info["tensor_names"] == ["all"] and len(info["coefficients"]) == 1 and len(info["coefficients"][0]) == 3


def test_clamping_holds_with_a_large_lr(tiny_suite):
    model, info = _adapt(tiny_suite, steps=6, lr=1.0)
    raw = model.encoder.coefficients.detach()
    assert (raw < 0).any() or (raw > 1).any()  # the large lr pushed some raw values out of [0, 1] ...
    lam = torch.tensor(info["coefficients"])
    assert lam.min() >= 0.0 and lam.max() <= 1.0  # ... and what the forward uses is clamped
    assert torch.equal(lam, raw.clamp(0, 1))


def test_entropy_decreases_on_micro(micro_suite):
    init = ADA.build(micro_suite, make_params(ADA, {}, "fast"))
    model, info = _adapt(micro_suite, steps=25)
    before, after = _mean_entropy(init, micro_suite), _mean_entropy(model, micro_suite)
    assert after < before - 0.05, (before, after)
    assert sum(info["entropy"][-3:]) < sum(info["entropy"][:3])
    assert not torch.allclose(model.encoder.lambdas(), torch.full_like(model.encoder.lambdas(), 0.3))


def test_bad_params():
    with pytest.raises(ConfigError, match="granularity"):
        make_params(ADA, {"granularity": "block"})
    with pytest.raises(ConfigError, match="vectors"):
        make_params(ADA, {"vectors": "dare"})


@pytest.mark.parametrize("granularity", ["layer", "task"])
def test_per_task_backward_gives_the_gradient_of_the_summed_entropy(tiny_suite, granularity):
    from merging.methods.adamerging import entropy_backward, entropy_loss

    model = ADA.build(tiny_suite, make_params(ADA, {"granularity": granularity}, "fast"))
    gen = torch.Generator().manual_seed(0)
    batches = {t: [tiny_suite.data[t].preprocess(tiny_suite.data[t].test_images[torch.randperm(24, generator=gen)[:6]]) for _ in range(2)]
               for t in tiny_suite.tasks}
    coefficients = model.encoder.coefficients
    loss = entropy_loss(model, batches)
    loss.backward()
    summed = coefficients.grad.clone()
    coefficients.grad = None
    parts = entropy_backward(model, batches)
    torch.testing.assert_close(coefficients.grad, summed, rtol=1e-5, atol=1e-7)
    assert sum(parts.values()) == pytest.approx(float(loss), rel=1e-6) and set(parts) == set(tiny_suite.tasks)
