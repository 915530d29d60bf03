"""The functional merged forward at init equals the static task-arithmetic merge."""

import torch

from merging import task_vectors as tv
from merging.functional import MergedEncoder


def test_merged_encoder_at_init_equals_task_arithmetic(tiny_suite):
    suite = tiny_suite
    images = suite.data["a"].preprocess(suite.data["a"].test_images[:8])
    for granularity in ("task", "layer"):
        merged = MergedEncoder(suite.build_encoder(), suite.pretrained, suite.task_vectors(), granularity=granularity, init=0.3)
        static = suite.build_encoder()
        static.load_state_dict(tv.task_arithmetic(suite.pretrained, list(suite.finetuned.values()), 0.3))
        with torch.no_grad():
            assert torch.allclose(merged(images), static(images), atol=1e-5)


def test_merged_encoder_clamps_and_gets_gradients(tiny_suite):
    suite = tiny_suite
    merged = MergedEncoder(suite.build_encoder(), suite.pretrained, suite.task_vectors(), granularity="layer")
    with torch.no_grad():
        merged.coefficients[0, 0] = 1.7
        merged.coefficients[1, 1] = -0.4
    lam = merged.lambdas()
    assert lam.max().item() == 1.0 and lam.min().item() == 0.0
    images = suite.data["a"].preprocess(suite.data["a"].test_images[:4])
    merged(images).sum().backward()
    assert merged.coefficients.grad is not None and merged.coefficients.grad.abs().sum() > 0
