"""Provenance next to every number in the app (issue #22): the family line above the comparison table, a settings
column in it, the family in every figure's subtitle, provenance columns in every CSV download, the report's block."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pandas as pd
import pytest

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from merging.methods import BASELINES  # noqa: E402
from merging.provenance import COLUMNS, family_label  # noqa: E402
from merging.runs import RunConfig, run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def app_cache(micro_suite, micro_cache):
    import ui

    mp = pytest.MonkeyPatch()
    mp.setattr(ui, "CACHE_DIR", micro_cache)
    mp.setenv("MERGELENS_DEFAULT_SUITE", "micro")
    for m in BASELINES:
        run(RunConfig("micro", m), micro_suite, cache_dir=micro_cache, device="cpu")
    yield micro_cache
    mp.undo()


@pytest.fixture
def downloads(monkeypatch):
    """Every download button's (file name, bytes), recorded as the page draws it."""
    import ui

    seen: dict[str, bytes] = {}
    original = ui.st.download_button

    def record(label, data, file_name=None, **kw):
        seen[file_name] = data() if callable(data) else data if isinstance(data, bytes) else str(data).encode()
        return original(label, data, file_name=file_name, **kw)

    monkeypatch.setattr(ui.st, "download_button", record)
    return seen


def _page(path: str) -> AppTest:
    at = AppTest.from_file(str(ROOT / path), default_timeout=120)
    at.session_state["suite"] = "micro"
    return at


def test_comparison_table_figures_and_csv_say_the_checkpoint_family(app_cache, micro_suite, downloads):
    family = family_label(micro_suite.checkpoint_family)
    at = _page("app_pages/method_comparison.py")
    at.session_state["cmp-methods"] = ["pretrained", "task_arithmetic", "ties", "individual"]
    at.run()
    assert not at.exception, at.exception
    assert any(c.value == f"Checkpoints: **{family}**" for c in at.caption)  # above the accuracy table
    table = at.dataframe[0].value
    assert table.loc["Task Arithmetic", "settings"] == "λ=0.3" and table.loc["TIES-Merging", "settings"] == "λ=0.3 · density=0.2"
    charts = [json.loads(c.proto.spec)["layout"]["title"] for c in at.get("plotly_chart")]
    assert charts and all(family in t["subtitle"]["text"] for t in charts)  # the bars and the cost scatter
    csv = pd.read_csv(io.StringIO(downloads["micro_fast_comparison.csv"].decode()), index_col=0)
    assert set(COLUMNS) <= set(csv.columns)
    assert set(csv["weights"]) == {micro_suite.checkpoint_family["weights"]} and set(csv["layout"]) == {"built-in"}
    assert json.loads(csv.loc["TIES-Merging", "params"])["density"] == 0.2
    cost = pd.read_csv(io.StringIO(downloads["micro_fast_cost.csv"].decode()), index_col=0)
    assert set(COLUMNS) <= set(cost.columns)


def test_merge_page_table_and_report_carry_provenance(app_cache, micro_suite, downloads):
    family = family_label(micro_suite.checkpoint_family)
    at = _page("app_pages/merge.py").run()
    assert not at.exception, at.exception
    assert any(c.value == f"Checkpoints: **{family}**" for c in at.caption)
    assert any(f"With a provenance block: checkpoints **{family}**" in c.value for c in at.caption)
    bars = json.loads(at.get("plotly_chart")[0].proto.spec)["layout"]["title"]
    assert bars["text"] == "Per-task accuracy" and bars["subtitle"]["text"] == family
    csv = pd.read_csv(io.StringIO(downloads["micro_accuracy.csv"].decode()), index_col=0)
    assert set(COLUMNS) <= set(csv.columns) and set(csv["suite"]) == {"micro"}
    report = json.loads(next(v for k, v in downloads.items() if k.endswith("_program_report.json")))
    assert report["provenance"]["family"] == family and "average" in report and "model_info" in report


def test_two_checkpoint_families_never_share_an_app_table(app_cache, micro_suite, monkeypatch):
    import ui

    class Stopped(Exception):
        pass

    def stop():
        raise Stopped

    monkeypatch.setattr(ui.st, "stop", stop)
    runs = {"a": run(RunConfig("micro", "task_arithmetic"), micro_suite, cache_dir=app_cache, device="cpu")}
    runs["b"] = {**runs["a"], "checkpoints": {**runs["a"]["checkpoints"], "weights": "00000000"}, "suite_fingerprint": "x" * 16}
    errors, captions = [], []
    where = type("Where", (), {"error": lambda self, m: errors.append(m), "caption": lambda self, m: captions.append(m)})()
    ui.provenance_caption("micro · built-in · weights x", {"a": runs["a"]}, where)
    assert captions == ["Checkpoints: **micro · built-in · weights x**"] and not errors
    with pytest.raises(Stopped):
        ui.provenance_caption("micro · built-in · weights x", runs, where)
    assert len(errors) == 1 and "two checkpoint families" in errors[0] and "weights 00000000" in errors[0]


def test_merge_page_chooses_lambda_on_the_validation_split(app_cache, micro_suite):
    """The checkbox asks for scaling=auto: the run is the CLI's ``--set scaling=auto`` run (same key, found in the cache),
    and the table's settings say λ was chosen on val."""
    result = run(RunConfig("micro", "task_arithmetic", {"scaling": "auto"}), micro_suite, cache_dir=app_cache, device="cpu")
    at = _page("app_pages/merge.py")
    at.session_state["merge-methods"] = ["task_arithmetic"]
    at.session_state["merge-p-task_arithmetic-scaling-None-auto"] = True
    at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    chosen = result["selection"]["chosen"]
    assert table.loc["Task Arithmetic (scaling=auto)", "settings"].startswith(f"λ={chosen:g} (chosen on val")
    assert table.loc["Task Arithmetic (scaling=auto)", "avg"] == pytest.approx(result["average"], abs=0.01)
    figure = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if json.loads(c.proto.spec)["layout"]["title"]["text"].startswith("λ chosen"))
    star = next(t for t in figure["data"] if t.get("marker", {}).get("symbol") == "star")
    assert star["x"] == [chosen] and star["y"] == [max(result["selection"]["accuracy"])]
    average = next(t for t in figure["data"] if t.get("name", "").endswith("average over tasks"))
    assert average["x"] == result["selection"]["grid"] and average["y"] == pytest.approx(result["selection"]["accuracy"])
