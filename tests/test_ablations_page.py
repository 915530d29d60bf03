"""AppTest of the Ablations page on the micro suite: a finished sweep's plots and tables match the library; a new one runs as a job."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from merging.sweeps import SweepConfig, grid_table, run_sweep  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SWEEP = SweepConfig("micro", "task_arithmetic", {"scaling": [0.2, 0.6], "num_tasks": [2, 3]}, seeds=(0, 1), title="TA micro")


@pytest.fixture(scope="module")
def finished(micro_suite, micro_cache):
    import ui

    mp = pytest.MonkeyPatch()
    mp.setattr(ui, "CACHE_DIR", micro_cache)
    mp.setenv("MERGELENS_DEFAULT_SUITE", "micro")
    yield run_sweep(SWEEP, micro_suite, micro_cache, device="cpu")
    mp.undo()


def _page(option: str | None = None) -> AppTest:
    at = AppTest.from_file(str(ROOT / "app_pages/ablations.py"), default_timeout=120)
    at.session_state["suite"] = "micro"
    if option:
        at.session_state["abl-sweep"] = option
    return at.run()


def test_finished_two_axis_sweep_renders_curves_and_heatmap(finished):
    at = _page(f"done:{finished.id}")
    assert not at.exception
    charts = at.get("plotly_chart")
    assert len(charts) == 2 * 2 + 1  # per axis: per-task curves and curves by the other axis; one heatmap
    heat = next(d.value for d in at.dataframe if list(d.value.columns) == [2, 3])
    expected = grid_table(finished.frame, "scaling", "num_tasks")
    assert heat.loc[0.6, 3] == pytest.approx(expected.loc[0.6, 3])
    heatmap = json.loads(charts[-1].proto.spec)["layout"]  # swept values are categories: one labelled cell each (issue #23.2)
    assert heatmap["xaxis"]["type"] == heatmap["yaxis"]["type"] == "category"
    per_task = next(d.value for d in at.dataframe if "task" in d.value.columns and "mean" in d.value.columns)
    avg = per_task[(per_task.task == "average") & (per_task.scaling == 0.2)]
    assert avg["mean"].item() == pytest.approx(finished.frame.drop_duplicates("key").query("scaling == 0.2")["average"].mean())
    assert avg["count"].item() == 4  # 2 task counts x 2 seeds


def test_builtin_sweep_on_an_unbuilt_suite_says_so(finished):
    at = _page("builtin:ta_lambda")
    assert not at.exception
    assert any("mini8 suite, which is not built" in i.value for i in at.info)


def test_new_sweep_runs_in_the_background(finished, micro_suite, micro_cache):
    at = _page("new")
    assert not at.exception
    at.selectbox(key="abl-method").set_value("task_arithmetic").run()
    at.selectbox(key="abl-key1").set_value("scaling")
    at.text_input(key="abl-values1").set_value("0.35,0.45").run()
    assert any("0 of 2 points computed" in m.value for m in at.markdown)
    at.button(key="abl-run").click().run()
    for _ in range(90):
        time.sleep(1)
        at.run()
        if at.get("plotly_chart") and not any("points computed" in m.value for m in at.markdown):
            break
    assert not at.exception
    expected = run_sweep(SweepConfig("micro", "task_arithmetic", {"scaling": [0.35, 0.45]}, preset=None), micro_suite, micro_cache, device="cpu")
    assert expected.computed == 0  # the job computed both points
    per_task = next(d.value for d in at.dataframe if "task" in d.value.columns and "mean" in d.value.columns)
    got = per_task[per_task.task == "average"].set_index("scaling")["mean"]
    want = expected.frame.drop_duplicates("key").set_index("scaling")["average"]
    assert got.loc[0.35] == pytest.approx(want.loc[0.35]) and got.loc[0.45] == pytest.approx(want.loc[0.45])


def test_a_link_restores_the_sweep_and_its_settings(finished):
    """Issue #23.6: the sweep picked and a new sweep's settings live in the URL, so a reload or a shared link restores them."""
    at = AppTest.from_file(str(ROOT / "app_pages/ablations.py"), default_timeout=120)
    at.session_state["suite"] = "micro"
    at.query_params["abl-sweep"] = json.dumps(f"done:{finished.id}")
    at.run()
    assert not at.exception, at.exception
    assert at.selectbox(key="abl-sweep").value == f"done:{finished.id}"
    at.selectbox(key="abl-sweep").set_value("new").run()
    at.text_input(key="abl-values1").set_value("0.15,0.25").run()
    link = dict(at.query_params)
    assert json.loads(link["abl-sweep"]) == "new" and json.loads(link["abl-values1"]) == "0.15,0.25"
    again = AppTest.from_file(str(ROOT / "app_pages/ablations.py"), default_timeout=120)
    again.session_state["suite"] = "micro"
    for k, v in link.items():
        again.query_params[k] = v
    again.run()
    assert not again.exception, again.exception
    assert again.selectbox(key="abl-sweep").value == "new" and again.text_input(key="abl-values1").value == "0.15,0.25"
    assert not again.warning  # no "default value and Session State" warning beside a restored widget
