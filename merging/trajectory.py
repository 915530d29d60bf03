"""Adaptation trajectories (issue 19, view 3): a data-dependent run's recorded objective, its parts, its learned
coefficients and (analysis option only) test accuracy, as tables.

Recorded by ``merging.adaptation.Trajectory`` into ``result["info"]["trajectory"]``: AdaMerging (Yang et al.,
ICLR 2024) and WEMoE (Tang et al., ICML 2024) minimise the summed prediction entropy, Surgery (Yang et al.,
ICML 2024) the L1 distance to the individual model's features, Model Tinting (Jung et al., 2024) the
cross-entropy against the experts' pseudo-labels. Test accuracy is read only when the run was asked for it.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd

from merging.errors import ConfigError


def trajectory_of(result: Mapping) -> dict:
    """The run's recorded trajectory, or one line saying how to get one."""
    trajectory = (result.get("info") or {}).get("trajectory")
    if not trajectory:
        raise ConfigError(f"run {result.get('key')!r} ({result.get('method')}) has no recorded trajectory: only data-dependent methods "
                          "(adamerging, surgery, wemoe, tinting) record one; run it again with the current code (python -m merging run --force)")
    return trajectory


def objective_frame(result: Mapping) -> pd.DataFrame:
    """Tidy ``step, series, value``: the objective and each of its parts (``part: <task>``) at every recorded step."""
    t = trajectory_of(result)
    frames = [pd.DataFrame({"step": t["step"], "series": "objective", "value": t["objective"]})]
    frames += [pd.DataFrame({"step": t["step"], "series": f"part: {name}", "value": values}) for name, values in t["parts"].items()]
    return pd.concat(frames, ignore_index=True)


def accuracy_frame(result: Mapping) -> pd.DataFrame | None:
    """Tidy ``step, task, accuracy`` (%) when the run recorded test accuracy (the analysis option, which reads test
    labels), with the mean over tasks as task ``average``; else None."""
    t = trajectory_of(result)
    if "test_accuracy" not in t:
        return None
    frame = pd.DataFrame({task: values for task, values in t["test_accuracy"].items()}, index=pd.Index(t["step"], name="step"))
    frame["average"] = frame.mean(axis=1)
    return frame.reset_index().melt(id_vars="step", var_name="task", value_name="accuracy")


def coefficients(result: Mapping) -> tuple[list[int], list[str], list[str], np.ndarray] | None:
    """``(steps, rows, tasks, values [K, rows, T])``: AdaMerging's or Tinting's clamped coefficients λ at every recorded
    step (rows are state-dict tensors, or ``all`` for task-wise AdaMerging); None for methods without coefficients."""
    t = trajectory_of(result)
    if "coefficients" not in t:
        return None
    info = result["info"]
    rows = info["tensor_names"] if "tensor_names" in info else info["coefficients"]["tensors"]
    values = np.asarray(t["coefficients"], dtype=float)
    return list(t["step"]), list(rows), list(result["tasks"]), values
