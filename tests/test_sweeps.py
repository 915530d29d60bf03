"""Sweeps: grid expansion, cached points, resume after an interruption, and local vs process pool vs Ray agreement."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pandas as pd
import pytest

from merging import jobs
from merging.cli import main
from merging.errors import ConfigError
from merging.io import load_json
from merging.sweeps import (
    SweepConfig,
    builtin_sweeps,
    curves,
    expand,
    grid_table,
    list_sweeps,
    manifest_config,
    parse_grid,
    run_sweep,
    sweep_id,
)

SWEEP = SweepConfig("micro", "task_arithmetic", {"scaling": [0.2, 0.6], "num_tasks": [2, 3]})


def fresh_cache(micro_cache: Path, folder: Path) -> Path:
    """A new cache holding only the built micro suite: every run in it is computed anew."""
    shutil.copytree(micro_cache / "suites", folder / "suites")
    return folder


def result_files(cache: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in (cache / "runs").glob("*/result.json")}


def accuracies(frame: pd.DataFrame) -> pd.Series:
    return frame.set_index(["scaling", "num_tasks", "seed", "task"])["accuracy"].sort_index()


@pytest.fixture(scope="module")
def local_frame(micro_suite, micro_cache, tmp_path_factory) -> pd.DataFrame:
    cache = fresh_cache(micro_cache, tmp_path_factory.mktemp("local"))
    return run_sweep(SWEEP, micro_suite, cache, device="cpu").frame


def test_expand_crosses_grid_and_seeds_and_takes_task_prefixes(tiny_suite):
    config = SweepConfig("random", "ties", {"density": [0.1, 0.5], "num_tasks": [2, 3]}, params={"scaling": 0.4}, seeds=(0, 1))
    points = expand(config, tiny_suite)
    assert len(points) == 8
    assert [p.seed for p in points[:2]] == [0, 1]
    first = points[0].config
    assert (first.params, first.tasks) == ({"scaling": 0.4, "density": 0.1}, ("a", "b"))
    assert points[-1].config.tasks == ("a", "b", "c") and points[-1].values == {"density": 0.5, "num_tasks": 3}
    subset = expand(SweepConfig("random", "task_arithmetic", {"tasks": ["a+c", ["b", "c"]]}), tiny_suite)
    assert [p.config.tasks for p in subset] == [("a", "c"), ("b", "c")] and subset[0].values == {"tasks": "a+c"}


def test_parse_grid_types_values_and_bad_configs_are_errors(tiny_suite):
    assert parse_grid(["scaling=0.1,0.3", "blocks=last2,all", "router_depth=0,2", "tasks=a+b,a+b+c"]) == {
        "scaling": [0.1, 0.3], "blocks": ["last2", "all"], "router_depth": [0, 2], "tasks": ["a+b", "a+b+c"]}
    with pytest.raises(ConfigError, match="num_tasks=4"):
        expand(SweepConfig("random", "task_arithmetic", {"num_tasks": [4]}), tiny_suite)
    with pytest.raises(ConfigError, match="unknown sweep field"):
        SweepConfig.from_dict({"suite": "micro", "method": "ties", "grid": {"density": [0.1]}, "lambda": 1})
    with pytest.raises(ConfigError, match="grid"):
        SweepConfig.from_dict({"suite": "micro", "method": "ties"})
    assert sweep_id(SWEEP) == sweep_id(SweepConfig.from_dict(SWEEP.to_dict()))


def test_unknown_hyperparameter_fails_before_any_run(micro_suite, micro_cache, tmp_path):
    cache = fresh_cache(micro_cache, tmp_path)
    with pytest.raises(ConfigError, match="unknown hyperparameter 'lambda'"):
        run_sweep(SweepConfig("micro", "task_arithmetic", {"lambda": [0.1]}), micro_suite, cache, device="cpu")
    assert not result_files(cache)


def test_builtin_ablations_are_valid_sweeps():
    sweeps = builtin_sweeps()
    assert {"ta_lambda", "ties_density", "surgery_rank", "wemoe_blocks", "wemoe_router_depth", "tinting_layer", "num_tasks"} <= set(sweeps)
    assert sweeps["ta_lambda"].grid["scaling"] == pytest.approx([0.1 * i for i in range(1, 11)])
    assert sweeps["surgery_rank"].axes == ["rank", "version"] and sweeps["num_tasks"].grid["num_tasks"] == list(range(2, 9))
    from merging.methods import get_method, make_params

    for s in sweeps.values():  # every swept value is a valid hyperparameter of its method
        for key, values in s.grid.items():
            for v in values if key != "num_tasks" else []:
                make_params(get_method(s.method), {**s.params, key: v}, "fast")


def test_local_sweep_is_tidy_and_a_rerun_computes_nothing(micro_suite, micro_cache, tmp_path):
    cache = fresh_cache(micro_cache, tmp_path)
    first = run_sweep(SWEEP, micro_suite, cache, device="cpu")
    assert (first.computed, first.cached) == (4, 0)
    frame = first.frame
    assert len(frame) == 2 * (2 + 3)  # per scaling: 2 tasks + 3 tasks
    assert list(frame[frame.num_tasks == 2].task.unique()) == list(micro_suite.tasks[:2])
    for _, g in frame.groupby("key"):
        assert g["average"].iloc[0] == pytest.approx(g["accuracy"].mean())
    assert frame["l1"].isna().all()  # task arithmetic records no L1 bias
    manifest = load_json(first.folder / "manifest.json")
    assert manifest_config(manifest).axes == SWEEP.axes and manifest["computed"] == 4
    assert list_sweeps(cache)[0]["id"] == first.id == sweep_id(SWEEP)
    assert pd.read_csv(first.folder / "results.csv")["accuracy"].tolist() == pytest.approx(frame["accuracy"].tolist())

    before = result_files(cache)
    again = run_sweep(SWEEP, micro_suite, cache, device="cpu")
    assert (again.computed, again.cached) == (0, 4)
    assert result_files(cache) == before
    pd.testing.assert_frame_equal(again.frame, frame)

    extended = SweepConfig("micro", "task_arithmetic", {"scaling": [0.2, 0.6, 1.0], "num_tasks": [2, 3]})
    more = run_sweep(extended, micro_suite, cache, device="cpu")
    assert (more.computed, more.cached) == (2, 4)
    assert len(result_files(cache)) == 6


def test_interrupted_sweep_resumes_with_only_the_missing_points(micro_suite, micro_cache, tmp_path, local_frame):
    cache = fresh_cache(micro_cache, tmp_path)
    finished = []

    def stop_after_two(fraction: float, message: str) -> None:
        finished.append(message)
        if message.startswith("2/4"):
            raise KeyboardInterrupt  # as a cancelled job's SIGTERM does

    with pytest.raises(KeyboardInterrupt):
        run_sweep(SWEEP, micro_suite, cache, device="cpu", progress=stop_after_two)
    assert len(result_files(cache)) == 2
    assert not (cache / "sweeps").exists()
    resumed = run_sweep(SWEEP, micro_suite, cache, device="cpu")
    assert (resumed.computed, resumed.cached) == (2, 2)
    pd.testing.assert_series_equal(accuracies(resumed.frame), accuracies(local_frame))


def test_ray_executor_without_ray_installed_says_how_to_install(micro_suite, micro_cache, tmp_path, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "ray", None)
    with pytest.raises(ConfigError, match="requirements-ray.txt"):
        run_sweep(SWEEP, micro_suite, fresh_cache(micro_cache, tmp_path), device="cpu", executor="ray", workers=2)


@pytest.mark.slow
def test_ray_with_two_workers_matches_local(micro_suite, micro_cache, tmp_path, local_frame):
    pytest.importorskip("ray")
    cache = fresh_cache(micro_cache, tmp_path)
    out = run_sweep(SWEEP, micro_suite, cache, device="cpu", executor="ray", workers=2)
    assert (out.computed, out.cached) == (4, 0)
    pd.testing.assert_series_equal(accuracies(out.frame), accuracies(local_frame))
    before = result_files(cache)
    assert run_sweep(SWEEP, micro_suite, cache, device="cpu", executor="ray", workers=2).computed == 0
    assert result_files(cache) == before


def test_cli_process_pool_matches_local_and_the_job_reuses_it(micro_cache, tmp_path, local_frame, capsys):
    cache = fresh_cache(micro_cache, tmp_path)
    code = main(["sweep", "--suite", "micro", "--method", "task_arithmetic", "--grid", "scaling=0.2,0.6", "--grid", "num_tasks=2,3",
                 "--workers", "2", "--cache-dir", str(cache), "--device", "cpu", "--csv", str(tmp_path / "out.csv")])
    assert code == 0
    assert "4 points computed, 0 cached" in capsys.readouterr().out
    pd.testing.assert_series_equal(accuracies(pd.read_csv(tmp_path / "out.csv")), accuracies(local_frame), check_dtype=False)
    result = jobs.execute({"kind": "sweep", "suite": "micro", "device": "cpu", "sweep": SWEEP.to_dict()}, cache, lambda f, m: None)
    assert result == {"sweep": sweep_id(SWEEP), "computed": 0, "cached": 4}
    assert main(["sweep", "--config", "ablations/ta_lambda.yaml", "--suite", "micro", "--grid", "tasks=nope", "--cache-dir", str(cache)]) == 2


def test_curves_average_over_seeds_and_the_heatmap_pivots():
    rows = []
    for x, y, seed, acc in [(1, "a", 0, 10.0), (1, "a", 1, 20.0), (2, "a", 0, 30.0), (2, "a", 1, 50.0),
                            (1, "b", 0, 40.0), (1, "b", 1, 40.0), (2, "b", 0, 60.0), (2, "b", 1, 60.0)]:
        key = f"{x}-{y}-{seed}"
        rows += [{"x": x, "y": y, "seed": seed, "task": t, "accuracy": acc + d, "average": acc, "l1": math.nan, "l1_average": math.nan, "key": key}
                 for t, d in (("t1", -1.0), ("t2", 1.0))]
    frame = pd.DataFrame(rows)
    per_task = curves(frame, "x", "task").set_index(["task", "x"])
    assert per_task.loc[("t1", 1), "mean"] == pytest.approx((9 + 19 + 39 + 39) / 4)
    assert per_task.loc[("average", 2), "count"] == 4 and set(per_task.index.get_level_values("task")) == {"t1", "t2", "average"}
    by_y = curves(frame, "x", "y").set_index(["y", "x"])
    assert by_y.loc[("a", 2), "mean"] == pytest.approx(40.0) and by_y.loc[("a", 2), "std"] == pytest.approx(math.sqrt(200))
    assert by_y.loc[("b", 1), "std"] == 0.0
    heat = grid_table(frame, "x", "y")
    assert heat.loc[1, "a"] == pytest.approx(15.0) and heat.loc[2, "b"] == pytest.approx(60.0)
    assert curves(frame, "x", "task", "l1").empty
