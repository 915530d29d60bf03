"""Model Tinting: task arithmetic at init, the confidence filter rule, parameter counts, training, runs."""

import pytest
import torch

from merging import task_vectors as tv
from merging.methods.base import RunContext
from merging.methods.tinting import Tinting, TintingParams, build_tinting, self_labels
from merging.model import PerTaskModel, StaticModel
from merging.runs import RunConfig, count_parameters, load_model, run


def _ta(suite, lam=0.3):
    return StaticModel(suite.build_encoder(), tv.task_arithmetic(suite.pretrained, list(suite.finetuned.values()), lam), suite.tasks, suite.make_heads())


@pytest.mark.parametrize("layer", ["head", "ln_post", "transformer.resblocks.1.mlp.c_proj"])
def test_init_equals_task_arithmetic(tiny_suite, layer):
    model = build_tinting(tiny_suite, TintingParams(layer=layer))
    ta = _ta(tiny_suite)
    with torch.no_grad():
        for task in tiny_suite.tasks:
            x = tiny_suite.data[task].preprocess(tiny_suite.data[task].test_images[:8])
            assert torch.allclose(model.logits(x, task), ta.logits(x, task), atol=1e-5)


def test_filter_rule_on_constructed_batch():
    teacher = torch.tensor([[3.0, 0.0, 0.0], [4.0, 0.0, 0.0], [0.0, 1.0, 0.0], [2.0, 0.0, 0.0], [0.0, 0.0, 1.0]])
    student = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 4.0], [0.0, 2.0, 0.0], [5.0, 0.0, 0.0]])
    # rows: agree | disagree, expert surer | disagree, student surer | disagree, equally sure | disagree, student surer
    labels, keep = self_labels(teacher, student)
    assert labels.tolist() == [0, 0, 1, 0, 2]
    assert keep.tolist() == [True, True, False, True, False]
    labels, keep = self_labels(teacher, student, confidence_filter=False)
    assert keep.all() and labels.tolist() == [0, 0, 1, 0, 2]


def test_trainable_parameter_counts(tiny_suite):
    suite = tiny_suite
    P, T, d = len(tv.float_keys(suite.pretrained)), len(suite.tasks), 8
    heads = sum(c * d + c for c in (3, 4, 5))
    assert count_parameters(build_tinting(suite, TintingParams()))["trainable"] == P * T + heads
    ln_post = suite.pretrained["ln_post.weight"].numel() + suite.pretrained["ln_post.bias"].numel()
    assert count_parameters(build_tinting(suite, TintingParams(layer="ln_post")))["trainable"] == P * T + T * ln_post
    with pytest.raises(Exception, match="ln_post"):
        build_tinting(suite, TintingParams(layer="no_such_layer"))


def test_self_labelling_moves_toward_the_experts(micro_suite):
    suite = micro_suite
    model = build_tinting(suite, TintingParams())
    experts = PerTaskModel(suite.build_encoder(), suite.finetuned, suite.make_heads())

    def agreement():
        with torch.no_grad():
            hits = 0
            for t in suite.tasks:
                x = suite.data[t].preprocess(suite.data[t].test_images)
                hits += (model.logits(x, t).argmax(-1) == experts.logits(x, t).argmax(-1)).sum().item()
            return hits / sum(len(suite.data[t].test_images) for t in suite.tasks)

    before = agreement()
    info = Tinting().adapt(model, suite, TintingParams(epochs=8), RunContext())
    assert agreement() > before + 0.04
    assert all(len(v) == 8 and all(0.0 <= f <= 1.0 for f in v) for v in info["kept_fraction"].values())
    lam = torch.tensor(info["coefficients"]["values"])
    assert lam.shape == (len(model.merged.keys), 3) and lam.min() >= 0 and lam.max() <= 1
    assert not torch.allclose(lam, torch.full_like(lam, 0.3))


def test_runs_and_caches_on_micro(micro_suite, micro_cache):
    config = RunConfig("micro", "tinting", {"epochs": 2}, preset="fast")
    result = run(config, suite=micro_suite, cache_dir=micro_cache, device="cpu")
    assert run(config, suite=micro_suite, cache_dir=micro_cache, device="cpu")["created"] == result["created"]
    P = len(tv.float_keys(micro_suite.pretrained))
    heads = sum(h["weight"].numel() + h["bias"].numel() for h in micro_suite.heads.values())
    assert result["parameters"]["trainable"] == P * 3 + heads
    assert {t: len(v) for t, v in result["info"]["kept_fraction"].items()} == dict.fromkeys(micro_suite.tasks, 2)
    model = load_model(result, micro_suite, cache_dir=micro_cache)
    trained = torch.tensor(result["info"]["coefficients"]["values"])
    assert torch.allclose(model.merged.lambdas(), trained)
