"""Adaptation trajectories (issue 19, view 3): every data-dependent run records its objective, its parts and, with the
analysis option only, test accuracy at K points; the last point is the run's final result."""

import pytest
import torch

from merging.adaptation import Trajectory, optimize, trajectory_steps
from merging.runs import RunConfig, load_model, run

SHORT = {
    "adamerging": {"steps": 4, "granularity": "layer"},
    "wemoe": {"steps": 3},
    "tinting": {"epochs": 3},
    "surgery": {"iterations": 4},
}


def test_trajectory_steps_cover_start_and_end():
    assert trajectory_steps(40, 21) == list(range(0, 41, 2))
    assert trajectory_steps(3, 21) == [0, 1, 2, 3]
    assert trajectory_steps(0) == [0]


def test_optimize_records_before_each_update_and_once_more_at_the_end():
    state = {"x": 10.0}

    def step(_: int, update: bool) -> tuple[float, dict[str, float]]:
        loss = state["x"]
        if update:
            state["x"] -= 1.0
        return loss, {"a": loss / 2, "b": loss / 2}

    trajectory = Trajectory(4, {"x": lambda: state["x"]}, points=3)
    curve = optimize(4, step, log_every=1, trajectory=trajectory)
    assert curve == [10.0, 9.0, 8.0, 7.0]
    assert trajectory.data["step"] == [0, 2, 4]
    assert trajectory.data["objective"] == [10.0, 8.0, 6.0]  # the final model's objective, measured without an update
    assert trajectory.data["parts"] == {"a": [5.0, 4.0, 3.0], "b": [5.0, 4.0, 3.0]}
    assert trajectory.data["x"] == [10.0, 8.0, 6.0] and state["x"] == 6.0


@pytest.mark.parametrize("method", list(SHORT))
def test_last_point_is_the_runs_final_result(tiny_suite, tmp_path, method):
    config = RunConfig(tiny_suite.name, method, {**SHORT[method], "analysis_test_accuracy": True}, "fast")
    result = run(config, tiny_suite, tmp_path, "cpu")
    trajectory = result["info"]["trajectory"]
    steps = next(iter(SHORT[method].values()))
    assert trajectory["step"] == list(range(steps + 1))
    assert set(trajectory["parts"]) == set(tiny_suite.tasks)
    for i, objective in enumerate(trajectory["objective"]):
        parts = [trajectory["parts"][t][i] for t in tiny_suite.tasks]
        expected = sum(parts) / len(parts) if method == "surgery" else sum(parts)  # Surgery's objective is the mean of its L1s
        assert objective == pytest.approx(expected, rel=1e-6)
    for t in tiny_suite.tasks:
        assert trajectory["test_accuracy"][t][-1] == result["accuracy"][t]
    if method == "adamerging":
        assert trajectory["coefficients"][-1] == result["info"]["coefficients"]
        assert trajectory["coefficients"][0] == [[pytest.approx(0.3)] * 3] * len(result["info"]["coefficients"])
    if method == "tinting":
        assert trajectory["coefficients"][-1] == result["info"]["coefficients"]["values"]
    # recording test accuracy (the analysis option) never changes what is learned
    plain = run(RunConfig(tiny_suite.name, method, SHORT[method], "fast"), tiny_suite, tmp_path, "cpu")
    assert "test_accuracy" not in plain["info"]["trajectory"]
    assert plain["accuracy"] == result["accuracy"]
    assert plain["info"]["trajectory"]["objective"] == trajectory["objective"]
    a, b = load_model(result, tiny_suite, tmp_path, "cpu"), load_model(plain, tiny_suite, tmp_path, "cpu")
    for (name, x), (_, y) in zip(a.trainable_state().items(), b.trainable_state().items(), strict=True):
        assert torch.equal(x, y), name
