"""Streamlit AppTest of every page on the micro suite: renders, widgets change what is shown, numbers match the library."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from merging.methods import BASELINES  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
from merging.jobs import RunsJob  # noqa: E402
from merging.runs import RunConfig, run  # noqa: E402


@pytest.fixture(scope="module")
def app_cache(micro_suite, micro_cache, monkeypatch_module):
    """The micro suite and its baselines already in the app's cache, as after a first visit."""
    for m in BASELINES:
        run(RunConfig("micro", m), micro_suite, cache_dir=micro_cache, device="cpu")
    return micro_cache


@pytest.fixture(scope="module")
def monkeypatch_module(micro_cache):
    import ui

    mp = pytest.MonkeyPatch()
    mp.setattr(ui, "CACHE_DIR", micro_cache)
    mp.setenv("MERGELENS_DEFAULT_SUITE", "micro")
    yield mp
    mp.undo()


def _page(path: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / path), default_timeout=120)
    at.session_state["suite"] = "micro"
    return at


def test_overview_shows_the_baseline_table(app_cache, micro_suite):
    at = _page("app_pages/home.py").run()
    assert not at.exception
    table = at.dataframe[0].value
    expected = run(RunConfig("micro", "task_arithmetic"), micro_suite, cache_dir=app_cache, device="cpu")
    row = table.loc["Task Arithmetic"]
    for t in micro_suite.tasks:
        assert row[t] == pytest.approx(expected["accuracy"][t])
    assert row["avg"] == pytest.approx(expected["average"])
    assert {m.label for m in at.metric} >= {"Pretrained (zero-shot heads)", "Individual (fine-tuned per task)"}


def test_app_entrypoint_renders(app_cache):
    at = AppTest.from_file(str(ROOT / "app.py"), default_timeout=120)
    at.session_state["suite"] = "micro"
    at.run()
    assert not at.exception


def test_merge_page_runs_a_new_setting_in_the_background(app_cache, micro_suite):
    at = _page("app_pages/merge.py").run()
    assert not at.exception
    n_rows = len(at.dataframe[0].value)
    scaling = next(w for w in at.number_input if w.label.startswith("scaling"))
    scaling.set_value(0.55).run()
    assert any("Not computed yet" in m.value for m in at.markdown)
    at.button(key="merge-run").click().run()
    for _ in range(90):
        time.sleep(1)
        at.run()
        if at.dataframe and any("scaling=0.55" in i for i in at.dataframe[0].value.index):
            break
    table = at.dataframe[0].value
    assert len(table) == n_rows  # the new setting replaced Task Arithmetic's row
    label = next(i for i in table.index if "scaling=0.55" in i)
    expected = run(RunConfig("micro", "task_arithmetic", {"scaling": 0.55}), micro_suite, cache_dir=app_cache, device="cpu")
    assert table.loc[label, "avg"] == pytest.approx(expected["average"])


def test_merge_page_explains_every_hyperparameter(app_cache):
    """Each widget carries the method's help text and allowed values; choices are selectboxes, ranges bound the inputs."""
    from merging.methods import METHODS, specs

    at = _page("app_pages/merge.py")
    at.session_state["merge-methods"] = ["ties", "adamerging", "surgery", "wemoe", "tinting"]
    at.run()
    assert not at.exception, at.exception
    widgets = [*at.number_input, *at.selectbox, *at.checkbox, *at.text_input]
    helps = {w.help for w in widgets if w.help}
    for name in ("ties", "adamerging", "surgery", "wemoe", "tinting"):
        for h in specs(METHODS[name]):
            if not h.params_of:
                assert any(x.startswith(h.help) for x in helps), (name, h.name)
    density = next(w for w in at.number_input if w.label.startswith("density") and w.key.startswith("merge-p-ties-"))
    assert (density.min, density.max) == (0.0, 1.0)
    granularity = next(w for w in at.selectbox if w.label == "granularity")
    assert list(granularity.options) == ["layer", "task"]
    base = next(w for w in at.selectbox if w.key.startswith("merge-p-surgery-base-"))
    assert "adamerging" in base.options and "surgery" not in base.options


@pytest.mark.parametrize("method, label, value, words", [
    ("wemoe", "blocks", "bogus", "method 'wemoe': blocks='bogus'"),
    ("adamerging", "lr", 0.0, "method 'adamerging': hyperparameter 'lr' = 0.0 is out of range; allowed: 0 < lr"),
])  # fmt: skip
def test_merge_page_shows_one_error_line_for_a_bad_value(app_cache, method, label, value, words):
    at = _page("app_pages/merge.py")
    at.session_state["merge-methods"] = [method]
    at.run()
    widget = next(w for w in [*at.number_input, *at.text_input] if w.label == label and w.key.startswith(f"merge-p-{method}-"))
    widget.set_value(value).run()
    assert not at.exception, at.exception
    assert [e.value for e in at.error] == [next(e.value for e in at.error if words in e.value)]
    assert not any(method in str(m.value) and "Not computed yet" in str(m.value) for m in at.markdown)


def test_method_comparison_page_shows_routing_filter_and_cross_task(app_cache, micro_suite):
    for m in ("wemoe", "tinting"):
        run(RunConfig("micro", m, preset="fast"), micro_suite, cache_dir=app_cache, device="cpu")
    at = _page("app_pages/method_comparison.py")
    at.session_state["cmp-methods"] = ["task_arithmetic", "wemoe", "tinting", "individual"]
    at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    wemoe = run(RunConfig("micro", "wemoe", preset="fast"), micro_suite, cache_dir=app_cache, device="cpu")
    assert table.loc["WEMoE", "avg"] == pytest.approx(wemoe["average"])
    assert [h.value for h in at.subheader] == ["WEMoE routing"]  # lazy tabs: only the open one is drawn
    assert len(at.get("plotly_chart")) == 5  # bars, cost scatter, 2 routing heatmaps, routing box
    at.session_state["cmp-detail"] = "Model Tinting: the confidence filter"
    at.run()
    assert [h.value for h in at.subheader] == ["Model Tinting: the confidence filter"] and len(at.get("plotly_chart")) == 3
    at.session_state["cmp-detail"] = "Cross-task accuracy"
    at.run()
    assert not at.exception, at.exception
    from merging.cross_task import cross_task_matrix
    from merging.runs import load_model

    tint = run(RunConfig("micro", "tinting", preset="fast"), micro_suite, cache_dir=app_cache, device="cpu")
    matrix = cross_task_matrix(load_model(tint, micro_suite, app_cache), micro_suite, device="cpu")
    for t in micro_suite.tasks:
        assert matrix.loc[t, t] == pytest.approx(tint["accuracy"][t])


@pytest.fixture(scope="module")
def bias_cache(app_cache):
    """The bias view's four runs (and SurgeryV2 for the grouped chart) with their features, as the page's background jobs leave them."""
    from merging import jobs

    runs = (RunConfig("micro", "individual"), RunConfig("micro", "task_arithmetic"), RunConfig("micro", "surgery", {"base": "task_arithmetic"}, "fast"),
            RunConfig("micro", "featcal", {"base": "task_arithmetic"}), RunConfig("micro", "surgery", {"base": "task_arithmetic", "version": 2}, "fast"))
    jobs.execute(jobs.RunsJob("micro", runs, "cpu", jobs.FeaturesRequest(n=300, layers=True)), app_cache, lambda f, m: None)
    return app_cache


def _values(encoded) -> list:
    """A trace's values from a chart spec: a list, or plotly's typed-array form {"dtype", "bdata"}."""
    import base64

    import numpy as np

    return np.frombuffer(base64.b64decode(encoded["bdata"]), dtype=encoded["dtype"]).tolist() if isinstance(encoded, dict) else list(encoded)


def _traces(chart) -> set[str]:
    import json

    return {t.get("name") for t in json.loads(chart.proto.spec)["data"]}


def test_representation_bias_page_scatter_views_metrics_and_layers(bias_cache, micro_suite):
    at = _page("app_pages/representation_bias.py")
    at.session_state["bias-proj"] = "pca"
    at.run()
    assert not at.exception, at.exception
    scatter = at.get("plotly_chart")[0]
    assert _traces(scatter) == {"individual", "merged"}  # "before" is the default view
    assert "PCA" in scatter.proto.spec
    # the metrics table holds the library's numbers
    from merging.artifacts import run_features
    from merging.metrics import bias_table

    results = {label: run(RunConfig("micro", m, p, preset=preset), micro_suite, cache_dir=bias_cache, device="cpu")
               for label, m, p, preset in [("individual", "individual", {}, None), ("merged", "task_arithmetic", {}, None),
                                           ("merged + Surgery", "surgery", {"base": "task_arithmetic"}, "fast"),
                                           ("merged + FeatCal", "featcal", {"base": "task_arithmetic"}, None)]}
    task = micro_suite.tasks[0]
    sets = {label: run_features(r, micro_suite, n=300, layers=True, cache_dir=bias_cache)[task] for label, r in results.items()}
    expected = bias_table(sets, "individual", layers=sets["individual"].layers)
    l1 = expected[(expected["layer"] == "final") & (expected["metric"] == "l1")].set_index("model")["value"]
    drop = round(-100 * (1 - l1["merged + Surgery"] / l1["merged"]))
    assert any(c.value.startswith("Surgery changes the mean L1 bias") and f"{task} {drop:+d} %" in c.value for c in at.caption)
    assert any(c.value.startswith("FeatCal changes the mean L1 bias") for c in at.caption)
    assert not at.dataframe  # the metrics table's tab is lazy: closed, nothing of it is sent
    # widgets change what is shown: the after-Surgery view, then each lazily drawn tab
    at.radio(key="bias-view").set_value("after Surgery").run()
    assert _traces(at.get("plotly_chart")[0]) == {"individual", "merged + Surgery"}
    at.session_state["bias-tab"] = "Bias metrics"
    at.run()
    assert not at.exception, at.exception
    assert not at.get("plotly_chart")
    table = at.dataframe[0].value
    assert table.loc[(task, "merged"), "l1"] == pytest.approx(l1["merged"])
    assert table.loc[(task, "merged + Surgery"), "l1"] == pytest.approx(l1["merged + Surgery"])
    assert l1["merged + Surgery"] < l1["merged"]
    at.session_state["bias-tab"] = "Bias per layer"
    at.run()
    assert not at.exception, at.exception
    charts = at.get("plotly_chart")
    assert len(charts) == 1 and not at.dataframe
    assert _traces(charts[0]) == {"merged", "merged + Surgery", "merged + FeatCal"}
    # the grouped chart: one bar trace per fix on the chosen base, heights from the library's metrics
    at.session_state["bias-tab"] = "Bias by fix"
    at.session_state["bias-fix-bases"] = ["task_arithmetic"]
    at.run()
    assert not at.exception, at.exception
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    bars = {t["name"]: dict(zip(t["x"], _values(t["y"]), strict=True)) for t in spec["data"]}
    assert set(bars) == {"base merge", "Surgery", "SurgeryV2", "FeatCal"}
    assert bars["base merge"][task] == pytest.approx(l1["merged"]) and bars["Surgery"][task] == pytest.approx(l1["merged + Surgery"])


def test_merge_page_settings_live_in_the_url_and_a_reload_attaches_to_the_running_job(app_cache, micro_suite):
    """Issue #23.6: the URL restores methods and hyperparameters; the same settings find their running job."""
    import json

    from merging import jobs

    at = _page("app_pages/merge.py").run()
    at.multiselect(key="merge-methods").set_value(["surgery"]).run()
    iterations = next(w for w in at.number_input if w.key.startswith("merge-p-surgery-iterations"))
    iterations.set_value(100002).run()
    assert json.loads(at.query_params["merge-methods"]) == ["surgery"] and json.loads(at.query_params[iterations.key]) == 100002
    at.button(key="merge-run").click().run()
    job = RunsJob("micro", (RunConfig("micro", "surgery", {"iterations": 100002}, "fast"),), "cpu")
    jid = jobs.job_id(job)
    try:
        for _ in range(120):
            if jobs.read_status(app_cache, jid) and jobs.read_status(app_cache, jid)["state"] == "running":
                break
            time.sleep(0.5)
        reloaded = _page("app_pages/merge.py")  # a reload or a shared link: a new session with the same URL
        for key, value in at.query_params.items():
            reloaded.query_params[key] = value
        reloaded.run()
        assert not reloaded.exception, reloaded.exception
        assert reloaded.multiselect(key="merge-methods").value == ["surgery"]
        assert next(w for w in reloaded.number_input if w.key == iterations.key).value == 100002
        bars = [e.proto.text for e in reloaded.get("progress")]
        assert len([b for b in bars if b.startswith("Running: ")]) == 1  # attached to the job the first tab started (the sidebar lists it too)
        assert jobs.start(job, app_cache) == jid and len([j for j in jobs.list_jobs(app_cache, active_only=True) if j["id"] == jid]) == 1
    finally:
        jobs.cancel(app_cache, jid)
