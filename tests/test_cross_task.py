"""Cross-task matrix: its diagonal is the per-task accuracy; rows differ only where encoders are task-specific."""

import pytest
import torch

from merging import task_vectors as tv
from merging.cross_task import cross_task_matrix
from merging.evaluation import evaluate
from merging.methods.tinting import TintingParams, build_tinting
from merging.model import PerTaskModel, StaticModel


def test_static_merge_has_identical_rows_and_accuracy_diagonal(tiny_suite):
    suite = tiny_suite
    model = StaticModel(suite.build_encoder(), tv.task_arithmetic(suite.pretrained, list(suite.finetuned.values()), 0.3), suite.tasks, suite.make_heads())
    table = cross_task_matrix(model, suite, batch_size=10, device="cpu")
    assert list(table.index) == list(table.columns) == suite.tasks
    acc = evaluate(model, suite, device="cpu")
    for t in suite.tasks:
        assert table.loc[t, t] == pytest.approx(acc[t]["accuracy"])
        assert (table[t] == table.loc[t, t]).all()


def test_per_task_encoders_and_tints_change_their_row_only(tiny_suite):
    suite = tiny_suite
    individual = PerTaskModel(suite.build_encoder(), suite.finetuned, suite.make_heads())
    table = cross_task_matrix(individual, suite, device="cpu")
    acc = evaluate(individual, suite, device="cpu")
    assert [table.loc[t, t] for t in suite.tasks] == pytest.approx([acc[t]["accuracy"] for t in suite.tasks])

    model = build_tinting(suite, TintingParams(layer="ln_post"))
    base = cross_task_matrix(model, suite, device="cpu")
    with torch.no_grad():
        model.tints["a"]["ln_post__weight"].add_(torch.randn(16) * 3)
    tinted = cross_task_matrix(model, suite, device="cpu")
    assert (tinted.loc[["b", "c"]] == base.loc[["b", "c"]]).all().all()
    assert (tinted.loc["a"] != base.loc["a"]).any()
