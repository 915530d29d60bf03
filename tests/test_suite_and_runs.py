"""Built-in suite determinism and caching; runs: cache keys, atomic results, evaluation numbers."""

from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F

from merging.errors import ConfigError, DataError
from merging.evaluation import accuracy_table, evaluate, normalized_table
from merging.methods import BASELINES, get_method, make_params
from merging.runs import RunConfig, list_results, load_model, run, run_dir
from merging.suites import get_suite
from merging.suites import mini8 as builtin

TINY = replace(builtin.MICRO, n_train=32, n_test=16, pretext_images_per_task=32, pretext_steps=3, finetune_steps=2, pretext_batch=16, finetune_batch=8)


def test_suite_build_is_deterministic():
    a = builtin.build("micro", seed=3, recipe=TINY)
    b = builtin.build("micro", seed=3, recipe=TINY)
    c = builtin.build("micro", seed=4, recipe=TINY)
    for k in a.pretrained:
        assert torch.equal(a.pretrained[k], b.pretrained[k])
    for t in a.tasks:
        assert torch.equal(a.data[t].test_images, b.data[t].test_images)
        for k in a.finetuned[t]:
            assert torch.equal(a.finetuned[t][k], b.finetuned[t][k])
    assert a.fingerprint == b.fingerprint != c.fingerprint


def test_synonym_captions_and_feature_preservation():
    """mini8's recipe knobs: aliases join the vocabulary, per-task steps apply, and the preservation penalty keeps
    other families' features closer to the pretrained ones than plain fine-tuning does (README, "What mattered")."""
    knobs = replace(TINY, caption_aliases=3, p_canonical=0.2, finetune_steps=6, finetune_lr=5e-3, finetune_steps_tasks=(("digits", 1),))
    plain = builtin.build("micro", seed=1, recipe=knobs)
    kept = builtin.build("micro", seed=1, recipe=replace(knobs, preserve_weight=5.0, preserve_batch=8, preserve_images_per_task=16))
    vocab = plain.info["vocab"]
    assert {"red~1", "red~2", "0~2"} <= set(vocab) and "red~3" not in vocab
    assert all(torch.equal(plain.pretrained[k], kept.pretrained[k]) for k in plain.pretrained)  # only fine-tuning differs
    encoder = plain.build_encoder().eval()
    _, pre_images, _, _ = builtin._generate(knobs, 1)
    moved = {}
    for name, suite in (("plain", plain), ("kept", kept)):
        others = builtin._other_families(replace(knobs, preserve_images_per_task=16), pre_images, 0)
        x = suite.data[suite.tasks[0]].preprocess(others)
        with torch.no_grad():
            encoder.load_state_dict(suite.pretrained)
            before = encoder(x)
            encoder.load_state_dict(suite.finetuned[suite.tasks[0]])
            moved[name] = (encoder(x) - before).pow(2).sum(-1).mean().item()
    assert moved["kept"] < 0.5 * moved["plain"], moved
    digits_vector = sum((plain.finetuned["digits"][k] - plain.pretrained[k]).abs().sum() for k in plain.pretrained)
    colors_vector = sum((plain.finetuned["colors"][k] - plain.pretrained[k]).abs().sum() for k in plain.pretrained)
    assert 0 < digits_vector < colors_vector  # 1 step for digits, 6 for the others


def test_suite_save_load_roundtrip(tmp_path):
    suite = builtin.build("micro", seed=0, recipe=TINY)
    builtin.save(suite, tmp_path / "s")
    loaded = builtin.load(tmp_path / "s")
    assert loaded.fingerprint == suite.fingerprint
    assert loaded.tasks == suite.tasks and loaded.data["digits"].classnames == suite.data["digits"].classnames


def test_incomplete_suite_folder_is_not_read_as_valid(tmp_path):
    suite = builtin.build("micro", seed=0, recipe=TINY)
    builtin.save(suite, tmp_path / "s")
    (tmp_path / "s" / "manifest.json").unlink()
    with pytest.raises(Exception, match="never completely built"):
        builtin.load(tmp_path / "s")


def test_micro_suite_shape(micro_suite):
    assert micro_suite.tasks == ["colors", "gratings", "digits"]
    assert [micro_suite.data[t].num_classes for t in micro_suite.tasks] == [8, 6, 10]


def test_unknown_suite_and_task(micro_suite):
    with pytest.raises(ConfigError, match="available: mini8, micro"):
        builtin.get_recipe("mini9")
    with pytest.raises(ConfigError, match="known: colors, gratings, digits"):
        micro_suite.check_tasks(["svhn"])
    with pytest.raises(ConfigError, match="built-in suites"):
        get_suite("nope")


def test_empty_dataset_is_a_clear_error():
    with pytest.raises(DataError, match="empty"):
        builtin.TaskData("t", ["a"], torch.zeros(0, 8, 8, 3, dtype=torch.uint8), torch.zeros(0, dtype=torch.long))


def test_evaluate_matches_manual_accuracy(tiny_suite):
    model = get_method("task_arithmetic").build(tiny_suite, make_params(get_method("task_arithmetic")))
    scores = evaluate(model, tiny_suite, device="cpu", batch_size=5)
    for t in tiny_suite.tasks:
        d = tiny_suite.data[t]
        with torch.no_grad():
            logits = model.logits(d.preprocess(d.test_images), t)
        assert scores[t]["accuracy"] == pytest.approx(100 * (logits.argmax(-1) == d.test_labels).float().mean().item())
        assert scores[t]["loss"] == pytest.approx(F.cross_entropy(logits, d.test_labels).item(), rel=1e-5)


def test_individual_encodes_with_each_task_weights(tiny_suite):
    model = get_method("individual").build(tiny_suite, None)
    enc = tiny_suite.build_encoder()
    d = tiny_suite.data["b"]
    x = d.preprocess(d.test_images[:4])
    enc.load_state_dict(tiny_suite.finetuned["b"])
    with torch.no_grad():
        assert torch.allclose(model.encode(x, "b"), enc(x), atol=1e-6)


def test_runs_are_cached_and_reloadable(micro_suite, tmp_path):
    config = RunConfig("micro", "ties", {"density": "0.5"})
    first = run(config, micro_suite, cache_dir=tmp_path, device="cpu")
    assert first["params"] == {"scaling": 0.3, "density": 0.5, "per_tensor": False,  # the task-vector modifiers off (#21)
                               "dare": 0.0, "dare_seed": 0, "lines": False, "lines_alpha": None, "lines_beta": 0.5}
    assert (run_dir(tmp_path, first["key"]) / "result.json").is_file()
    again = run(config, micro_suite, cache_dir=tmp_path, device="cpu")
    assert again == first
    other = run(RunConfig("micro", "ties", {"density": "0.2"}), micro_suite, cache_dir=tmp_path, device="cpu")
    assert other["key"] != first["key"]
    model = load_model(first, micro_suite)
    assert evaluate(model, micro_suite, device="cpu")["digits"]["accuracy"] == pytest.approx(first["accuracy"]["digits"])
    assert {r["key"] for r in list_results(tmp_path, "micro")} == {first["key"], other["key"]}


def test_killed_run_leaves_nothing_valid(micro_suite, tmp_path, monkeypatch):
    import merging.runs as runs

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(runs, "evaluate", boom)
    with pytest.raises(KeyboardInterrupt):
        run(RunConfig("micro", "weight_averaging"), micro_suite, cache_dir=tmp_path, device="cpu")
    assert list_results(tmp_path) == []


def test_run_on_task_subset(micro_suite, tmp_path):
    r = run(RunConfig("micro", "task_arithmetic", tasks=("colors", "digits")), micro_suite, cache_dir=tmp_path, device="cpu")
    assert set(r["accuracy"]) == {"colors", "digits"}


def test_baseline_table_has_every_baseline(micro_suite, tmp_path):
    rows = {m: run(RunConfig("micro", m), micro_suite, cache_dir=tmp_path, device="cpu")["accuracy"] for m in BASELINES}
    table = accuracy_table(rows, micro_suite.tasks)
    assert list(table.index) == BASELINES
    assert table.loc["individual", "avg"] == pytest.approx(sum(rows["individual"].values()) / 3)
    assert normalized_table(table).loc["individual", "avg"] == pytest.approx(100.0)
