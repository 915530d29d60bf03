"""WEMoE: the zero-router invariant, batched = per-sample reference, routing shapes, E-WEMoE pruning, training."""

import pytest
import torch
import torch.nn.functional as F

from merging import task_vectors as tv
from merging.adaptation import entropy
from merging.methods.base import RunContext
from merging.methods.wemoe import WEMoE, WEMoEParams, build_wemoe, parse_blocks, prune_magnitude
from merging.model import StaticModel
from merging.runs import RunConfig, count_parameters, load_model, run


def _images(suite, task="a", n=8):
    return suite.data[task].preprocess(suite.data[task].test_images[:n])


def _zero_routers(model):
    for layer in model.moe_layers():
        if layer.router.depth:
            for m in layer.router.net:
                if isinstance(m, torch.nn.Linear):
                    torch.nn.init.zeros_(m.weight)


def _randomize_routers(model, std=0.5):
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * std)


def reference_mlp(layer, x):
    """The paper's per-sample path: build W(x) = W0 + sum_k r_k tau_k for each sample, run a functional MLP."""
    outs = []
    for b in range(x.shape[0]):
        r = layer.router(x[b : b + 1])[0]
        w = {}
        for name in ("c_fc", "c_proj"):
            taus = [layer.task_vector(name, k) for k in range(len(r))]
            w[name] = (
                getattr(layer, f"{name}_weight") + sum(r[k] * t[0] for k, t in enumerate(taus)),
                getattr(layer, f"{name}_bias") + sum(r[k] * t[1] for k, t in enumerate(taus)),
            )
        h = layer.act(F.linear(x[b], *w["c_fc"]))
        outs.append(F.linear(h, *w["c_proj"]))
    return torch.stack(outs)


@pytest.mark.parametrize("depth,blocks", [(2, "all"), (1, "last1"), (0, "0")])
def test_zero_router_equals_task_arithmetic(tiny_suite, depth, blocks):
    lam = 0.45
    model = build_wemoe(tiny_suite, WEMoEParams(init_lambda=lam, router_depth=depth, blocks=blocks))
    _zero_routers(model)
    ta = StaticModel(tiny_suite.build_encoder(), tv.task_arithmetic(tiny_suite.pretrained, list(tiny_suite.finetuned.values()), lam), tiny_suite.tasks, tiny_suite.make_heads())
    x = _images(tiny_suite)
    with torch.no_grad():
        for task in tiny_suite.tasks:
            assert torch.allclose(model.logits(x, task), ta.logits(x, task), atol=1e-5)
        weights = model.routing_weights(x, "a")
    assert weights.shape == (8, len(model.moe_blocks), 3)
    assert torch.allclose(weights, torch.full_like(weights, lam))


def test_batched_equals_per_sample_reference(tiny_suite):
    model = build_wemoe(tiny_suite, WEMoEParams())
    _randomize_routers(model)
    x = _images(tiny_suite)
    layer = model.moe_layers()[0]
    tokens = torch.randn(5, 7, layer.c_fc_weight.shape[1])
    with torch.no_grad():
        assert torch.allclose(layer(tokens), reference_mlp(layer, tokens), atol=1e-5)
        batched = model.logits(x, "b")
        routing = model.routing_weights(x, "b")
        assert routing.std() > 0.1  # the routers really route differently per sample and task
        for m in model.moe_layers():
            m.forward = lambda t, m=m: reference_mlp(m, t)
        assert torch.allclose(batched, model.logits(x, "b"), atol=1e-4)


def test_parse_blocks():
    assert parse_blocks("all", 4) == [0, 1, 2, 3]
    assert parse_blocks("last2", 4) == [2, 3]
    assert parse_blocks("first1", 4) == [0]
    assert parse_blocks("3, 0", 4) == [0, 3]
    for bad in ("last5", "7", "middle"):
        with pytest.raises(Exception, match="blocks"):
            parse_blocks(bad, 4)


def test_prune_keeps_top_ten_percent(tiny_suite):
    v = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    kept = prune_magnitude(v, 0.9)
    assert int((kept != 0).sum()) == 100
    assert torch.equal(kept != 0, v.abs() >= v.abs().topk(100).values.min())
    model = build_wemoe(tiny_suite, WEMoEParams(prune=0.9, shared_router=True))
    for layer in model.moe_layers():
        assert layer.router is model.moe_layers()[0].router
        for name in ("c_fc", "c_proj"):
            tau = getattr(layer, f"{name}_tau_t")
            for k in range(tau.shape[0]):
                assert (tau[k] != 0).float().mean().item() == pytest.approx(0.1, abs=0.005)


def test_parameter_counts(tiny_suite):
    suite = tiny_suite
    width, hidden, T, L = 16, 32, 3, 2
    router = width * width + width + width * T + T
    mlp = 2 * width * hidden + hidden + width
    encoder = sum(p.numel() for p in suite.build_encoder().parameters())
    heads = sum(h["weight"].numel() + h["bias"].numel() for h in suite.heads.values())
    counts = count_parameters(build_wemoe(suite, WEMoEParams()))
    assert counts == {"trainable": L * router, "total": encoder + L * T * mlp + L * router + heads}
    assert count_parameters(build_wemoe(suite, WEMoEParams(shared_router=True)))["trainable"] == router


def test_entropy_decreases_on_micro(micro_suite):
    suite = micro_suite
    torch.manual_seed(0)
    model = build_wemoe(suite, WEMoEParams())
    xs = {t: suite.data[t].preprocess(suite.data[t].test_images[:64]) for t in suite.tasks}

    def total_entropy():
        with torch.no_grad():
            return sum(entropy(model.logits(xs[t], t)).item() for t in suite.tasks)

    before = total_entropy()
    info = WEMoE().adapt(model, suite, WEMoEParams(steps=40, lr=2e-3), RunContext())
    after = total_entropy()
    assert after < before - 0.1
    assert info["loss"][-1] < info["loss"][0]
    routing = torch.tensor(info["routing"]["colors"])
    assert routing.shape == (2, 3) and not torch.allclose(routing, torch.full_like(routing, 0.3), atol=1e-3)


def test_runs_and_caches_on_micro(micro_suite, micro_cache):
    config = RunConfig("micro", "wemoe", {"steps": 3, "prune": 0.9}, preset="fast")
    result = run(config, suite=micro_suite, cache_dir=micro_cache, device="cpu")
    assert run(config, suite=micro_suite, cache_dir=micro_cache, device="cpu")["created"] == result["created"]
    assert result["parameters"]["trainable"] == 2 * (32 * 32 + 32 + 32 * 3 + 3)
    assert len(result["info"]["loss"]) == 2 and set(result["info"]["routing"]) == set(micro_suite.tasks)
    model = load_model(result, micro_suite, cache_dir=micro_cache)
    x = _images(micro_suite, "digits", 16)
    from merging.evaluation import evaluate

    acc = evaluate(model, micro_suite, device="cpu")
    assert {t: s["accuracy"] for t, s in acc.items()} == pytest.approx(result["accuracy"])
    assert model.routing_weights(x, "digits").shape == (16, 2, 3)
