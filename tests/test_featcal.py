"""FeatCal (algorithms_frontier.md §10): the written-out block equals open_clip's, the closed-form solves recover known
maps, zero calibration strength returns the base merge, the method reads train images only, and it lowers the bias."""

from __future__ import annotations

import pytest
import torch
from conftest import random_suite

from merging.errors import ConfigError
from merging.methods import get_method, make_params
from merging.methods.base import RunContext
from merging.methods.featcal import Moments, block_forward, block_inputs, calibration_images, solve_layer_norm, solve_linear_weight
from merging.model import blocks_of
from merging.runs import RunConfig, build_model, load_model, run


def _moments(xs: torch.Tensor, xt: torch.Tensor) -> Moments:
    m = Moments()
    m.add(xs=xs.sum(0), xt=xt.sum(0), ss=xs.T @ xs, st=xs.T @ xt, w=torch.tensor(float(len(xs))))
    return m


def test_block_forward_equals_open_clip_and_records_the_attention_output():
    suite = random_suite(width=16)
    encoder = suite.build_encoder()
    encoder.load_state_dict(suite.finetuned["a"])
    x = block_inputs(encoder, suite.finetuned["a"], suite.data["a"].preprocess(suite.data["a"].test_images[:5]))
    block = blocks_of(encoder)[0]
    params = {k: v for k, v in block.state_dict().items()}
    out, inputs = block_forward(block, params, x)
    with torch.no_grad():
        torch.testing.assert_close(out, block(x), atol=1e-5, rtol=1e-5)
        attn = block.attn(*(block.ln_1(x),) * 3, need_weights=False)[0]
    torch.testing.assert_close(torch.nn.functional.linear(inputs["attn.out_proj"], params["attn.out_proj.weight"], params["attn.out_proj.bias"]),
                               attn, atol=1e-5, rtol=1e-5)
    assert x.shape == (5, 5, 16)  # batch first: 4 patches and the class token


def test_linear_solve_recovers_a_known_teacher_map():
    torch.manual_seed(0)
    d_in, d_out = 6, 4
    xs = torch.randn(500, d_in)
    teacher_map = torch.randn(d_in, d_in)  # the teacher's inputs are a known linear map of the student's
    expert = torch.randn(d_out, d_in)
    weight, _ = solve_linear_weight([_moments(xs, xs @ teacher_map.T)], [expert], torch.zeros(d_out, d_in), ridge=0.0)
    torch.testing.assert_close(weight, expert @ teacher_map, atol=1e-3, rtol=1e-3)


def test_linear_solve_with_a_huge_ridge_returns_the_anchor():
    torch.manual_seed(1)
    xs = torch.randn(100, 5)
    anchor = torch.randn(3, 5)
    weight, _ = solve_linear_weight([_moments(xs, xs)], [torch.randn(3, 5)], anchor, ridge=1e7)
    torch.testing.assert_close(weight, anchor, atol=1e-5, rtol=1e-5)


def test_layer_norm_solve_recovers_the_expert_affine_without_ridge():
    torch.manual_seed(2)
    z = torch.randn(300, 4)
    m = Moments()
    m.add(z=z.sum(0), z2=z.square().sum(0), w=torch.tensor(300.0))
    gamma, beta = torch.rand(4) + 0.5, torch.randn(4)
    g, b = solve_layer_norm([m], [(gamma, beta)], (torch.zeros(4), torch.zeros(4)), ridge=0.0)
    torch.testing.assert_close(g, gamma, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(b, beta, atol=1e-5, rtol=1e-5)


def test_featcal_at_infinite_ridge_and_anchor_at_the_base_is_the_base_merge(tmp_path):
    suite = random_suite()
    base = build_model(RunConfig("random", "task_arithmetic"), suite, device="cpu")[0]
    result = run(RunConfig("random", "featcal", {"ridge": 1e9, "anchor_rho": 1.0, "calibration_images": 8}), suite, cache_dir=tmp_path, device="cpu")
    model = load_model(result, suite, tmp_path, "cpu")
    for k, v in base.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[k], v, atol=1e-5, rtol=1e-5)
    assert result["info"]["relative_change"] < 1e-5
    assert result["data"] == {"split": "train", "images": 3 * 8}
    assert result["parameters"]["trainable"] == 0 and result["storage"]["extra_mb"] == 0.0


def test_featcal_reads_train_images_only(tmp_path):
    suite = random_suite()
    calibrated = build_model(RunConfig("random", "featcal", {"calibration_images": 8}), suite, device="cpu")[0]
    method = get_method("featcal")
    params = make_params(method, {"calibration_images": 8})
    method.adapt(calibrated, suite, params, RunContext())
    for t in suite.tasks:  # other test images, same train images: the same calibrated weights
        suite.data[t].test_images = torch.randint(0, 256, suite.data[t].test_images.shape, dtype=torch.uint8)
    again = build_model(RunConfig("random", "featcal", {"calibration_images": 8}), suite, device="cpu")[0]
    method.adapt(again, suite, params, RunContext())
    for k, v in calibrated.encoder.state_dict().items():
        assert torch.equal(again.encoder.state_dict()[k], v), k
    picked = calibration_images(suite, "a", 8, 42)
    assert any(torch.equal(picked[0], img) for img in suite.data["a"].train_images)
    suite.data["a"].train_images = None
    with pytest.raises(ConfigError, match="no train split"):
        method.adapt(again, suite, params, RunContext())


def test_featcal_moves_every_block_towards_the_experts(micro_suite, micro_cache):
    """On the trained micro suite, FeatCal lowers every task's L1 distance to the individual model at every block's output
    (token means), the features its layer-by-layer solve matches."""
    from merging.feature_cache import block_means
    from merging.metrics import mean_l1

    featcal = run(RunConfig("micro", "featcal"), micro_suite, cache_dir=micro_cache, device="cpu")
    base = build_model(RunConfig("micro", "task_arithmetic"), micro_suite, device="cpu")[0]
    calibrated = load_model(featcal, micro_suite, micro_cache, "cpu")
    individual = build_model(RunConfig("micro", "individual"), micro_suite, device="cpu")[0]
    for t in micro_suite.tasks:
        targets = block_means(individual, micro_suite, t)
        for before, after, target in zip(block_means(base, micro_suite, t), block_means(calibrated, micro_suite, t), targets, strict=True):
            assert mean_l1(after, target) < mean_l1(before, target)
    assert featcal["info"]["calibration_images"] == {t: 256 for t in micro_suite.tasks}


def test_cli_runs_featcal_writes_its_plain_state_dict_and_merge_refuses_it(tmp_path, capsys, micro_suite, micro_cache):
    from safetensors.torch import load_file, save_file

    from merging.cli import main

    out = tmp_path / "featcal.safetensors"
    assert main(["run", "--suite", "micro", "--method", "featcal", "--set", "calibration_images=8", "--save-model", str(out),
                 "--cache-dir", str(micro_cache), "--device", "cpu"]) == 0
    result = run(RunConfig("micro", "featcal", {"calibration_images": 8}), micro_suite, cache_dir=micro_cache, device="cpu")
    saved = load_file(out)
    model = load_model(result, micro_suite, micro_cache, "cpu")
    assert set(saved) == set(model.encoder.state_dict()) and all(torch.equal(saved[k], v) for k, v in model.encoder.state_dict().items())
    capsys.readouterr()
    assert main(["run", "--suite", "micro", "--method", "emr", "--save-model", str(tmp_path / "emr.safetensors"),
                 "--cache-dir", str(micro_cache), "--device", "cpu"]) == 2
    assert "is not one plain model" in capsys.readouterr().err and not (tmp_path / "emr.safetensors").exists()
    save_file(dict(micro_suite.pretrained), tmp_path / "p.safetensors")
    save_file(dict(micro_suite.finetuned["colors"]), tmp_path / "a.safetensors")
    assert main(["merge", "--method", "featcal", "--pretrained", str(tmp_path / "p.safetensors"), "--finetuned", f"a={tmp_path / 'a.safetensors'}",
                 "--out", str(tmp_path / "m.safetensors")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "calibrates on unlabeled train images" in err and not (tmp_path / "m.safetensors").exists()
