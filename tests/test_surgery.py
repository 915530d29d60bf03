"""Representation Surgery and SurgeryV2 (algorithms.md §2): U = 0 is the base merge, training lowers the
representation bias, cached-feature training equals re-running the encoders, any base runs and caches."""

import copy

import pytest
import torch
import torch.nn.functional as F

from merging import feature_cache
from merging.errors import ConfigError
from merging.methods import RunContext, get_method, make_params
from merging.methods.surgery import SurgeryModel, fit_cached, index_schedule, individual_model
from merging.metrics import mean_l1
from merging.model import MultiTaskModel
from merging.runs import RunConfig, build_model, load_model, run, run_dir

SURGERY = get_method("surgery")


def _images(suite, task, n=12):
    data = suite.data[task]
    return data.preprocess(data.test_images[:n])


def _build(suite, **overrides):
    """Surgery with its base resolved the way a run resolves it (``merging.runs.build_model``)."""
    model, _, params, _ = build_model(RunConfig(suite.name, "surgery", overrides, "fast"), suite, device="cpu")
    return model, params


def reference_fit(model: SurgeryModel, individual, suite, schedule, lr: float) -> None:
    """The original training loop: both encoders re-run on the batch's images at every step."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr)
    for iteration in schedule:
        for task, idx in iteration:
            images = suite.data[task].preprocess(suite.data[task].test_images[idx])
            with torch.no_grad():
                z = model.base.encode(images, task)
                target = individual.encode(images, task)
            loss = F.l1_loss(model.final[task](z), target)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()


@pytest.mark.parametrize("base", ["task_arithmetic", "ties", "weight_averaging"])
def test_step0_equals_base_merge(tiny_suite, base):
    model, _ = _build(tiny_suite, base=base)
    ref = get_method(base).build(tiny_suite, make_params(get_method(base), {})).eval()
    assert all(float(m.up.weight.abs().sum()) == 0.0 and float(m.down.weight.abs().sum()) > 0 for m in model.final.values())
    with torch.no_grad():
        for t in tiny_suite.tasks:
            x = _images(tiny_suite, t)
            assert torch.equal(model.encode(x, t), ref.encode(x, t))
            assert torch.equal(model.logits(x, t), ref.logits(x, t))
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert names and all(n.startswith("final.") for n in names)
    assert len(names) == 2 * len(tiny_suite.tasks)


def test_base_params_reach_the_base(tiny_suite):
    model, params = _build(tiny_suite, **{"base": "task_arithmetic", "base.scaling": "0.7"})
    assert params.base_params == {"scaling": 0.7}
    ref = get_method("task_arithmetic").build(tiny_suite, make_params(get_method("task_arithmetic"), {"scaling": 0.7})).eval()
    x = _images(tiny_suite, "a")
    with torch.no_grad():
        assert torch.equal(model.encode(x, "a"), ref.encode(x, "a"))


def test_v2_with_zero_up_projections_equals_its_base(tiny_suite):
    ada = get_method("adamerging")
    bases = {
        "task_arithmetic": get_method("task_arithmetic").build(tiny_suite, make_params(get_method("task_arithmetic"), {})).eval(),
        "adamerging(init)": ada.build(tiny_suite, make_params(ada, {})).eval(),
    }
    for name, base in bases.items():
        layers = len(base.encoder.encoder.transformer.resblocks) if name.startswith("ada") else len(base.encoder.transformer.resblocks)
        model = SurgeryModel(copy.deepcopy(base), dim=8, rank=4, width=16, layers=layers)
        assert len(model.blocks["a"]) == layers == 2
        with torch.no_grad():
            for t in tiny_suite.tasks:
                x = _images(tiny_suite, t)
                assert torch.equal(model.encode(x, t), base.encode(x, t)), name
                for got, want in zip(model.block_features(x, t), base.block_features(x, t), strict=True):
                    assert torch.equal(got, want), name
            # the hooks are live: a nonzero U in block 0 changes block 0's output, the later ones and the feature
            model.blocks["a"][0].up.weight.normal_()
            x = _images(tiny_suite, "a")
            feats, ref_feats = model.block_features(x, "a"), base.block_features(x, "a")
            assert all((f - r).abs().max() > 1e-4 for f, r in zip(feats, ref_feats, strict=True))
            assert (model.encode(x, "a") - base.encode(x, "a")).abs().max() > 1e-4
            assert torch.equal(model.encode(x, "b"), base.encode(x, "b"))


def test_v2_build_counts_modules(tiny_suite):
    model, _ = _build(tiny_suite, version=2, rank=4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert len(trainable) == 3 * (2 + 2 * 2)  # per task: final (D, U) + 2 blocks x (D, U)
    assert model.blocks["a"][0].down.weight.shape == (4, 16) and model.final["a"].down.weight.shape == (4, 8)


def test_training_lowers_l1_distance_on_every_task(micro_suite):
    for version, iterations in [(1, 20), (2, 8)]:
        model, params = _build(micro_suite, version=version, iterations=iterations)
        info = SURGERY.adapt(model.train(), micro_suite, params, RunContext(seed=0))
        for t in micro_suite.tasks:
            assert info["l1_after"][t] < 0.9 * info["l1_before"][t], (version, t, info["l1_before"][t], info["l1_after"][t])
        assert len(info["loss"]) == iterations and info["loss"][-1] < info["loss"][0]
        # the reported "after" is what the model itself now computes on the test images
        individual = individual_model(micro_suite, micro_suite.tasks)
        t = micro_suite.tasks[0]
        l1 = mean_l1(feature_cache.encoded(model, micro_suite, t), feature_cache.encoded(individual, micro_suite, t))
        assert l1 == pytest.approx(info["l1_after"][t], rel=1e-5)


def test_cached_feature_training_equals_rerunning_encoders(micro_suite):
    model, _ = _build(micro_suite)
    reference = copy.deepcopy(model)
    individual = individual_model(micro_suite, micro_suite.tasks)
    sizes = {t: len(micro_suite.data[t].test_images) for t in micro_suite.tasks}
    schedule = index_schedule(sizes, 5, 2, 16, torch.Generator().manual_seed(3))
    base = {t: feature_cache.encoded(model.base, micro_suite, t) for t in micro_suite.tasks}
    targets = {t: feature_cache.encoded(individual, micro_suite, t) for t in micro_suite.tasks}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    fit_cached(model.final, base, targets, schedule, optimizer)
    reference_fit(reference, individual, micro_suite, schedule, lr=1e-3)
    for (name, got), want in zip(model.final.named_parameters(), reference.final.parameters(), strict=True):
        assert got.abs().max() > 0
        assert torch.allclose(got, want, rtol=0, atol=1e-6), (name, (got - want).abs().max())
    assert any(float(m.up.weight.abs().max()) > 1e-3 for m in model.final.values())  # it did train


def test_surgery_on_ties_and_adamerging_bases_runs_and_caches(micro_suite, micro_cache, monkeypatch):
    configs = [
        RunConfig("micro", "surgery", {"base": "ties", "iterations": 3}),
        RunConfig("micro", "surgery", {"base": "adamerging", "base.steps": 3, "base.granularity": "task", "iterations": 3}),
    ]
    results = [run(c, micro_suite, cache_dir=micro_cache, device="cpu") for c in configs]
    for r in results:
        assert r["info"]["base"] in ("ties", "adamerging") and set(r["info"]["l1_after"]) == set(micro_suite.tasks)
        assert (run_dir(micro_cache, r["key"]) / "state.safetensors").is_file()
    ada_runs = [p for p in (micro_cache / "runs").iterdir() if p.name.startswith("adamerging-")]
    assert ada_runs and all((p / "result.json").is_file() for p in ada_runs)

    def boom(*_a, **_k):
        raise AssertionError("the second call must load result.json, not train again")

    monkeypatch.setattr(type(SURGERY), "adapt", boom)
    monkeypatch.setattr(type(get_method("adamerging")), "adapt", boom)
    for c, r in zip(configs, results, strict=True):
        assert run(c, micro_suite, cache_dir=micro_cache, device="cpu") == r
    # the reloaded Surgery-on-AdaMerging model uses the learned (not the initial) coefficients
    model = load_model(results[1], micro_suite, micro_cache)
    lam = model.base.encoder.lambdas()
    assert not torch.allclose(lam, torch.full_like(lam, 0.3))
    assert not model.base.encoder.coefficients.requires_grad


def test_bad_params():
    with pytest.raises(ConfigError, match="unknown method"):
        make_params(SURGERY, {"base": "nope"})
    with pytest.raises(ConfigError, match="not 'surgery'"):
        make_params(SURGERY, {"base": "surgery"})
    with pytest.raises(ConfigError, match="unknown hyperparameter 'lambda'"):
        make_params(SURGERY, {"base": "ties", "base.lambda": 0.3})
    with pytest.raises(ConfigError, match="density' = 1.5 is out of range"):
        make_params(SURGERY, {"base": "ties", "base.density": 1.5})
    # the old k=v;k=v string: one line saying the one spelling, never handed on to Surgery itself
    with pytest.raises(ConfigError, match=r"base\.KEY=VALUE"):
        make_params(SURGERY, {"base": "ties", "base_params": "scaling=0.3"})
    with pytest.raises(ConfigError, match="version' = 3 is not allowed; allowed: one of: 1, 2"):
        make_params(SURGERY, {"version": 3})
    with pytest.raises(ConfigError, match="needs its 'base' model"):
        SURGERY.build(None, make_params(SURGERY, {}))


def test_v2_rejects_a_base_without_static_blocks(tiny_suite):
    class PerSampleModel(MultiTaskModel):
        def __init__(self):
            super().__init__(tiny_suite.tasks, tiny_suite.make_heads())
            self.encoder = torch.nn.Linear(4, 8)

    with pytest.raises(ConfigError, match="SurgeryV2 needs"):
        SurgeryModel(PerSampleModel(), dim=8, rank=4, width=16, layers=2)


def test_the_base_run_and_the_modules_follow_the_runs_seed_and_device(tiny_suite, tmp_path):
    """The nested base run is resolved by ``runs`` with the outer run's seed, device and cache (it used to run at
    seed 0 on the default device), and Surgery's modules are drawn from the run's seed (they always used seed 0)."""
    overrides = {"base": "adamerging", "base.steps": 2, "base.granularity": "task", "iterations": 2}
    models = {seed: build_model(RunConfig(tiny_suite.name, "surgery", overrides, "fast", seed), tiny_suite, tmp_path, "cpu")[0]
              for seed in (0, 1)}
    assert not torch.equal(models[0].final["a"].down.weight, models[1].final["a"].down.weight)
    again = build_model(RunConfig(tiny_suite.name, "surgery", overrides, "fast", 1), tiny_suite, tmp_path, "cpu")[0]
    assert torch.equal(again.final["a"].down.weight, models[1].final["a"].down.weight)
    from merging.io import load_json

    bases = [load_json(p) for p in (tmp_path / "runs").glob("adamerging-*/result.json")]
    assert sorted(b["seed"] for b in bases) == [0, 1] and {b["device"] for b in bases} == {"cpu"}
