"""Features: stratified samples, row alignment with samples/labels/predictions, the disk cache, and the CLI."""

import pandas as pd
import pytest
import torch

from merging import artifacts
from merging.artifacts import run_features
from merging.cli import main
from merging.methods import METHODS
from merging.model import MultiTaskModel
from merging.representations import cached_features, extract, sample_indices, sample_set_id
from merging.runs import RunConfig, build_model, run


def _model(suite, name="task_arithmetic"):
    """The method's model at init, its inputs (Surgery's base) resolved as a run resolves them."""
    return build_model(RunConfig(suite.name, name), suite, device="cpu")[0].eval()


class Counting:
    """Counts how often the loader builds the model and how often the model encodes a batch."""

    def __init__(self, model):
        self.model, self.loads, self.encodes, self.blocks = model, 0, 0, 0
        encode, blocks = model.encode, model.block_features

        def counted_encode(images, task):
            self.encodes += 1
            return encode(images, task)

        def counted_blocks(images, task):
            self.blocks += 1
            return blocks(images, task)

        model.encode, model.block_features = counted_encode, counted_blocks

    def __call__(self):
        self.loads += 1
        return self.model


def test_stratified_sample_is_deterministic_balanced_and_sorted():
    labels = torch.arange(300) % 7
    a, b = sample_indices(labels, 50, seed=3), sample_indices(labels, 50, seed=3)
    assert torch.equal(a, b)
    assert not torch.equal(a, sample_indices(labels, 50, seed=4))
    assert len(a) == 50 and len(a.unique()) == 50 and torch.equal(a, a.sort().values)
    counts = torch.bincount(labels[a], minlength=7)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 50
    assert torch.equal(sample_indices(labels, None), torch.arange(300))
    assert torch.equal(sample_indices(labels, 1000), torch.arange(300))


def test_stratified_sample_fills_up_from_larger_classes():
    labels = torch.tensor([0] * 3 + [1] * 40 + [2] * 40)
    counts = torch.bincount(labels[sample_indices(labels, 30, seed=0)], minlength=3)
    assert counts.tolist() == [3, 14, 13] or counts.tolist() == [3, 13, 14]


@pytest.mark.parametrize("method", ["individual", "task_arithmetic"])
def test_rows_align_with_samples_labels_and_predictions(tiny_suite, method):
    model = _model(tiny_suite, method)
    data = tiny_suite.data["b"]
    idx = torch.tensor([1, 5, 6, 11, 20])
    fs = extract(model, data, "b", idx, layers=True, device="cpu", batch_size=2)
    images = data.preprocess(data.test_images[idx])
    with torch.no_grad():
        assert torch.allclose(fs.embedding, model.encode(images, "b"), atol=1e-6)
        assert torch.equal(fs.predictions, model.logits(images, "b").argmax(-1))
        blocks = model.block_features(images, "b")
    assert torch.equal(fs.indices, idx) and torch.equal(fs.labels, data.test_labels[idx])
    assert len(fs.blocks) == 2 and fs.blocks[1].shape == (5, 16)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(fs.blocks, blocks, strict=True))
    frame = fs.frame("m")
    assert frame["sample"].tolist() == idx.tolist() and frame["classname"].tolist() == [data.classnames[i] for i in fs.labels]
    assert frame["correct"].tolist() == (fs.predictions == fs.labels).tolist()


@pytest.mark.parametrize("method", list(METHODS))
def test_every_registered_method_gives_aligned_features_and_blocks(tiny_suite, method):
    model = _model(tiny_suite, method)
    data = tiny_suite.data["c"]
    fs = extract(model, data, "c", layers=True, device="cpu", batch_size=10)
    with torch.no_grad():
        logits = model.logits(data.preprocess(data.test_images), "c")
    assert fs.embedding.shape == (24, 8) and torch.isfinite(fs.embedding).all()
    assert torch.equal(fs.predictions, logits.argmax(-1)) and torch.equal(fs.labels, data.test_labels)
    assert len(fs.blocks) == 2 and all(b.shape == (24, 16) for b in fs.blocks)
    with torch.no_grad():  # one pass for features and blocks where the model allows it: the same numbers as two
        x = data.preprocess(data.test_images)
        torch.testing.assert_close(fs.embedding, model.encode(x, "c"), rtol=1e-5, atol=1e-6)
        for got, want in zip(fs.blocks, model.block_features(x, "c"), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_a_model_that_overrides_logits_is_asked_for_its_logits(tiny_suite):
    class Flipped(MultiTaskModel):
        def __init__(self, inner):
            super().__init__(inner.tasks, inner.heads)
            self.inner = inner

        def encode(self, images, task):
            return self.inner.encode(images, task)

        def logits(self, images, task):
            return -self.inner.logits(images, task)

    inner = _model(tiny_suite)
    data = tiny_suite.data["c"]
    plain = extract(inner, data, "c", device="cpu")
    flipped = extract(Flipped(inner), data, "c", device="cpu")
    with torch.no_grad():
        expected = (-inner.logits(data.preprocess(data.test_images), "c")).argmax(-1)
    assert torch.equal(flipped.predictions, expected) and not torch.equal(flipped.predictions, plain.predictions)


def test_cached_equals_recomputed_and_second_call_reads_the_file(tiny_suite, tmp_path):
    counter = Counting(_model(tiny_suite))
    idx = sample_indices(tiny_suite.data["a"].test_labels, 12, seed=0)
    first = cached_features(counter, "ta-key", tiny_suite, "a", idx, cache_dir=tmp_path, device="cpu")
    assert counter.loads == 1 and counter.encodes == 1
    second = cached_features(counter, "ta-key", tiny_suite, "a", idx, cache_dir=tmp_path, device="cpu")
    assert counter.loads == 1 and counter.encodes == 1
    fresh = extract(_model(tiny_suite), tiny_suite.data["a"], "a", idx, device="cpu")
    for fs in (first, second):
        assert torch.equal(fs.embedding, fresh.embedding) and torch.equal(fs.predictions, fresh.predictions)
    assert second.key == f"ta-key/a/{sample_set_id(idx)}"
    with_blocks = cached_features(counter, "ta-key", tiny_suite, "a", idx, layers=True, cache_dir=tmp_path, device="cpu")
    assert counter.encodes == 1 and counter.blocks == 1 and len(with_blocks.blocks) == 2
    cached_features(counter, "ta-key", tiny_suite, "a", idx, layers=True, cache_dir=tmp_path, device="cpu")
    assert counter.loads == 2 and counter.blocks == 1
    other = cached_features(counter, "ta-key", tiny_suite, "a", idx[:6], cache_dir=tmp_path, device="cpu")
    assert counter.encodes == 2 and torch.equal(other.embedding, fresh.embedding[:6])


def test_run_features_rebuild_the_model_only_on_a_miss(tiny_suite, tmp_path, monkeypatch):
    result = run(RunConfig("random", "task_arithmetic"), tiny_suite, cache_dir=tmp_path, device="cpu")
    first = run_features(result, tiny_suite, n=9, cache_dir=tmp_path, device="cpu")
    assert list(first) == tiny_suite.tasks and all(len(fs.indices) == 9 for fs in first.values())

    def no_model(*_a, **_k):
        raise AssertionError("features should have come from the cache")

    monkeypatch.setattr(artifacts, "load_model", no_model)
    second = run_features(result, tiny_suite, n=9, cache_dir=tmp_path, device="cpu")
    assert all(torch.equal(first[t].embedding, second[t].embedding) for t in first)


def test_cli_features_project_and_metrics_on_micro(micro_suite, micro_cache, tmp_path, capsys):
    common = ["--suite", "micro", "--n", "30", "--cache-dir", str(micro_cache), "--device", "cpu"]
    assert main(["features", "--method", "task_arithmetic:scaling=0.3", "--layers", *common]) == 0
    out = capsys.readouterr().out
    assert all(t in out for t in micro_suite.tasks) and "task_arithmetic:scaling=0.3" in out

    html, csv = tmp_path / "p.html", tmp_path / "p.csv"
    assert main(["project", "--methods", "individual,task_arithmetic", "--projection", "pca", "--html", str(html), "--csv", str(csv), *common]) == 0
    df = pd.read_csv(csv)
    assert len(df) == 2 * 3 * 30 and set(df["model"]) == {"individual", "task_arithmetic"} and set(df["task"]) == set(micro_suite.tasks)
    assert {"x", "y", "sample", "label", "classname", "prediction", "correct"} <= set(df.columns)
    text = html.read_text()
    assert html.stat().st_size > 1_000_000 and "plotly" in text and '<script src="https://cdn' not in text

    metrics_csv = tmp_path / "m.csv"
    assert main(["metrics", "--methods", "task_arithmetic,weight_averaging", "--reference", "individual", "--csv", str(metrics_csv), *common]) == 0
    assert "knn_overlap" in capsys.readouterr().out
    table = pd.read_csv(metrics_csv)
    l1 = table[(table.metric == "l1")]
    assert set(l1["model"]) == {"task_arithmetic", "weight_averaging"} and len(l1) == 6 and (l1["value"] > 0).all()
    trust = table[table.metric == "trustworthiness"]["value"]
    assert len(trust) == 9 and trust.between(0.5, 1.0).all()
