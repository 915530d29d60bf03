"""Provenance next to every number (issue #22): family and run labels, CSV columns, one family per table, program_report."""

from __future__ import annotations

import io

import pandas as pd
import pytest

from merging.errors import ConfigError
from merging.provenance import (
    COLUMNS,
    check_one_family,
    family_label,
    family_of,
    program_report,
    provenance_columns,
    run_label,
    split_by_family,
    with_provenance,
)
from merging.runs import RunConfig, run

FAMILY = {"suite": "mini8", "layout": "built-in", "weights": "1a2b3c4d"}
OTHER = {"suite": "mini8", "layout": "built-in", "weights": "99ffee00"}


def result(method="task_arithmetic", params=None, checkpoints=FAMILY, fingerprint="f" * 16, **extra) -> dict:
    r = {"key": f"{method}-x", "suite": "mini8", "suite_fingerprint": fingerprint, "method": method, "title": method, "preset": None,
         "params": params if params is not None else {"scaling": 0.3, "dare": 0.0}, "overrides": {}, "seed": 0, "tasks": ["a", "b"],
         "accuracy": {"a": 80.0, "b": 60.0}, "loss": {"a": 0.5, "b": 1.5}, "average": 70.0,
         "parameters": {"trainable": 10, "total": 20}, "data": {"split": None, "images": 0}, **extra}
    if checkpoints is not None:
        r["checkpoints"] = dict(checkpoints)
    return r


def test_family_label_names_suite_layout_and_weights_digest():
    assert family_label(FAMILY) == "mini8 · built-in · weights 1a2b3c4d"
    assert family_label(family_of(result())) == "mini8 · built-in · weights 1a2b3c4d"


def test_result_without_checkpoints_says_weights_unknown():
    old = result(checkpoints=None)
    assert family_of(old) == {"suite": "mini8", "layout": "built-in", "weights": "unknown"}
    assert family_label(family_of(old)) == "mini8 · built-in · weights unknown"
    assert family_of({**old, "suite": "my_clip.yaml"})["layout"] == "unknown"
    assert provenance_columns(old)["weights"] == "unknown"


def test_run_label_has_the_exact_lambda_and_preset():
    label = run_label(result("adamerging", params={"init": 0.35, "density": 0.2, "lr": 0.01}, preset="fast"))
    assert label == "init=0.35 · density=0.2 · preset fast"
    assert run_label(result(params={"scaling": 0.35, "dare": 0.0}, preset="fast")) == "λ=0.35"  # task arithmetic has no presets


def test_run_label_says_lambda_was_chosen_on_val():
    sel = {"hyperparameter": "scaling", "grid": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9], "accuracy": [50.0] * 9, "chosen": 0.4,
           "split": "val", "images": 800}
    label = run_label(result(params={"scaling": 0.4}, selection=sel))
    assert label == "λ=0.4 (chosen on val from 9-point grid (800 images))"
    assert provenance_columns(result(params={"scaling": 0.4}, selection=sel))["selection"] == "scaling=0.4 chosen on val from 9-point grid (800 images)"


def test_run_label_says_the_split_a_data_dependent_method_adapted_on():
    surgery = result("surgery", {"base": "ties", "base_params": {}, "rank": 16, "lr": 0.001}, preset="fast",
                     data={"split": "test", "images": 4000})
    assert run_label(surgery) == "rank=16 · base=ties · adapted on test (unlabeled, 4,000 images) · preset fast"
    featcal = result("featcal", {"base": "task_arithmetic", "base_params": {"scaling": 0.5}, "calibration_images": 256},
                     data={"split": "train", "images": 2048})
    assert run_label(featcal) == "base=task_arithmetic · base {scaling=0.5} · calibrated on train (unlabeled, 2,048 images)"
    assert provenance_columns(featcal)["adapted_on"] == "train (2048 images)"
    assert provenance_columns(result())["adapted_on"] == ""


def test_provenance_columns_are_the_csv_columns():
    cols = provenance_columns(result(preset="paper"))
    assert tuple(cols) == COLUMNS
    assert cols["weights"] == "1a2b3c4d" and cols["layout"] == "built-in" and cols["preset"] == "paper"
    assert cols["params"] == '{"dare":0.0,"scaling":0.3}'


def test_mixing_two_families_raises_naming_both():
    check_one_family([result(), result("ties", fingerprint="f" * 16)])
    with pytest.raises(ConfigError, match="weights 1a2b3c4d and mini8 · built-in · weights 99ffee00"):
        check_one_family([result(), result(checkpoints=OTHER, fingerprint="e" * 16)])
    groups = split_by_family([result(), result(checkpoints=OTHER, fingerprint="e" * 16), result("ties")])
    assert [[r["method"] for r in g] for g in groups] == [["task_arithmetic", "ties"], ["task_arithmetic"]]


def test_a_task_subset_of_one_suite_is_the_same_family():
    subset = result(checkpoints={**FAMILY, "weights": "0000aaaa"}, tasks=["a"])  # its digest covers its own tasks only
    check_one_family([result(), subset])  # same suite fingerprint: one suite


def test_csv_export_carries_per_row_provenance_and_stays_parseable():
    table = pd.DataFrame({"a": [80.0, 70.0], "b": [60.0, 50.0]}, index=["Task Arithmetic", "TIES"])
    runs = {"Task Arithmetic": result(), "TIES": result("ties", {"scaling": 0.3, "density": 0.2})}
    out = pd.read_csv(io.StringIO(with_provenance(table, FAMILY, runs).to_csv()), index_col=0)
    assert list(out.columns) == ["a", "b", *COLUMNS]
    assert out.loc["TIES", "weights"] == "1a2b3c4d" and out.loc["TIES", "method"] == "ties" and out.loc["TIES", "a"] == 70.0
    plain = pd.read_csv(io.StringIO(with_provenance(table, FAMILY).to_csv()), index_col=0)
    assert list(plain.columns) == ["a", "b", "suite", "layout", "weights"] and set(plain["weights"]) == {"1a2b3c4d"}
    with pytest.raises(ConfigError, match="two checkpoint families"):
        with_provenance(table, FAMILY, {"Task Arithmetic": result(), "TIES": result(checkpoints=OTHER, fingerprint="e" * 16)})


def test_program_report_keeps_fusionbench_keys_and_adds_provenance():
    r = result("adamerging", {"init": 0.3, "steps": 40}, preset="fast", data={"split": "test", "images": 400})
    report = program_report(r)
    assert report["a"] == {"accuracy": 0.8, "loss": 0.5} and report["average"]["accuracy"] == pytest.approx(0.7)
    assert report["model_info"] == {"trainable_params": 10, "all_params": 20}
    block = report["provenance"]
    assert block["family"] == "mini8 · built-in · weights 1a2b3c4d" and block["checkpoints"] == FAMILY
    assert block["method"] == "adamerging" and block["preset"] == "fast" and block["params"] == {"init": 0.3, "steps": 40}
    assert block["data"] == {"split": "test", "images": 400} and "selection" not in block
    sel = {"hyperparameter": "scaling", "grid": [0.2, 0.4], "accuracy": [1.0, 2.0], "chosen": 0.4, "split": "val", "images": 100}
    assert program_report(result(selection=sel))["provenance"]["selection"] == sel


def test_a_real_run_records_its_family(micro_suite, micro_cache):
    r = run(RunConfig("micro", "task_arithmetic", {"scaling": 0.3}), micro_suite, cache_dir=micro_cache, device="cpu")
    family = micro_suite.checkpoint_family
    assert family_of(r) == family and family["layout"] == "built-in" and len(family["weights"]) == 8
    assert program_report(r)["provenance"]["family"] == f"micro · built-in · weights {family['weights']}"
    assert run_label(r).startswith("λ=0.3")


def test_cli_table_prints_the_family_and_each_rows_provenance_and_leaves_other_families_out(micro_suite, micro_cache, tmp_path, capsys):
    import json

    from merging.cli import main

    stray = micro_cache / "runs" / "task_arithmetic-otherfamily"  # a result of another "micro" (other weights) in the same cache
    stray.mkdir(parents=True, exist_ok=True)
    (stray / "result.json").write_text(json.dumps(result(checkpoints={**OTHER, "suite": "micro"}, fingerprint="0" * 16, suite="micro")))
    csv = tmp_path / "table.csv"
    try:
        assert main(["table", "--suite", "micro", "--methods", "pretrained,task_arithmetic:scaling=0.35", "--cache-dir", str(micro_cache),
                     "--csv", str(csv)]) == 0
    finally:
        (stray / "result.json").unlink()
        stray.rmdir()
    out = capsys.readouterr().out
    family = family_label(micro_suite.checkpoint_family)
    assert f"checkpoints: {family}" in out
    assert "task_arithmetic(scaling=0.35)  λ=0.35" in out
    assert "left out: 1 cached result(s) of micro made on other checkpoints or data (weights 99ffee00)" in out
    table = pd.read_csv(csv, index_col=0)
    assert set(COLUMNS) <= set(table.columns) and set(table["weights"]) == {micro_suite.checkpoint_family["weights"]}
    assert json.loads(table.loc["task_arithmetic(scaling=0.35)", "params"])["scaling"] == 0.35
    report = tmp_path / "program_report.json"
    assert main(["run", "--suite", "micro", "--method", "task_arithmetic", "--set", "scaling=0.35", "--cache-dir", str(micro_cache),
                 "--report", str(report)]) == 0
    block = json.loads(report.read_text())["provenance"]
    assert block["family"] == family and block["params"]["scaling"] == 0.35 and block["data"] == {"split": None, "images": 0}
    assert f"checkpoints: {family}" in capsys.readouterr().out
