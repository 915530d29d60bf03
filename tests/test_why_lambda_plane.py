"""The λ plane (issue 19, view 2): its corners and axes are the pretrained model and single-task task arithmetic;
weight disentanglement is 0 on a task's own axis and > 0 when two task vectors interfere."""

import numpy as np
import pytest
import torch

from merging import task_vectors as tv
from merging.errors import ConfigError
from merging.lambda_plane import compute_lambda_plane, lambda_grid, lambda_plane
from merging.model import StaticModel
from merging.representations import sample_indices

GRID = [0.0, 0.5, 1.0]


def _accuracy(suite, state, task, n):
    model = StaticModel(suite.build_encoder(), state, suite.tasks, suite.make_heads()).eval()
    data = suite.data[task]
    idx = sample_indices(data.test_labels, n, 0)
    with torch.no_grad():
        pred = model.logits(data.preprocess(data.test_images[idx]), task).argmax(-1)
    return 100.0 * float((pred == data.test_labels[idx]).double().mean())


def test_corner_is_pretrained_and_axis_is_single_task_arithmetic(tiny_suite):
    suite = tiny_suite
    plane = compute_lambda_plane(suite, "a", "b", GRID, n=20, device="cpu")
    for t in ("a", "b"):
        assert plane.accuracy[t][0, 0] == _accuracy(suite, suite.pretrained, t, 20)
    for k, lam in enumerate(GRID):
        alone = tv.add_scaled(suite.pretrained, suite.task_vectors(["a"]), [lam])
        assert plane.accuracy["a"][k, 0] == _accuracy(suite, alone, "a", 20)
    assert np.all(plane.disagreement["a"][:, 0] == 0) and np.all(plane.disagreement["b"][0, :] == 0)
    assert plane.disentanglement_error[0, 0] == 0


def test_interfering_task_vectors_have_positive_disentanglement_error(tiny_suite):
    suite = tiny_suite
    vectors = suite.task_vectors(["a"])
    # task b's vector is minus 3 times task a's: adding it destroys what a's vector does
    suite.finetuned["b"] = {k: (v - 3 * vectors[0][k] if k in vectors[0] else v) for k, v in suite.pretrained.items()}
    plane = compute_lambda_plane(suite, "a", "b", GRID, n=24, device="cpu")
    assert plane.disagreement["a"][2, 2] > 0.2
    assert plane.disentanglement_error[1:, 1:].min() > 0


def test_cached_and_bad_input(tiny_suite, tmp_path):
    first = lambda_plane(tiny_suite, "a", "c", GRID, n=12, cache_dir=tmp_path, device="cpu")
    assert len(list((tmp_path / "why").glob("lambda-*.json"))) == 1
    again = lambda_plane(tiny_suite, "a", "c", GRID, n=12, cache_dir=tmp_path, device="cpu")
    assert np.array_equal(again.accuracy["c"], first.accuracy["c"]) and again.best() == first.best()
    assert len(first.frame()) == 9
    assert lambda_grid() == pytest.approx([0.15 * i for i in range(11)])
    with pytest.raises(ConfigError, match="two different tasks"):
        compute_lambda_plane(tiny_suite, "a", "a", GRID)
    with pytest.raises(ConfigError, match="unknown task"):
        compute_lambda_plane(tiny_suite, "a", "zebra", GRID)
