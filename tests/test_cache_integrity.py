"""A cache that never returns a stale number (issue #17, points 1, 2 and 10).

The fingerprint covers every byte a result depends on (weights, images, labels, class names and their order,
heads), a non-finite model is refused before anything is cached, and a damaged cache entry is recomputed
with one warning line instead of being read or ending in a traceback.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import random_suite
from PIL import Image
from safetensors.torch import save_file
from test_clip_suites import ARCH, tiny_clip

from merging.errors import ConfigError
from merging.hashing import FileDigests, tensor_digest
from merging.io import remove_stale_temps
from merging.methods import METHODS, make_params, specs
from merging.runs import RunConfig, check_finite_model, load_model, run, run_dir

ROOT = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------------------------- fingerprint: every byte counts
def _fingerprint_after(change) -> tuple[str, str]:
    suite = random_suite()
    before = suite.fingerprint
    changed = random_suite()
    change(changed)
    return before, changed.fingerprint


def _permute_rows(s):
    w = s.finetuned["a"]["conv1.weight"]
    s.finetuned["a"]["conv1.weight"] = w.flip(0)  # same sum, same shape


def _transpose_square(s):
    key = next(k for k, v in s.pretrained.items() if v.ndim == 2 and v.shape[0] == v.shape[1])
    s.pretrained[key] = s.pretrained[key].T.contiguous()


def _other_images(s):
    s.data["b"].test_images = s.data["b"].test_images.flip(0).contiguous()  # same images, other order: labels now wrong


def _same_count_and_label_sum(s):
    labels = s.data["c"].test_labels.clone()
    labels[0], labels[1] = labels[1].item(), labels[0].item()  # same count, same sum, two labels swapped
    s.data["c"].test_labels = labels


def _classnames_order(s):
    s.data["a"].classnames = list(reversed(s.data["a"].classnames))


def _head_rows(s):
    s.heads["b"]["weight"] = s.heads["b"]["weight"].flip(0).contiguous()


def _train_images(s):
    s.data["a"].train_images = 255 - s.data["a"].train_images


@pytest.mark.parametrize("change", [_permute_rows, _transpose_square, _other_images, _same_count_and_label_sum, _classnames_order, _head_rows, _train_images])
def test_any_change_that_keeps_sums_changes_the_fingerprint(change):
    before, after = _fingerprint_after(change)
    assert before != after
    assert random_suite().fingerprint == before  # and the same inputs give the same fingerprint


def test_a_runs_key_depends_only_on_its_own_tasks(tmp_path):
    """Changing task c's images recomputes runs that cover c, and nothing else."""
    suite, cache = random_suite(), tmp_path / "cache"
    on_ab, on_all = RunConfig("random", "task_arithmetic", tasks=("a", "b")), RunConfig("random", "task_arithmetic")
    first_ab, first_all = run(on_ab, suite, cache, "cpu"), run(on_all, suite, cache, "cpu")
    changed = random_suite()
    changed.data["c"].test_images = 255 - changed.data["c"].test_images
    again_ab, again_all = run(on_ab, changed, cache, "cpu"), run(on_all, changed, cache, "cpu")
    assert again_ab["key"] == first_ab["key"] and again_ab["created"] == first_ab["created"]
    assert again_all["key"] != first_all["key"]
    assert again_all["accuracy"]["a"] == first_all["accuracy"]["a"] and again_all["accuracy"]["c"] != first_all["accuracy"]["c"]


def test_tensor_digest_reads_every_byte():
    x = torch.arange(16.0).reshape(4, 4)
    assert tensor_digest(x) == tensor_digest(x.clone())
    assert len({tensor_digest(x), tensor_digest(x.T.contiguous()), tensor_digest(x.flip(1)), tensor_digest(x.double()), tensor_digest(x.reshape(2, 8))}) == 5


def test_file_digests_are_remembered_by_size_and_mtime(tmp_path, monkeypatch):
    import merging.hashing as hashing

    files = []
    for i in range(3):
        files.append(tmp_path / f"{i}.bin")
        files[-1].write_bytes(bytes([i]) * 100)
    memo = tmp_path / "memo.json"
    first = FileDigests(memo).digests(files)
    reads = []
    real = hashing.file_digest
    monkeypatch.setattr(hashing, "file_digest", lambda p: reads.append(p) or real(p))
    assert FileDigests(memo).digests(files) == first and reads == []  # a new process: read from the memo
    files[1].write_bytes(bytes([9]) * 100)  # same size, new content (and mtime)
    os.utime(files[1], ns=(1, 10**18))
    again = FileDigests(memo).digests(files)
    assert reads == [str(files[1])] and again[0] == first[0] and again[1] != first[1]
    memo.write_text("{not json")
    assert FileDigests(memo).digests(files) == again  # a damaged memo is ignored


# ------------------------------------------------------------------------------------- a real config suite changed on disk
def _bw_world(root: Path) -> Path:
    """One two-class task (black, white pictures) whose head file was fitted to the pretrained model: 100 % accuracy."""
    torch.manual_seed(0)
    model, cfg_path = tiny_clip(root)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    save_file(full, root / "pretrained.safetensors")
    save_file({k[len("visual."):]: v for k, v in full.items() if k.startswith("visual.")}, root / "bw.safetensors")
    for c, value in (("black", 0), ("white", 255)):
        (root / "data" / "bw" / "test" / c).mkdir(parents=True)
        for j in range(3):
            Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(root / "data" / "bw" / "test" / c / f"{j}.png")
    from open_clip.transform import PreprocessCfg, image_transform_v2

    tf = image_transform_v2(PreprocessCfg(**model.visual.preprocess_cfg), is_train=False)
    with torch.no_grad():
        rows = [model.encode_image(tf(Image.open(root / "data" / "bw" / "test" / c / "0.png")).unsqueeze(0))[0] for c in ("black", "white")]
    weight = 10 * torch.nn.functional.normalize(torch.stack(rows), dim=-1)
    save_file({"weight": weight.contiguous(), "bias": torch.zeros(2)}, root / "head_bw.safetensors")
    config = {"layout": "open_clip", "model": ARCH, "model_config": str(cfg_path), "data_root": "data", "tasks": ["bw"],
              "pretrained": "pretrained.safetensors", "finetuned": {"bw": "bw.safetensors"}, "heads": "files", "head_files": {"bw": "head_bw.safetensors"}}
    path = root / "bw.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def _accuracy(config: Path, cache: Path) -> tuple[float, str]:
    from merging.suites import get_suite

    result = run(RunConfig(str(config), "pretrained"), get_suite(str(config), cache_dir=cache), cache, "cpu")
    return result["accuracy"]["bw"], result["key"]


def test_reordered_classnames_and_replaced_images_are_never_served_from_the_cache(tmp_path):
    config, cache = _bw_world(tmp_path), tmp_path / "cache"
    acc, key = _accuracy(config, cache)
    assert acc == 100.0
    assert _accuracy(config, cache) == (100.0, key)  # unchanged inputs: the cached run

    (tmp_path / "names.txt").write_text("white\nblack\n")  # README's advice for a task that scores far off: fix the class order
    raw = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**raw, "classnames": {"bw": "names.txt"}}))
    acc, key2 = _accuracy(config, cache)
    assert (acc, key2 != key) == (0.0, True)

    config.write_text(yaml.safe_dump(raw))  # back to folder-name order: the first run again, from the cache
    assert _accuracy(config, cache) == (100.0, key)
    for c, value in (("black", 255), ("white", 0)):  # overwrite every test picture with the other class's
        for j in range(3):
            Image.fromarray(np.full((40, 40, 3), value, np.uint8)).save(tmp_path / "data" / "bw" / "test" / c / f"{j}.png")
    acc, key3 = _accuracy(config, cache)
    assert acc == 0.0 and key3 not in (key, key2)


# ------------------------------------------------------------------------------------- non-finite hyperparameters and models
def _float_hyperparameters():
    return [(m, h.name) for m, method in METHODS.items() for h in specs(method) if h.type == "float"]


@pytest.mark.parametrize(("method", "name"), _float_hyperparameters())
@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, 1e39])
def test_every_float_hyperparameter_refuses_non_finite_values(method, name, value):
    with pytest.raises(ConfigError, match=rf"method '{method}': hyperparameter '{name}' = .* (not a finite number|overflows the float32)"):
        make_params(METHODS[method], {name: value})


def test_a_model_whose_outputs_overflow_is_refused_and_nothing_is_cached(tmp_path):
    suite, cache = random_suite(), tmp_path / "cache"
    with pytest.raises(ConfigError, match="logits on task 'a' hold NaN or Inf values"):
        run(RunConfig("random", "task_arithmetic", {"scaling": 1e30}), suite, cache, "cpu")
    assert not list((cache / "runs").glob("*/result.json"))


def test_a_model_with_non_finite_weights_is_refused():
    from merging.errors import CheckpointError
    from merging.runs import build_model

    suite = random_suite()
    config = RunConfig("random", "weight_averaging")
    model = build_model(config, suite, device="cpu")[0]
    check_finite_model(model, config)  # finite: no error
    next(p for p in model.parameters() if p.is_floating_point()).data[0] = float("nan")
    with pytest.raises(CheckpointError, match="holds NaN or Inf values; nothing was evaluated or cached"):
        check_finite_model(model, config)


def _with_micro(micro_cache: Path, tmp_path: Path) -> Path:
    """A fresh cache holding a copy of the session's built ``micro`` suite (building it again takes half a minute)."""
    shutil.copytree(micro_cache / "suites", tmp_path / "suites", ignore=shutil.ignore_patterns(".*"))
    return tmp_path


def test_cli_refuses_nan_scaling_with_one_line_and_caches_nothing(tmp_path, micro_suite, micro_cache):
    _with_micro(micro_cache, tmp_path)
    out = subprocess.run([sys.executable, "-m", "merging", "run", "--suite", "micro", "--method", "task_arithmetic", "--set", "scaling=nan",
                          "--cache-dir", str(tmp_path)], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2 and out.stderr.strip().count("\n") == 0
    assert "hyperparameter 'scaling' = nan is not a finite number" in out.stderr
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------- damaged cache entries
@pytest.mark.parametrize("damage", ["truncate", "empty", "not a result"])
def test_damaged_run_result_is_recomputed_with_one_warning(tmp_path, caplog, damage):
    suite, cache = random_suite(), tmp_path / "cache"
    config = RunConfig("random", "task_arithmetic")
    first = run(config, suite, cache, "cpu")
    path = run_dir(cache, first["key"]) / "result.json"
    text = path.read_text()
    path.write_text({"truncate": text[: len(text) // 2], "empty": "", "not a result": json.dumps([1, 2])}[damage])
    with caplog.at_level(logging.WARNING, logger="merging"):
        again = run(config, suite, cache, "cpu")
    assert again["accuracy"] == first["accuracy"] and again["created"] >= first["created"]
    assert [r.getMessage() for r in caplog.records] == [f"warning: {path}: damaged run result ({r.getMessage().split('(', 1)[1]}"
                                                        for r in caplog.records] and len(caplog.records) == 1
    assert json.loads(path.read_text())["key"] == first["key"]


def test_damaged_learned_state_recomputes_the_run(tmp_path, caplog):
    suite, cache = random_suite(), tmp_path / "cache"
    config = RunConfig("random", "adamerging", {"steps": 2, "batch_size": 4, "batches_per_task": 1}, preset="fast")
    first = run(config, suite, cache, "cpu")
    state = run_dir(cache, first["key"]) / "state.safetensors"
    state.write_bytes(state.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="merging"):
        model = load_model(first, suite, cache)
    assert any("damaged run state" in r.getMessage() for r in caplog.records)
    with caplog.at_level(logging.WARNING, logger="merging"):
        again = run(config, suite, cache, "cpu")  # the recomputed run is cached again
    assert again["accuracy"] == first["accuracy"]
    assert torch.equal(model.trainable_state()["encoder.coefficients"], load_model(again, suite, cache).trainable_state()["encoder.coefficients"])


def test_damaged_features_and_cross_task_matrix_are_recomputed(tmp_path, caplog):
    from merging.artifacts import cached_cross_task_matrix, run_features
    from merging.representations import feature_files, features_dir, sample_indices

    suite, cache = random_suite(), tmp_path / "cache"
    result = run(RunConfig("random", "task_arithmetic"), suite, cache, "cpu")
    first = run_features(result, suite, ["a"], n=9, layers=True, cache_dir=cache)["a"]
    matrix = cached_cross_task_matrix(result, suite, cache)
    final, blocks = feature_files(features_dir(cache, result["key"], "a", sample_indices(suite.data["a"].test_labels, 9)))
    final.write_bytes(final.read_bytes()[:50])
    blocks.write_bytes(b"")
    (run_dir(cache, result["key"]) / "cross_task.csv").write_text("encoder,a\nb,oops\n")
    with caplog.at_level(logging.WARNING, logger="merging"):
        again = run_features(result, suite, ["a"], n=9, layers=True, cache_dir=cache)["a"]
        matrix_again = cached_cross_task_matrix(result, suite, cache)
    assert torch.equal(again.embedding, first.embedding) and all(torch.equal(x, y) for x, y in zip(again.blocks, first.blocks, strict=True))
    assert matrix_again.equals(matrix)
    messages = " | ".join(r.getMessage() for r in caplog.records)
    assert "damaged features cache" in messages and "damaged per-block features cache" in messages and "damaged cross-task matrix cache" in messages


def test_damaged_builtin_suite_is_rebuilt(tmp_path, caplog, micro_suite, micro_cache):
    from merging.suites import get_suite, mini8

    suite = get_suite("micro", cache_dir=_with_micro(micro_cache, tmp_path))
    assert suite.fingerprint == micro_suite.fingerprint
    folder = mini8.suite_dir("micro", 0, tmp_path)
    weights = folder / "weights.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with caplog.at_level(logging.WARNING, logger="merging"):
        rebuilt = get_suite("micro", cache_dir=tmp_path)
    assert rebuilt.fingerprint == suite.fingerprint
    assert any("damaged suite cache" in r.getMessage() for r in caplog.records)


def test_leftover_temp_files_of_dead_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    left = tmp_path / f".result.json.{dead}.abcd1234.tmp"
    live = tmp_path / f".result.json.{os.getpid()}.abcd1234.tmp"
    old = tmp_path / ".result.json.abcd1234.tmp"
    for p in (left, live, old):
        p.write_text("{")
    os.utime(old, (0, 0))
    assert remove_stale_temps(tmp_path) == 2
    assert live.exists() and not left.exists() and not old.exists()


def test_cli_run_table_and_features_on_a_damaged_result(tmp_path, micro_suite, micro_cache):
    _with_micro(micro_cache, tmp_path)
    common = ["--suite", "micro", "--cache-dir", str(tmp_path)]

    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "merging", *args], cwd=ROOT, capture_output=True, text=True, timeout=600)

    assert cli("run", "--method", "task_arithmetic", *common).returncode == 0
    (result,) = (tmp_path / "runs").glob("task_arithmetic-*/result.json")
    for command in (["run", "--method", "task_arithmetic"], ["table", "--methods", "task_arithmetic"], ["features", "--method", "task_arithmetic", "--n", "8"]):
        result.write_text('{"key": ')
        out = cli(*command, *common)
        assert out.returncode == 0, out.stderr
        assert "Traceback" not in out.stderr and out.stderr.count("damaged run result") == 1, out.stderr
        assert json.loads(result.read_text())["method"] == "task_arithmetic"
