"""Choosing λ on a validation split (``scaling=auto``, issue #22 part 5), on generated suites and files.

The chosen λ must be the argmax of validation accuracies computed independently with ``merging.evaluation``;
the test split must never enter the choice; the auto run must score the test split exactly like the fixed-λ
run at the chosen value. Real suites get their validation split from a ``val/`` folder (or table split) or
carve it from train by ``val_fraction``; mini8 carves it from its training images at load time.
"""

from __future__ import annotations

import io
import json
from dataclasses import replace

import numpy as np
import pytest
import torch
import yaml
from conftest import random_suite
from PIL import Image
from safetensors.torch import save_file
from test_clip_suites import ARCH, tiny_clip

from merging import selection
from merging.cli import main
from merging.errors import ConfigError, DataError
from merging.evaluation import evaluate
from merging.methods import METHODS, accepts_auto, make_params
from merging.runs import RunConfig, build_model, cached_result, load_model, run, run_key
from merging.suites import get_suite
from merging.suites.base import carve_indices
from merging.suites.clip.datasets import ImageRows, load_data
from merging.suites.clip.images import ImageFiles
from merging.suites.config import load_config

SMALL_GRID = (0.0, 0.3, 0.6, 0.9)
SCHEMA = {"hyperparameter", "grid", "accuracy", "per_task", "chosen", "split", "images", "rule"}


def val_suite(planted: float | None = 0.6, n_val: int = 16, seed: int = 0):
    """``random_suite`` with its own validation images per task; with ``planted``, the val labels are the predictions
    of task arithmetic at λ = ``planted`` (so that λ scores 100 % on val and the grid's accuracies differ)."""
    suite = random_suite(seed=seed)
    gen = torch.Generator().manual_seed(100 + seed)
    for t, d in suite.data.items():
        images = torch.randint(0, 256, (n_val, 16, 16, 3), dtype=torch.uint8, generator=gen)
        suite.data[t] = replace(d, val_images=images, val_labels=torch.randint(0, d.num_classes, (n_val,), generator=gen), val_from="generated")
    if planted is not None:
        model = build_model(RunConfig("random", "task_arithmetic", {"scaling": planted}), suite, device="cpu")[0]
        with torch.no_grad():
            for t, d in suite.data.items():
                suite.data[t] = replace(d, val_labels=model.logits(d.preprocess(d.val_images), t).argmax(-1))
    return suite


def auto(method: str = "task_arithmetic", **params) -> RunConfig:
    return RunConfig("random", method, {"scaling": "auto", **params})


@pytest.fixture
def small_grid(monkeypatch):
    monkeypatch.setitem(selection.GRIDS, "task_arithmetic", SMALL_GRID)


# ------------------------------------------------------------------------------------- the choice
def test_auto_picks_the_argmax_of_independently_computed_val_accuracy(tmp_path):
    suite = val_suite(planted=0.6)
    result = run(auto(), suite, cache_dir=tmp_path, device="cpu")
    chosen_record = result["selection"]
    assert set(chosen_record) == SCHEMA
    assert chosen_record["grid"] == list(selection.TASK_VECTOR_GRID) == [round(0.05 * i, 2) for i in range(21)]
    assert chosen_record["split"] == "val" and chosen_record["hyperparameter"] == "scaling"
    assert chosen_record["images"] == 3 * 16

    want_avg, want_task = [], {t: [] for t in suite.tasks}
    for lam in chosen_record["grid"]:
        model = build_model(RunConfig("random", "task_arithmetic", {"scaling": lam}), suite, device="cpu")[0]
        scores = evaluate(model, suite, split="val", device="cpu")
        for t in suite.tasks:
            want_task[t].append(scores[t]["accuracy"])
        want_avg.append(sum(s["accuracy"] for s in scores.values()) / 3)
    assert chosen_record["accuracy"] == want_avg and chosen_record["per_task"] == want_task
    assert want_avg[chosen_record["grid"].index(0.6)] == 100.0  # the planted λ labels val perfectly
    assert len(set(want_avg)) > 3  # the accuracies differ over the grid: the choice is not a tie-break
    best = int(np.argmax(want_avg))  # numpy's argmax takes the first maximum: the smallest λ of the ascending grid
    assert chosen_record["chosen"] == chosen_record["grid"][best] <= 0.6
    assert result["params"]["scaling"] == chosen_record["chosen"]
    assert result["overrides"] == {"scaling": "auto"} and "select" in result["seconds"]


def test_ties_go_to_the_smallest_value():
    assert selection.choose([0.1, 0.2, 0.3, 0.4], [50.0, 70.0, 70.0, 60.0]) == 0.2
    assert selection.choose([0.3, 0.1, 0.2], [70.0, 70.0, 10.0]) == 0.1


def test_auto_run_scores_test_exactly_like_the_fixed_run_at_the_chosen_value(tmp_path, small_grid):
    suite = val_suite(planted=0.6)
    result = run(auto(), suite, cache_dir=tmp_path, device="cpu")
    chosen = result["params"]["scaling"]
    assert result["selection"]["grid"] == list(SMALL_GRID) and chosen == 0.6
    fixed = run(RunConfig("random", "task_arithmetic", {"scaling": chosen}), suite, cache_dir=tmp_path, device="cpu")
    assert fixed["key"] != result["key"] and "selection" not in fixed
    assert result["accuracy"] == fixed["accuracy"] and result["loss"] == fixed["loss"]
    assert fixed["params"] == result["params"]
    # found again in the cache, rebuilt at the chosen λ (load_model and build_model alike)
    assert cached_result(auto(), suite, tmp_path, "cpu") == result
    reloaded = evaluate(load_model(result, suite, tmp_path, "cpu"), suite, device="cpu")
    assert {t: s["accuracy"] for t, s in reloaded.items()} == result["accuracy"]
    built = build_model(auto(), suite, tmp_path, "cpu")[0].state_dict()
    want = build_model(RunConfig("random", "task_arithmetic", {"scaling": chosen}), suite, device="cpu")[0].state_dict()
    assert all(torch.equal(built[k], want[k]) for k in want)


def test_the_test_split_never_chooses(tmp_path, small_grid):
    suite = val_suite(planted=0.3)
    first = run(auto(), suite, cache_dir=tmp_path / "a", device="cpu")
    gen = torch.Generator().manual_seed(7)
    suite = val_suite(planted=0.3)  # the same suite, before its fingerprint is read
    for t, d in suite.data.items():  # every test label shifted, every test image replaced
        suite.data[t] = replace(d, test_images=torch.randint(0, 256, d.test_images.shape, dtype=torch.uint8, generator=gen),
                                test_labels=(d.test_labels + 1) % d.num_classes)
    second = run(auto(), suite, cache_dir=tmp_path / "b", device="cpu")
    assert second["key"] != first["key"]  # a new suite fingerprint: computed again, not read from the cache
    assert second["selection"] == first["selection"] and second["params"] == first["params"]
    assert second["accuracy"] != first["accuracy"]


def test_the_key_keeps_auto_and_follows_the_validation_data():
    method = METHODS["task_arithmetic"]
    params = auto().resolve("cpu")[1]
    assert params.scaling == "auto"
    suite, same, other = val_suite(planted=None), val_suite(planted=None), val_suite(planted=None)
    t = other.tasks[0]  # changed before its fingerprint is first read
    other.data[t] = replace(other.data[t], val_labels=(other.data[t].val_labels + 1) % other.data[t].num_classes)
    key = run_key(auto(), suite, method, params)
    assert key == run_key(auto(), same, method, params) != run_key(auto(), other, method, params)
    fixed = RunConfig("random", "task_arithmetic", {"scaling": 0.3})
    assert key != run_key(fixed, suite, method, fixed.resolve("cpu")[1])


# ------------------------------------------------------------------------------------- who may ask for it
def test_the_methods_with_a_scaling_coefficient_accept_auto():
    assert {n for n, m in METHODS.items() if accepts_auto(m)} == {"task_arithmetic", "ties", "tsv_m", "iso_c", "iso_cts", "cart", "wudi", "consensus"}
    for name in ("tsv_m", "iso_c", "iso_cts", "cart"):
        assert selection.grid_for(name) == tuple(round(0.1 * i, 1) for i in range(1, 31))
    assert selection.grid_for("consensus") == tuple(round(0.1 * i, 1) for i in range(1, 11))
    assert selection.grid_for("ties") == selection.TASK_VECTOR_GRID
    assert all(list(g) == sorted(g) for g in [selection.TASK_VECTOR_GRID, *selection.GRIDS.values()])


@pytest.mark.parametrize("method", ["adamerging", "wemoe", "tinting", "surgery", "pretrained", "weight_averaging"])
def test_methods_without_one_refuse_auto_in_one_line(method):
    with pytest.raises(ConfigError) as e:
        RunConfig("random", method, {"scaling": "auto"}).resolve("cpu")
    msg = str(e.value)
    assert "\n" not in msg and f"method {method!r}" in msg and "scaling=auto" in msg
    assert "methods that accept it: task_arithmetic, ties, tsv_m" in msg
    assert ("learns from data" in msg) == METHODS[method].data_dependent


def test_auto_outside_a_run_asks_for_a_number():
    with pytest.raises(ConfigError, match="chosen by a run on a suite's validation split.*give a number"):
        make_params(METHODS["ties"], {"scaling": "auto"})
    assert make_params(METHODS["ties"], {"scaling": " Auto "}, allow_auto=True).scaling == "auto"


def test_a_suite_without_a_validation_split_says_how_to_add_one(tmp_path):
    with pytest.raises(DataError) as e:
        run(auto(), random_suite(), cache_dir=tmp_path, device="cpu")
    msg = str(e.value)
    assert "\n" not in msg and "task 'a' has no validation split" in msg and "val/" in msg and "val_fraction" in msg
    assert not list(tmp_path.glob("runs/*/result.json"))


def test_surgery_on_an_auto_base_runs_the_base_selection(tmp_path, small_grid):
    suite = val_suite(planted=0.6)
    config = RunConfig("random", "surgery", {"base.scaling": "auto"}, preset="fast")
    params = config.resolve("cpu")[1]
    assert params.base_params == {"scaling": "auto"}
    build_model(config, suite, tmp_path, "cpu")  # builds its base: the auto task arithmetic run, cached
    base = cached_result(RunConfig("random", "task_arithmetic", {"scaling": "auto"}), suite, tmp_path, "cpu")
    assert base is not None and base["selection"]["chosen"] == base["params"]["scaling"] == 0.6


# ------------------------------------------------------------------------------------- mini8: carved from train
def test_carving_is_a_fixed_subset():
    rows = carve_indices(2000, 0.1)
    assert len(rows) == 200 and rows.tolist() == sorted(set(rows.tolist())) and rows.max() < 2000
    assert torch.equal(rows, carve_indices(2000, 0.1)) and not torch.equal(rows, carve_indices(2000, 0.1, seed=1))
    assert len(carve_indices(3, 0.1)) == 1
    with pytest.raises(ConfigError):
        carve_indices(10, 1.0)


def test_mini8_carves_val_from_train_without_changing_what_it_saved(tmp_path):
    from safetensors.torch import load_file

    from merging.suites import mini8

    data = mini8._generate(replace(mini8.MICRO, pretext_images_per_task=4), 0)[0]
    for d in data.values():
        rows = carve_indices(mini8.MICRO.n_train, mini8.VAL_FRACTION)
        assert len(d.val_labels) == round(0.1 * mini8.MICRO.n_train) == 26 and len(d.train_labels) == mini8.MICRO.n_train
        assert torch.equal(d.val_images, d.train_images[rows]) and torch.equal(d.val_labels, d.train_labels[rows])
    suite = random_suite()
    mini8.save(suite, tmp_path / "s")
    assert not [k for k in load_file(str(tmp_path / "s" / "data.safetensors")) if "val" in k]  # nothing new saved
    loaded = mini8.load(tmp_path / "s")
    for t, d in loaded.data.items():
        before = suite.data[t]
        assert torch.equal(d.train_images, before.train_images) and torch.equal(d.test_images, before.test_images)
        assert torch.equal(d.val_images, before.train_images[carve_indices(24, 0.1)]) and d.val_from == "10 % of train (seed 0)"
    assert loaded.fingerprint == mini8.load(tmp_path / "s").fingerprint


# ------------------------------------------------------------------------------------- real suites from files
RNG = np.random.default_rng(5)
CLASSES = ["circle", "square", "triangle"]


def _png(i: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(i).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _folder(split, per_class: int, start: int) -> None:
    for label, c in enumerate(CLASSES):
        (split / c).mkdir(parents=True)
        for j in range(per_class):
            (split / c / f"{j}.png").write_bytes(_png(start + 10 * label + j))


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    model, cfg_path = tiny_clip(root)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    save_file(state, root / "pretrained.safetensors")
    visual = {k[7:]: v for k, v in state.items() if k.startswith("visual.")}
    for i, name in enumerate(("a", "b")):
        gen = torch.Generator().manual_seed(i)
        save_file({k: v + 0.05 * torch.randn(v.shape, generator=gen) for k, v in visual.items()}, root / f"{name}.safetensors")
    return {"model_config": str(cfg_path), "pretrained": str(root / "pretrained.safetensors"), "a": str(root / "a.safetensors"),
            "b": str(root / "b.safetensors")}


def write_config(path, model_files, data_root, **extra):
    cfg = {"layout": "open_clip", "model": ARCH, "model_config": model_files["model_config"], "pretrained": model_files["pretrained"],
           "finetuned": {"shapes": model_files["a"], "blobs": model_files["b"]}, "tasks": ["shapes", "blobs"], "data_root": str(data_root), **extra}
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_val_folder_and_val_fraction_through_the_cli(tmp_path, model_files, capsys, small_grid):
    data = tmp_path / "data"
    for task in ("shapes", "blobs"):
        _folder(data / task / "test", 2, 0)
        _folder(data / task / "train", 4, 100)
    _folder(data / "shapes" / "val", 3, 200)  # shapes: a val/ folder; blobs: carved from train
    config = write_config(tmp_path / "s.yaml", model_files, data, val_fraction=0.5)
    suite = get_suite(str(config), cache_dir=tmp_path / "cache")
    shapes, blobs = suite.data["shapes"], suite.data["blobs"]
    assert isinstance(shapes.val_images, ImageFiles) and shapes.val_from == str(data / "shapes" / "val")
    assert shapes.val_labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2] and all("/val/" in f for f in shapes.val_images.files)
    rows = carve_indices(12, 0.5)
    assert blobs.val_from == "50 % of train (seed 0)" and blobs.val_images.files == [blobs.train_images.files[i] for i in rows]
    assert torch.equal(blobs.val_labels, blobs.train_labels[rows]) and len(blobs.train_images) == 12

    assert main(["suite", "check", str(config)]) == 0
    out = capsys.readouterr().out
    assert f"9 validation images ({data / 'shapes' / 'val'})" in out and "6 validation images (50 % of train (seed 0))" in out

    cache = tmp_path / "cache"
    assert main(["run", "--suite", str(config), "--method", "task_arithmetic", "--set", "scaling=auto", "--cache-dir", str(cache), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    record = result["selection"]
    assert record["split"] == "val" and record["images"] == 9 + 6 and record["grid"] == list(SMALL_GRID)
    assert result["params"]["scaling"] == record["chosen"] == selection.choose(record["grid"], record["accuracy"])
    scores = evaluate(build_model(RunConfig(str(config), "task_arithmetic", {"scaling": record["chosen"]}), suite, device="cpu")[0],
                      suite, split="val", device="cpu")
    assert record["accuracy"][record["grid"].index(record["chosen"])] == sum(s["accuracy"] for s in scores.values()) / 2
    fixed = run(RunConfig(str(config), "task_arithmetic", {"scaling": record["chosen"]}), suite, cache, "cpu")
    assert fixed["accuracy"] == result["accuracy"]


def test_real_suite_errors_are_one_line(tmp_path, model_files, capsys):
    data = tmp_path / "data"
    for task in ("shapes", "blobs"):
        _folder(data / task / "test", 1, 0)
    for bad in (0, 1, 1.5, "half", True):
        with pytest.raises(ConfigError, match="'val_fraction' must be a number strictly between 0 and 1"):
            load_config(write_config(tmp_path / "bad.yaml", model_files, data, val_fraction=bad))
    config = write_config(tmp_path / "s.yaml", model_files, data, val_fraction=0.2)
    assert main(["suite", "check", str(config)]) == 2
    out = capsys.readouterr().out
    assert "task 'shapes': 'val_fraction' carves a validation split from the train split, but" in out and "neither a train nor a val split" in out
    plain = write_config(tmp_path / "p.yaml", model_files, data)
    assert main(["run", "--suite", str(plain), "--method", "task_arithmetic", "--set", "scaling=auto", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "has no validation split" in err
    assert main(["run", "--suite", str(plain), "--method", "adamerging", "--set", "scaling=auto", "--cache-dir", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "'adamerging' learns from data itself; methods that accept it:" in err


def _parquet(path, rows: list[tuple[int, int]]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    images = pa.array([{"bytes": _png(i), "path": None} for i, _ in rows], pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"image": images, "label": pa.array([lab for _, lab in rows], pa.int64())}), str(path))


def test_table_datasets_give_a_val_split_or_carve_one(tmp_path):
    transform = (lambda im: im.resize((8, 8)), (0.5,) * 3, (0.25,) * 3, (8, 8))
    root = tmp_path / "pq"
    _parquet(root / "shapes" / "test.parquet", [(i, i % 3) for i in range(6)])
    _parquet(root / "shapes" / "validation.parquet", [(50 + i, i % 3) for i in range(4)])
    _parquet(root / "shapes" / "train.parquet", [(100 + i, i % 3) for i in range(10)])
    cfg = tmp_path / "t.yaml"
    base = {"layout": "open_clip", "model": ARCH, "pretrained": "x", "finetuned": {"shapes": "x"}, "data_root": "pq", "data_format": "parquet",
            "classnames": {"shapes": "names.txt"}}
    (tmp_path / "names.txt").write_text("\n".join(CLASSES))
    cfg.write_text(yaml.safe_dump(base))
    d = load_data(load_config(cfg), "shapes", transform)
    assert isinstance(d.val_images, ImageRows) and d.val_labels.tolist() == [0, 1, 2, 0] and d.val_from.endswith("validation.parquet")
    assert torch.equal(d.val_images[1], torch.from_numpy(np.asarray(Image.open(io.BytesIO(_png(51))).convert("RGB").resize((8, 8)))))

    (root / "shapes" / "validation.parquet").unlink()
    cfg.write_text(yaml.safe_dump({**base, "val_fraction": 0.3}))
    d = load_data(load_config(cfg), "shapes", transform)
    rows = carve_indices(10, 0.3)
    assert isinstance(d.val_images, ImageRows) and d.val_images.rows == rows.tolist()
    assert torch.equal(d.val_images[:], d.train_images[rows]) and torch.equal(d.val_labels, d.train_labels[rows])
