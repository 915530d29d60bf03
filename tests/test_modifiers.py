"""DARE and LiNeS as options of the static merges (issue #21; algorithms_frontier.md §8, §9, §12): the modifiers on
hand-made tensors, against the official code's own expressions, wired into every method, and through the CLI."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging import modifiers
from merging import task_vectors as tv
from merging.cli import main
from merging.device import default_device
from merging.errors import ConfigError
from merging.methods import METHODS
from merging.methods.base import build_params, hyperparameter_specs
from merging.methods.cart import Cart, cart
from merging.methods.consensus import Consensus, consensus_merge
from merging.methods.iso_c import IsoC, iso_c
from merging.methods.iso_cts import IsoCts, iso_cts
from merging.methods.task_arithmetic import TaskArithmetic
from merging.methods.ties import Ties
from merging.methods.tsv_m import TsvM, tsv_m
from merging.methods.wudi import Wudi, wudi_merge

WIRED_METHODS = {m.name: m for m in (TaskArithmetic(), Ties(), TsvM(), IsoC(), IsoCts(), Cart(), Wudi(), Consensus())}
WIRED = tuple(WIRED_METHODS)


def make_params(method, overrides=None):
    """The method's typed parameters from CLI-style strings, checked as the CLI and the app check them."""
    return build_params(method, overrides, None, WIRED_METHODS)


def default_merges(coefficient: float) -> dict:
    """Each method's underlying function with its default hyperparameters and final coefficient ``coefficient``
    (TA, TIES and Consensus have one; the SVD merges keep α = 1, CART has none)."""
    return {
        "task_arithmetic": lambda b, f: tv.task_arithmetic(b, f, coefficient),
        "ties": lambda b, f: tv.ties(b, f, coefficient, 0.2, False),
        "tsv_m": lambda b, f: tsv_m(b, f, 1.0),
        "iso_c": lambda b, f: iso_c(b, f, 1.0),
        "iso_cts": lambda b, f: iso_cts(b, f, 1.0, 0.8),
        "cart": lambda b, f: cart(b, f, 2.0, 0.12),
        "wudi": lambda b, f: wudi_merge(b, f, 300, 1e-5, 1.0, default_device()),
        "consensus": lambda b, f: consensus_merge(b, f, 2, 0.4, "task_arithmetic", coefficient, 0.2),
    }


# What each method did before it took the modifiers: the underlying function with the method's default hyperparameters.
BEFORE = default_merges(0.3)
# The same merges at final coefficient 1: LiNeS with α = 1, β = 0 must give these (§12).
AT_ONE = default_merges(1.0)

BLOCK_PARTS = {
    "ln_1.weight": (8,), "ln_1.bias": (8,), "attn.in_proj_weight": (24, 8), "attn.in_proj_bias": (24,),
    "attn.out_proj.weight": (8, 8), "attn.out_proj.bias": (8,), "ln_2.weight": (8,), "ln_2.bias": (8,),
    "mlp.c_fc.weight": (16, 8), "mlp.c_fc.bias": (16,), "mlp.c_proj.weight": (8, 16), "mlp.c_proj.bias": (8,),
}  # fmt: skip
OUTSIDE = {"class_embedding": (8,), "positional_embedding": (5, 8), "conv1.weight": (8, 3, 2, 2), "ln_pre.weight": (8,),
           "ln_pre.bias": (8,), "ln_post.weight": (8,), "ln_post.bias": (8,), "proj": (8, 4)}  # fmt: skip


def vit_shapes(blocks: int, prefix: str = "") -> dict[str, tuple[int, ...]]:
    """The key names and (tiny) shapes of an open_clip ViT image encoder with ``blocks`` residual blocks."""
    shapes = {prefix + k: s for k, s in OUTSIDE.items()}
    for i in range(blocks):
        shapes.update({f"{prefix}transformer.resblocks.{i}.{k}": s for k, s in BLOCK_PARTS.items()})
    return shapes


def vit_models(n: int = 3, blocks: int = 2, seed: int = 0, spread: float = 1e-2):
    """A tiny open_clip-shaped pretrained state dict (plus an integer buffer) and ``n`` fine-tuned ones, by name."""
    g = torch.Generator().manual_seed(seed)
    base = {k: torch.randn(s, generator=g) for k, s in vit_shapes(blocks).items()}
    base["step"] = torch.tensor(3)
    fts = {f"t{i}": {k: v + spread * torch.randn(v.shape, generator=g) if v.is_floating_point() else v.clone() for k, v in base.items()}
           for i in range(n)}  # fmt: skip
    return base, fts


def small_vectors(n: int = 2, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [{"a": torch.randn(4, 5, generator=g), "b": torch.randn(3, generator=g)} for _ in range(n)]


def equal_states(x, y) -> bool:
    return set(x) == set(y) and all(x[k].dtype == y[k].dtype and torch.equal(x[k], y[k]) for k in x)


# ----------------------------------------------------------------------------------------------------- DARE (§8)


def test_dare_with_drop_zero_is_the_identity():
    vectors = small_vectors()
    for seed in (0, 7):
        out = modifiers.dare(vectors, 0.0, seed)
        assert all(equal_states(o, v) for o, v in zip(out, vectors, strict=True))


@pytest.mark.parametrize("p", [0.3, 0.5, 0.9])
def test_dare_rescales_each_survivor_by_exactly_one_over_one_minus_p(p):
    g = torch.Generator().manual_seed(1)
    vectors = [{"w": torch.randn(200, 50, generator=g) + 3.0}]  # no entry is 0, so a kept entry is never 0
    out = modifiers.dare(vectors, p, seed=3)[0]["w"]
    kept = out != 0
    assert torch.equal(out[kept], torch.div(vectors[0]["w"][kept], 1 - p))  # MergeLM divides by 1 - p
    assert torch.allclose(out[kept], vectors[0]["w"][kept] / (1 - p), rtol=1e-6)
    # The dropped fraction is Binomial(10000, p) / 10000: within 5 standard deviations of p.
    n = kept.numel()
    assert abs((1 - kept.float().mean().item()) - p) <= 5 * math.sqrt(p * (1 - p) / n)


def test_dare_keeps_the_expectation_over_seeds():
    """E[τ̃] = τ. Each entry of the mean over N seeds has standard deviation |τ|·sqrt(p/((1−p)·N)); with 23 entries, the
    chance that any one lies beyond 5 of them is about 1e-5, so the bound is tight and the test still never flakes."""
    p, n = 0.5, 2000
    vectors = small_vectors(n=1)
    total = {k: torch.zeros_like(v, dtype=torch.float64) for k, v in vectors[0].items()}
    for seed in range(n):
        for k, v in modifiers.dare(vectors, p, seed)[0].items():
            total[k] += v.double()
    for k, v in vectors[0].items():
        sd = v.double().abs() * math.sqrt(p / ((1 - p) * n))
        assert ((total[k] / n - v.double()).abs() <= 5 * sd).all(), k
    # and not trivially: one draw is far from τ
    one = modifiers.dare(vectors, p, 0)[0]["a"]
    assert (one - vectors[0]["a"]).abs().max() > 0.1


def test_dare_is_reproducible_by_seed_and_the_seed_matters():
    vectors = small_vectors(n=3)
    a, b, c = (modifiers.dare(vectors, 0.5, s) for s in (11, 11, 12))
    assert all(equal_states(x, y) for x, y in zip(a, b, strict=True))
    assert not all(equal_states(x, y) for x, y in zip(a, c, strict=True))
    assert not equal_states(a[0], a[1])  # each task gets its own masks from the one stream
    reordered = [{k: v[k] for k in reversed(list(v))} for v in vectors]  # a file may list the keys in another order
    d = modifiers.dare(reordered, 0.5, 11)
    assert all(equal_states(x, y) and list(y) == list(r) for x, y, r in zip(a, d, reordered, strict=True))


def _mergelm_mask(input_tensor: torch.Tensor, mask_rate: float) -> torch.Tensor:
    """MergeLM's ``mask_input_with_mask_rate`` (mask_strategy="random", use_rescale=True), copied expression by expression
    (yule-BUAA/MergeLM model_merging_methods/mask_weights_utils.py)."""
    mask = torch.bernoulli(torch.full_like(input=input_tensor, fill_value=mask_rate)).to(input_tensor.device)
    masked_input_tensor = input_tensor * (1 - mask)
    if mask_rate != 1.0:
        masked_input_tensor = torch.div(input=masked_input_tensor, other=1 - mask_rate)
    return masked_input_tensor


def test_dare_equals_mergelm_after_manual_seed():
    """MergeLM seeds the global generator once and masks model by model, parameter by parameter: the same numbers."""
    vectors = small_vectors(n=3, seed=5)
    torch.manual_seed(42)
    official = [{k: _mergelm_mask(v, 0.7) for k, v in vec.items()} for vec in vectors]
    ours = modifiers.dare(vectors, 0.7, 42)
    assert all(equal_states(o, m) for o, m in zip(ours, official, strict=True))


def test_dare_finetuned_is_pretrained_plus_dropped_vectors():
    base, fts = vit_models(n=2)
    models = modifiers.dare_finetuned(base, list(fts.values()), 0.5, 0)
    dropped = modifiers.dare(tv.task_vectors(base, list(fts.values())), 0.5, 0)
    for model, d in zip(models, dropped, strict=True):
        assert torch.equal(model["step"], base["step"])
        for k in d:
            assert torch.equal(model[k], base[k] + d[k])
        assert (model["proj"] == base["proj"]).float().mean() > 0.3  # about half the entries are back at θ₀


@pytest.mark.parametrize("p", [1.0, -0.1, 1.5])
def test_dare_refuses_a_drop_rate_outside_zero_one(p):
    with pytest.raises(ConfigError, match="'dare'"):
        modifiers.dare(small_vectors(), p, 0)
    with pytest.raises(ConfigError, match=r"hyperparameter 'dare' = .* out of range; allowed: 0 <= dare < 1"):
        make_params(WIRED_METHODS["ties"], {"dare": str(p)})


# ---------------------------------------------------------------------------------------------------- LiNeS (§9)


def test_lines_with_alpha_one_beta_zero_is_the_identity():
    vector = {k: torch.randn(s) for k, s in vit_shapes(3).items()}
    assert equal_states(modifiers.lines(vector, 1.0, 0.0), vector)


@pytest.mark.parametrize("prefix", ["", "visual.", "model.visual."])
def test_lines_scales_block_i_by_alpha_plus_beta_i_over_l_minus_one(prefix):
    blocks, alpha, beta = 12, 0.125, 0.6
    vector = {k: torch.randn(s) for k, s in vit_shapes(blocks, prefix).items()}
    scaled = modifiers.lines(vector, alpha, beta)
    for i in range(blocks):
        lam = alpha + beta * i / 11  # §9: λ(l) = α + β·l/(L−1), L = 12 as ViT-B/32
        for part in BLOCK_PARTS:
            key = f"{prefix}transformer.resblocks.{i}.{part}"
            assert torch.allclose(scaled[key], lam * vector[key], rtol=1e-6, atol=0), key
    for part in OUTSIDE:  # embeddings, conv1, ln_pre, ln_post and proj: α
        assert torch.equal(scaled[prefix + part], vector[prefix + part] * alpha), part
    last = f"{prefix}transformer.resblocks.11.ln_2.bias"
    assert math.isclose(modifiers.lines_scalings([last], alpha, beta, 12)[last], alpha + beta)  # the last block: α + β


def _official_scalings(keys: list[str], alpha: float, beta: float, num_blocks: int) -> dict[str, float]:
    """wang-kee/LiNeS src/eval/eval.py ``LiNeS_scaling``'s key loop, as written there."""
    key_blocks = list(f".{i}." for i in range(0, num_blocks))
    layer_scalings_dict = {}
    for k in keys:
        for layer, block in enumerate(key_blocks):
            if block in k:
                layer_scalings_dict[k] = alpha + beta * (layer / (num_blocks - 1))
                break
    return {k: layer_scalings_dict.get(k, alpha) for k in keys}


@pytest.mark.parametrize("blocks", [12, 24])
def test_lines_depth_per_key_equals_the_official_substring_rule(blocks):
    keys = list(vit_shapes(blocks, "model.visual."))  # the official ImageEncoder's key names
    assert modifiers.count_blocks(keys) == blocks
    assert modifiers.lines_scalings(keys, 0.3, 0.9) == _official_scalings(keys, 0.3, 0.9, blocks)


def test_lines_refuses_a_state_dict_without_blocks():
    with pytest.raises(ConfigError, match="hyperparameter 'lines'.*transformer.resblocks"):
        modifiers.lines({"enc.w": torch.ones(2, 2)}, 0.5, 0.5)


def test_multitask_alpha_is_one_over_t_for_the_sum_and_the_norm_ratio_otherwise():
    vectors = small_vectors(n=4)
    summed = {k: sum(v[k] for v in vectors) for k in vectors[0]}
    assert modifiers.multitask_alpha(vectors, summed) == 1 / 4
    half = {k: 0.5 * v for k, v in summed.items()}
    assert math.isclose(modifiers.multitask_alpha(vectors, half), 2 / 4, rel_tol=1e-12)
    assert modifiers.multitask_alpha(vectors, {k: torch.zeros_like(v) for k, v in summed.items()}) == 0.0


def test_lines_on_task_arithmetic_is_the_papers_recipe():
    """θ = θ₀ + (1/T + β·l/(L−1))·Σ_k τ_k: α = 1/T, β as given, the scaling coefficient unused (§9)."""
    base, fts = vit_models(n=4, blocks=3)
    params = make_params(WIRED_METHODS["task_arithmetic"], {"lines": "true", "lines_beta": "0.8", "scaling": "0.7"})
    merged = WIRED_METHODS["task_arithmetic"].merge_state_dicts(base, fts, params)
    summed = {k: sum(ft[k] - base[k] for ft in fts.values()) for k in tv.float_keys(base)}
    for k in summed:
        layer = modifiers.block_index(k)
        lam = 1 / 4 + (0.8 * layer / 2 if layer is not None else 0.0)
        assert torch.allclose(merged[k], base[k] + lam * summed[k], atol=1e-6), k
    assert torch.equal(merged["step"], base["step"])


def test_lines_on_ties_uses_the_official_norm_ratio_alpha():
    """α = ‖Σ_k τ_k‖₁ / ‖τ_TIES‖₁ / T on flattened vectors (aggregation.py norm_summed_tvs, norm_mtv; eval.py)."""
    base, fts = vit_models(n=3, blocks=2)
    params = make_params(WIRED_METHODS["ties"], {"lines": "true", "lines_beta": "1.2"})
    merged = WIRED_METHODS["ties"].merge_state_dicts(base, fts, params)
    keys = tv.float_keys(base)
    taus = tv.task_vectors(base, list(fts.values()))
    mtl = {k: sum(v[k] for v in tv.ties_vectors(base, list(fts.values()), 0.2)) for k in keys}
    flat_sum = torch.cat([sum(v[k] for v in taus).reshape(-1) for k in keys])
    flat_mtl = torch.cat([mtl[k].reshape(-1) for k in keys])
    alpha = (flat_sum.abs().sum().item() / flat_mtl.abs().sum().item()) * 1 / 3
    assert alpha > 1 / 3  # TIES trims 80 %: its vector is smaller than the sum
    for k in keys:
        layer = modifiers.block_index(k)
        lam = alpha + (1.2 * layer / 1 if layer is not None else 0.0)
        assert torch.allclose(merged[k], base[k] + lam * mtl[k], atol=1e-6, rtol=1e-5), k


# ------------------------------------------------------------------------------------------- the methods (§12)


def test_the_modifiers_are_options_of_every_wired_method_after_its_own():
    for name in WIRED:
        names = [h.name for h in hyperparameter_specs(WIRED_METHODS[name].Params)]
        assert names[-5:] == list(modifiers.MODIFIER_FIELDS), name
    dare_spec = next(h for h in hyperparameter_specs(WIRED_METHODS["ties"].Params) if h.name == "dare")
    assert (dare_spec.default, dare_spec.low, dare_spec.high, dare_spec.high_open) == (0.0, 0.0, 1.0, True)


@pytest.mark.parametrize("name", WIRED)
def test_default_options_are_bit_identical_to_the_method_before(name):
    base, fts = vit_models(n=3)
    merged = WIRED_METHODS[name].merge_state_dicts(base, fts, make_params(WIRED_METHODS[name], {}))
    assert equal_states(merged, BEFORE[name](base, list(fts.values())))


@pytest.mark.parametrize("name", WIRED)
def test_dare_half_changes_every_method_and_is_the_method_on_dropped_models(name):
    base, fts = vit_models(n=3)
    params = make_params(WIRED_METHODS[name], {"dare": "0.5", "dare_seed": "4"})
    merged = WIRED_METHODS[name].merge_state_dicts(base, fts, params)
    before = BEFORE[name](base, list(fts.values()))
    assert not equal_states(merged, before)
    assert all(torch.isfinite(v).all() for v in merged.values() if v.is_floating_point())
    assert equal_states(merged, BEFORE[name](base, modifiers.dare_finetuned(base, list(fts.values()), 0.5, 4)))


@pytest.mark.parametrize("name", WIRED)
def test_lines_alpha_one_beta_zero_is_the_merge_at_coefficient_one(name):
    base, fts = vit_models(n=3)
    params = make_params(WIRED_METHODS[name], {"lines": "true", "lines_alpha": "1", "lines_beta": "0"})
    merged = WIRED_METHODS[name].merge_state_dicts(base, fts, params)
    expected = AT_ONE[name](base, list(fts.values()))
    assert set(merged) == set(expected)
    for k in merged:
        assert torch.allclose(merged[k], expected[k], atol=1e-6, rtol=0), (name, k)
    lined = WIRED_METHODS[name].merge_state_dicts(base, fts, make_params(WIRED_METHODS[name], {"lines": "true"}))
    assert not equal_states(lined, merged)


# ------------------------------------------------------------------------------------------------------------ CLI


def test_list_methods_shows_the_options(capsys):
    assert main(["list-methods"]) == 0
    sections: dict[str, list[str]] = {}
    for line in capsys.readouterr().out.splitlines():
        if not line.startswith(" "):
            sections[line.split(":", 1)[0]] = []
        else:
            sections[list(sections)[-1]].append(line.strip())
    listed = [name for name in WIRED if name in METHODS]  # the registry (not this file) decides what is listed
    assert {"task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts", "cart"} <= set(listed)
    for name in listed:
        options = [line.split(" = ")[0] for line in sections[name]]
        assert options[-5:] == list(modifiers.MODIFIER_FIELDS), name
        assert any(line.startswith("dare = 0.0 [p]") and "Allowed: 0 <= dare < 1" in line for line in sections[name]), name


@pytest.fixture
def vit_files(tmp_path):
    base, fts = vit_models(n=2)
    paths = {"pre": tmp_path / "pre.safetensors"}
    save_file(base, paths["pre"])
    for name, ft in fts.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(ft, paths[name])
    return base, fts, paths


def _merge_args(paths, method, *sets, out):
    return ["merge", "--method", method, "--pretrained", str(paths["pre"]), "--finetuned", *(f"{n}={paths[n]}" for n in ("t0", "t1")),
            *(a for s in sets for a in ("--set", s)), "--out", str(out)]  # fmt: skip


def test_cli_merge_takes_dare_and_lines(vit_files, tmp_path):
    base, fts, paths = vit_files
    out = tmp_path / "M.safetensors"
    assert main(_merge_args(paths, "ties", "dare=0.5", out=out)) == 0
    dropped = modifiers.dare_finetuned(base, list(fts.values()), 0.5, 0)
    assert equal_states(load_file(out), tv.ties(base, dropped, 0.3, 0.2))
    assert main(_merge_args(paths, "task_arithmetic", "lines=true", "lines_beta=0.4", out=out)) == 0
    params = make_params(WIRED_METHODS["task_arithmetic"], {"lines": True, "lines_beta": 0.4})
    assert equal_states(load_file(out), WIRED_METHODS["task_arithmetic"].merge_state_dicts(base, fts, params))


@pytest.mark.parametrize("setting,needle", [("dare=1.0", "'dare' = 1.0 is out of range"), ("dare=-0.2", "'dare'"),
                                            ("dare_seed=-1", "'dare_seed'"), ("lines=maybe", "'lines'"), ("lines_beta=nan", "'lines_beta'")])  # fmt: skip
def test_cli_merge_refuses_bad_options_in_one_line(vit_files, tmp_path, capsys, setting, needle):
    _, _, paths = vit_files
    out = tmp_path / "never.safetensors"
    assert main(_merge_args(paths, "ties", setting, out=out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err
    assert not out.exists()


def test_cli_merge_lines_on_a_state_dict_without_blocks_is_one_line(tmp_path, capsys):
    g = torch.Generator().manual_seed(0)
    base = {"enc.w": torch.randn(4, 4, generator=g)}
    paths = {"pre": tmp_path / "pre.safetensors"}
    save_file(base, paths["pre"])
    for name in ("t0", "t1"):
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file({"enc.w": base["enc.w"] + 0.1}, paths[name])
    assert main(_merge_args(paths, "task_arithmetic", "lines=true", out=tmp_path / "x.safetensors")) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'lines'" in err and "transformer.resblocks" in err
