"""Task-vector geometry (issue 19, view 1) on constructed task vectors with known answers, and the cached view."""

import numpy as np
import pytest
import torch

from merging import task_vectors as tv
from merging.geometry import (
    block_cosines,
    block_of,
    cosine_matrix,
    effective_rank,
    kth_smallest,
    sign_conflicts,
    singular_values,
    spectra,
    suite_geometry,
    tasks_per_weight,
    ties_counts,
)


def test_orthogonal_task_vectors_give_the_identity():
    eye = torch.eye(4)
    vectors = [{"a.weight": eye[i, :2].reshape(1, 2) * (i + 1), "b.weight": eye[i, 2:]} for i in range(4)]
    np.testing.assert_allclose(cosine_matrix(vectors), np.eye(4), atol=1e-12)


def test_cosine_of_constructed_vectors():
    vectors = [{"transformer.resblocks.0.w": torch.tensor([1.0, 0.0]), "transformer.resblocks.1.w": torch.tensor([1.0])},
               {"transformer.resblocks.0.w": torch.tensor([1.0, 1.0]), "transformer.resblocks.1.w": torch.tensor([-2.0])}]
    # whole model: (1 + 0 - 2) / (sqrt(2) * sqrt(6))
    assert cosine_matrix(vectors)[0, 1] == pytest.approx(-1 / np.sqrt(12))
    per_block = block_cosines(vectors)
    assert per_block["block0"][0, 1] == pytest.approx(1 / np.sqrt(2))
    assert per_block["block1"][0, 1] == pytest.approx(-1.0)
    assert block_of("transformer.resblocks.11.mlp.c_fc.weight") == "block11"
    assert block_of("conv1.weight") == "embedding" and block_of("ln_post.weight") == "output"


def test_sign_conflicts_count_entries_with_both_signs():
    vectors = [{"w": torch.tensor([1.0, 1.0, 0.0, -1.0])}, {"w": torch.tensor([-1.0, 2.0, 3.0, 0.0])}, {"w": torch.tensor([0.0, 1.0, 0.0, -2.0])}]
    assert sign_conflicts(vectors)["conflict"].tolist() == [0.25]  # only entry 0 has a + and a -


def test_effective_rank_and_spectra():
    assert effective_rank(torch.tensor([3.0, 0.0, 0.0])) == pytest.approx(1.0)
    assert effective_rank(torch.tensor([2.0, 2.0, 2.0, 2.0])) == pytest.approx(4.0)
    assert effective_rank(torch.zeros(3)) == 0.0
    u, v = torch.randn(5, 1), torch.randn(1, 3)
    table = spectra({"rank1": {"w": u @ v}, "eye": {"w": torch.eye(5, 3)}}, ["w"])
    rank1 = table[table["model"] == "rank1"]["sigma"].to_numpy()
    assert rank1[0] == pytest.approx(float(u.norm() * v.norm()), rel=1e-5) and np.all(rank1[1:] < 1e-5)
    assert table[table["model"] == "eye"]["sigma"].tolist() == pytest.approx([1.0, 1.0, 1.0])
    wide = torch.randn(4, 7, 30)
    assert singular_values(wide).float() == pytest.approx(torch.linalg.svdvals(wide), rel=1e-4)


def test_tasks_per_weight_counts_disjoint_vectors_once():
    vectors = [{"w": torch.tensor([1.0, 0, 0, 0, 0, 0])}, {"w": torch.tensor([0, 1.0, 0, 0, 0, 0])}]
    table = tasks_per_weight(vectors, density=1.0, tall_lambda=0.4)
    ties = table[table["rule"].str.startswith("TIES")].set_index("tasks")["fraction"]
    tall = table[table["rule"].str.startswith("TALL")].set_index("tasks")["fraction"]
    assert ties.tolist() == pytest.approx([4 / 6, 2 / 6, 0.0])
    assert tall.tolist() == pytest.approx([4 / 6, 2 / 6, 0.0])  # each task's entry is selfish: kept by its own mask only


@pytest.mark.parametrize("density", [0.2, 0.5, 1.0])
def test_ties_counts_equal_the_ties_vectors(tiny_suite, density):
    finetuned = [tiny_suite.finetuned[t] for t in tiny_suite.tasks]
    kept = tv.ties_vectors(tiny_suite.pretrained, finetuned, density)
    counts = ties_counts(tiny_suite.task_vectors(), density)
    for k, c in counts.items():
        assert torch.equal(c, sum((v[k] != 0).long() for v in kept)), k


def test_kth_smallest_is_exact_with_ties_and_a_missed_bracket():
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(30_000, generator=g), torch.zeros(5_000), torch.full((100,), 2.0)])
    for k in (1, 17, 20_000, 30_001, 34_999, 35_050, 35_100):
        assert kth_smallest(x, k, sample=1000) == x.kthvalue(k).values, k
    assert kth_smallest(x, 20_000, sample=5) == x.kthvalue(20_000).values  # a 5-sample bracket: still exact


def test_suite_geometry_is_cached(tiny_suite, tmp_path):
    first = suite_geometry(tiny_suite, merges=("task_arithmetic", "tsv_m"), cache_dir=tmp_path)
    assert first.cosine.shape == (3, 3) and np.allclose(np.diag(first.cosine.to_numpy()), 1.0)
    assert set(first.spectrum["model"]) == {"a", "b", "c", "task_arithmetic", "tsv_m"}
    assert first.tasks_per_weight.groupby("rule")["fraction"].sum().tolist() == pytest.approx([1.0, 1.0])
    files = list((tmp_path / "why").glob("geometry-*.json"))
    assert len(files) == 1
    again = suite_geometry(tiny_suite, merges=("task_arithmetic", "tsv_m"), cache_dir=tmp_path)
    assert again.cosine.equals(first.cosine) and again.ranks.equals(first.ranks)
