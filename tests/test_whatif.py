"""The live what-if engine (issue #20): its merges are the methods' merges, its accuracy is evaluation on the
subsample, its projection is a fit applied, and the CLI prints the same numbers."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from merging.cli import main
from merging.features import FINAL
from merging.methods import get_method, make_params
from merging.metrics import mean_l1
from merging.model import PerTaskModel
from merging.representations import extract, sample_indices
from merging.whatif import WhatIf, fit_basis, task_vector_sizes


@pytest.fixture(scope="module")
def tiny_engine():
    from conftest import random_suite

    suite = random_suite()
    return suite, WhatIf(suite, n=12)


@pytest.mark.parametrize("scaling", [0.3, 0.75])
def test_task_arithmetic_state_is_the_methods_state(tiny_engine, scaling):
    suite, engine = tiny_engine
    method = get_method("task_arithmetic")
    expected = method.merge_state_dicts(suite.pretrained, suite.finetuned, make_params(method, {"scaling": scaling}))
    got = engine.merged_state("task_arithmetic", scaling)
    assert set(got) == set(expected)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


@pytest.mark.parametrize("density", [0.1, 0.5])
def test_ties_state_is_the_methods_state(tiny_engine, density):
    suite, engine = tiny_engine
    method = get_method("ties")
    expected = method.merge_state_dicts(suite.pretrained, suite.finetuned, make_params(method, {"scaling": 0.4, "density": density}))
    got = engine.merged_state("ties", 0.4, density)
    for k in expected:
        assert torch.equal(got[k], expected[k]), k


def test_fit_basis_applied_to_the_fitted_points_reproduces_pca():
    from sklearn.decomposition import PCA

    x = np.random.default_rng(0).normal(size=(40, 6)) @ np.diag([5, 3, 1, 0.5, 0.2, 0.1])
    basis = fit_basis(x)
    ours, sk = basis.apply(x), PCA(n_components=2, svd_solver="full").fit_transform(x)
    signs = np.sign((ours * sk).sum(axis=0))
    assert ours == pytest.approx(sk * signs, abs=1e-9)
    assert np.allclose(basis.components @ basis.components.T, np.eye(2))
    again = fit_basis(x)  # the sign rule makes two fits the same view
    assert np.array_equal(again.components, basis.components)


def test_accuracy_and_bias_equal_evaluation_on_the_subsample(micro_suite):
    """Accuracy at λ is ``extract``'s accuracy of the task-arithmetic model on the same images; L1 is ``mean_l1``
    of the individual and merged features; the references' points stay put while the merged points move."""
    engine = WhatIf(micro_suite, n=30)
    point = engine.score("task_arithmetic", 0.45)
    method = get_method("task_arithmetic")
    merged = method.build(micro_suite, make_params(method, {"scaling": 0.45}))
    individual = PerTaskModel(micro_suite.build_encoder(), micro_suite.finetuned, micro_suite.make_heads())
    for task in micro_suite.tasks:
        indices = sample_indices(micro_suite.data[task].test_labels, 30, 0)
        assert torch.equal(engine.indices[task], indices)
        fm = extract(merged, micro_suite.data[task], task, indices, device="cpu")
        fi = extract(individual, micro_suite.data[task], task, indices, device="cpu")
        assert point.accuracy[task] == pytest.approx(fm.accuracy)
        assert engine.reference_accuracy["individual"][task] == pytest.approx(fi.accuracy)
        assert point.l1[task] == pytest.approx(mean_l1(fi.layer(FINAL), fm.layer(FINAL)), rel=1e-4)
        assert point.points[task] == pytest.approx(engine.bases[task].apply(fm.embedding), abs=1e-3)
    other = engine.score("task_arithmetic", 0.9)
    task = micro_suite.tasks[0]
    before = engine.frame(point, task)
    after = engine.frame(other, task)
    still = before["model"] != "merged"
    assert np.array_equal(before.loc[still, ["x", "y"]].to_numpy(), after.loc[still, ["x", "y"]].to_numpy())
    assert not np.allclose(before.loc[~still, ["x", "y"]].to_numpy(), after.loc[~still, ["x", "y"]].to_numpy())
    assert engine.score("task_arithmetic", 0.45).accuracy == point.accuracy  # from memory


def test_task_vector_sizes(tiny_engine):
    suite, _ = tiny_engine
    sizes = task_vector_sizes(suite, "a")
    assert list(sizes["layer"]) == ["embedding", "block 0", "block 1", "output"]
    tau = suite.task_vectors(["a"])[0]
    total = sum(float(v.double().pow(2).sum()) for v in tau.values()) ** 0.5
    assert float((sizes["norm"] ** 2).sum()) ** 0.5 == pytest.approx(total)
    assert int(sizes["parameters"].sum()) == sum(v.numel() for v in tau.values())


def test_cli_prints_the_engines_numbers(micro_suite, micro_cache, capsys):
    assert main(["whatif", "--suite", "micro", "--cache-dir", str(micro_cache), "--device", "cpu", "--n", "30", "--scaling", "0.45"]) == 0
    out = capsys.readouterr().out
    assert "subsample" in out
    row = next(line for line in out.splitlines() if line.startswith("λ=0.45"))
    engine = WhatIf(micro_suite, n=30)
    expected = engine.score("task_arithmetic", 0.45).accuracy
    printed = [float(v) for v in row.split()[1 : 1 + len(expected)]]
    assert printed == pytest.approx([expected[t] for t in micro_suite.tasks], abs=0.005)
    assert main(["whatif", "--suite", "micro", "--cache-dir", str(micro_cache), "--density", "2", "--method", "ties"]) == 2
