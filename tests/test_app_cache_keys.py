"""The app's cached views never share an entry between two models or two versions of a suite's inputs (issue #23, point 1).

Streamlit leaves arguments whose names start with ``_`` out of a cached function's key: a cached function that
takes a run's result as ``_result`` must also take the run's key, or every run shares the first one's entry.
"""

from __future__ import annotations

import ast
import base64
import json
import time
from pathlib import Path

import numpy as np
import pytest
from test_app import _page, app_cache, monkeypatch_module  # noqa: F401  (fixtures)

from merging.runs import RunConfig, run

ROOT = Path(__file__).resolve().parents[1]


def _cached_functions() -> list[tuple[str, ast.FunctionDef]]:
    out = []
    for path in [ROOT / "ui.py", ROOT / "app.py", *sorted((ROOT / "app_pages").glob("*.py"))]:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.FunctionDef):
                names = {ast.unparse(d.func if isinstance(d, ast.Call) else d) for d in node.decorator_list}
                if names & {"st.cache_data", "st.cache_resource"}:
                    out.append((f"{path.name}:{node.name}", node))
    return out


def test_every_cached_function_keys_on_what_it_reads():
    """An argument left out of the key (``_x``) is only allowed beside the run key that identifies it."""
    functions = _cached_functions()
    assert len(functions) >= 8
    for where, fn in functions:
        args = [a.arg for a in fn.args.args]
        hidden = [a for a in args if a.startswith("_")]
        if hidden:
            assert hidden == ["_result"] and "key" in args, f"{where}: {hidden} is left out of the cache key and no run key stands for it"


def _heatmap(at) -> dict | None:
    specs = [json.loads(c.proto.spec) for c in at.get("plotly_chart")]
    return next((sp for sp in specs if sp["data"] and sp["data"][0]["type"] == "heatmap"), None)


def _matrix_shown(at) -> np.ndarray:
    """The cross-task heatmap once the page shows it (its first open computes it in a background job, then reruns)."""
    for _ in range(240):
        if _heatmap(at) is not None:
            break
        time.sleep(0.5)
        at.run()
    z = _heatmap(at)["data"][0]["z"]
    if isinstance(z, dict):  # plotly's typed-array encoding: base64 bytes, dtype, shape
        shape = tuple(int(d) for d in z["shape"].split(","))
        return np.frombuffer(base64.b64decode(z["bdata"]), dtype=z["dtype"]).reshape(shape).astype(float)
    return np.array(z, dtype=float)


def test_two_models_give_two_cross_task_matrices(app_cache, micro_suite):  # noqa: F811
    from merging.cross_task import cross_task_matrix
    from merging.runs import load_model

    at = _page("app_pages/method_comparison.py")
    at.session_state["cmp-methods"] = ["pretrained", "task_arithmetic", "individual"]
    shown = {}
    for method in ("pretrained", "task_arithmetic", "individual"):
        at.session_state["cmp-cross"] = method
        at.run()
        assert not at.exception, at.exception
        shown[method] = _matrix_shown(at)
        result = run(RunConfig("micro", method), micro_suite, cache_dir=app_cache, device="cpu")
        expected = cross_task_matrix(load_model(result, micro_suite, app_cache), micro_suite, device="cpu")
        assert shown[method] == pytest.approx(expected.to_numpy(dtype=float))
    assert not np.allclose(shown["pretrained"], shown["task_arithmetic"])
    assert not np.allclose(shown["task_arithmetic"], shown["individual"])
