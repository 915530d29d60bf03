"""TALL masks and EMR-Merging, the storage lane (algorithms_frontier.md §6, §7, §12), and what every method stores."""

from __future__ import annotations

import pytest
import torch
from conftest import random_suite

from merging import task_vectors as tv
from merging.methods import get_method, make_params, method_group
from merging.methods.emr import emr_elect
from merging.model import PerTaskModel
from merging.runs import RunConfig, build_model, run
from merging.storage import plain_model_bytes, stored_bytes


def _model(suite, method: str, **overrides):
    return build_model(RunConfig("random", method, overrides), suite, device="cpu")[0].eval()


def _encode_all(model, suite) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        return {t: model.encode(suite.data[t].preprocess(suite.data[t].test_images[:6]), t) for t in suite.tasks}


def test_tall_masks_with_every_entry_kept_is_task_arithmetic_at_one():
    suite = random_suite()
    tall = _model(suite, "tall_masks", tall_lambda=0.0)  # |τ_t| > 0: every entry of a random task vector
    assert all(bool(m.all()) for ms in tall.masks.values() for m in ms.values())
    ta = _model(suite, "task_arithmetic", scaling=1.0)
    for t, z in _encode_all(tall, suite).items():
        torch.testing.assert_close(z, _encode_all(ta, suite)[t], atol=1e-5, rtol=1e-5)


def test_tall_mask_rule_on_known_vectors():
    suite = random_suite(tasks=("a", "b"), classes=(3, 4))
    tall = _model(suite, "tall_masks", tall_lambda=0.5)
    taus = tv.task_vectors(suite.pretrained, [suite.finetuned[t] for t in suite.tasks])
    multi = {k: taus[0][k] + taus[1][k] for k in taus[0]}
    key = "transformer.resblocks.0.mlp.c_fc.weight"
    expected = taus[1][key].abs() > 0.5 * (multi[key] - taus[1][key]).abs()
    assert torch.equal(tall.masks["b"][key], expected)
    assert 0.2 < expected.float().mean() < 0.9  # a real selection, not all or nothing
    torch.testing.assert_close(tall.task_state("b")[key], suite.pretrained[key] + expected * multi[key])


def test_emr_on_one_task_reconstructs_that_model():
    suite = random_suite(tasks=("a",), classes=(3,))
    emr = _model(suite, "emr")
    assert emr.scales == {"a": pytest.approx(1.0, abs=1e-6)}
    for k, v in emr.task_state("a").items():
        torch.testing.assert_close(v, suite.finetuned["a"][k], atol=1e-6, rtol=0)


def test_emr_with_disjoint_supports_equals_each_individual_model():
    suite = random_suite(tasks=("a", "b"), classes=(3, 4))
    for k, p in suite.pretrained.items():  # task a changes the even entries, task b the odd ones
        if p.is_floating_point():
            even = (torch.arange(p.numel()) % 2 == 0).reshape(p.shape)
            suite.finetuned["a"][k] = torch.where(even, suite.finetuned["a"][k], p)
            suite.finetuned["b"][k] = torch.where(even, p, suite.finetuned["b"][k])
    emr = _model(suite, "emr")
    assert list(emr.scales.values()) == [pytest.approx(1.0, abs=1e-6)] * 2
    individual = PerTaskModel(suite.build_encoder(), suite.finetuned, suite.make_heads()).eval()
    got, want = _encode_all(emr, suite), _encode_all(individual, suite)
    for t in suite.tasks:
        torch.testing.assert_close(got[t], want[t], atol=1e-5, rtol=1e-5)


def test_emr_election_rules_on_a_hand_made_example():
    taus = [{"w": torch.tensor([0.5, -0.2, 0.0, 0.3])}, {"w": torch.tensor([0.1, 0.4, 0.0, -0.3])}]
    unified, masks, scales = emr_elect(taus)
    # sums 0.6, 0.2, 0, 0: signs +, +, − (zero counts as −), −; τ_uni = γ·max|τ_k| over the agreeing tasks
    torch.testing.assert_close(unified["w"], torch.tensor([0.5, 0.4, 0.0, -0.3]))
    assert masks[0]["w"].tolist() == [True, False, False, False] and masks[1]["w"].tolist() == [True, True, False, True]
    assert scales[0] == pytest.approx(0.25 / 0.125) and scales[1] == pytest.approx(0.2 / 0.3)


def test_storage_lane_group_and_stored_megabytes(tmp_path):
    suite = random_suite()
    n_float = sum(v.numel() for v in suite.pretrained.values() if v.is_floating_point())
    for method in ("tall_masks", "emr"):
        assert method_group(method) == "storage lane (task id)"
        result = run(RunConfig("random", method), suite, cache_dir=tmp_path, device="cpu")
        # θ₀ and one float vector, plus one bit per parameter per task, plus T scalars (EMR's rescalers; 1 for TALL)
        masks_bytes = 3 * n_float / 8
        expected_extra = (4 * n_float + masks_bytes + 3 * 4) / 1e6
        assert result["storage"]["extra_mb"] == pytest.approx(expected_extra, rel=1e-6)
        assert result["data"] == {"split": None, "images": 0}
    ta = run(RunConfig("random", "task_arithmetic"), suite, cache_dir=tmp_path, device="cpu")
    assert ta["storage"]["extra_mb"] == 0.0
    assert ta["storage"]["total_mb"] == pytest.approx(plain_model_bytes(suite.pretrained, suite.heads) / 1e6)
    individual = run(RunConfig("random", "individual"), suite, cache_dir=tmp_path, device="cpu")
    assert individual["storage"]["extra_mb"] == pytest.approx(2 * 4 * n_float / 1e6, rel=1e-6)  # T − 1 more encoders


def test_adamerging_stores_one_model_and_surgery_its_adapters(tmp_path):
    suite = random_suite()
    one_model = plain_model_bytes(suite.pretrained, suite.heads)
    ada = build_model(RunConfig("random", "adamerging"), suite, device="cpu")[0]
    assert stored_bytes(ada) == pytest.approx(one_model)
    surgery = build_model(RunConfig("random", "surgery", {"rank": 4}), suite, device="cpu")[0]
    adapters = sum(p.numel() for p in surgery.final.parameters()) * 4
    assert stored_bytes(surgery) == pytest.approx(one_model + adapters)


def test_tall_masks_hyperparameters_are_checked():
    from merging.errors import ConfigError

    with pytest.raises(ConfigError, match="tall_lambda"):
        make_params(get_method("tall_masks"), {"tall_lambda": "-1"})
