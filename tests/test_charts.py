"""Charts that do not mislead and one colour per method on every page (issue #23, points 2 and 3)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
from test_app import _page, app_cache, monkeypatch_module  # noqa: F401  (fixtures)

import ui
from merging.methods import METHODS


def test_bias_per_layer_keeps_network_order_and_does_not_join_the_final_features():
    rows = [("merged", layer, v) for layer, v in [("final", 0.9), ("block0", 0.1), ("block10", 0.7), ("block2", 0.3), ("block1", 0.2)]]
    rows += [("merged + Surgery", layer, v / 2) for _, layer, v in rows]
    fig = ui.layer_figure(pd.DataFrame(rows, columns=["model", "layer", "value"]), "t")
    assert list(fig.layout.xaxis.categoryarray) == ["block0", "block1", "block2", "block10", "final"]
    lines = [t for t in fig.data if t.mode == "lines+markers"]
    assert [list(t.x) for t in lines] == [["block0", "block1", "block2", "block10"]] * 2  # "final" is never on a line
    finals = [t for t in fig.data if list(t.x) == ["final"]]
    assert [t.y[0] for t in finals] == [0.9, 0.45]
    assert lines[0].line.dash != lines[1].line.dash and lines[0].marker.symbol != lines[1].marker.symbol  # neither hides the other


def test_cost_chart_draws_every_method_including_zero_cost_ones():
    cost = pd.DataFrame({"average accuracy": [60.0, 70.0, 80.0, 90.0], "trainable params": [0, 0, 1200, 3_400_000],
                         "adapt seconds": [0.0004, 0.0, 12.5, 40.0]}, index=["Pretrained", "Task Arithmetic", "AdaMerging", "Individual"])
    for x in ("trainable params", "adapt seconds"):
        fig = ui.cost_figure(cost, x)
        assert [t.name for t in fig.data] == [*cost.index, "Pareto front"]
        xs = np.array([t.x[0] for t in fig.data[:-1]], dtype=float)
        assert np.isfinite(xs).all() and (xs > 0).all()  # drawable on the log axis
        assert xs[0] == xs[1] == fig.layout.xaxis.tickvals[0] < xs[2] and fig.layout.xaxis.ticktext[0] == "0"  # 0.4 ms counts as none
        assert len(set(fig.layout.xaxis.ticktext)) == len(fig.layout.xaxis.ticktext)  # no two ticks read alike
        assert [t.text[0] for t in fig.data[:2]] == ["", ""]  # methods sharing a spot: named by the legend, not a pile of labels
        assert "AdaMerging" in fig.data[2].text[0] and "Individual" in fig.data[3].text[0]
        assert all(label in t.hovertext for label, t in zip(cost.index, fig.data[:-1], strict=True))
    assert "12.5 s" in ui.cost_figure(cost, "adapt seconds").data[2].text[0]


def test_accuracy_vs_cost_marks_groups_and_draws_the_pareto_front():
    cost = pd.DataFrame({"average accuracy": [60.0, 67.0, 66.0, 88.0, 74.0, 92.0], "extra storage (MB)": [0.0, 0.0, 0.0, 0.5, 0.02, 2.1]},
                        index=["Pretrained", "Task Arithmetic", "TIES", "EMR", "Surgery", "Individual"])
    groups = {"Pretrained": "reference", "Task Arithmetic": "data-free, one model", "TIES": "data-free, one model",
              "EMR": "storage lane (task id)", "Surgery": "data-dependent", "Individual": "reference"}
    assert ui.pareto_front(cost["extra storage (MB)"], cost["average accuracy"]) == ["Task Arithmetic", "Surgery", "EMR", "Individual"]
    fig = ui.cost_figure(cost, "extra storage (MB)", groups)
    symbols = {t.name: t.marker.symbol for t in fig.data[:-1]}
    assert symbols == {"Pretrained": "star", "Task Arithmetic": "circle", "TIES": "circle", "EMR": "square", "Surgery": "diamond", "Individual": "star"}
    front = fig.data[-1]
    assert front.name == "Pareto front" and list(front.y) == [67.0, 74.0, 88.0, 92.0] and front.line.shape == "hv"
    assert "0.5 MB" in fig.data[3].text[0]


def test_classes_named_by_colours_are_drawn_in_them():
    assert ui.class_colours(["red", "light blue", "teal"]) == {"red": "rgb(255,0,0)", "light blue": "rgb(173,216,230)", "teal": "rgb(0,128,128)"}
    assert ui.class_colours(["red", "circle"]) == {}  # not every class is a colour: the palette for all


def test_reference_rows_keep_their_place_and_colour():
    ind, pre, ta, ties = (METHODS[m].title for m in ("individual", "pretrained", "task_arithmetic", "ties"))
    labels = [ind, f"{ties} (scaling=0.4)", pre, ta]
    assert ui.row_order(labels) == [pre, ta, f"{ties} (scaling=0.4)", ind]
    colours = ui.method_colours()
    assert set(colours) == set(METHODS) and len(set(colours.values())) == len(colours)
    assert ui.label_colours([f"{ties} (scaling=0.4)", ties]) == {f"{ties} (scaling=0.4)": colours["ties"], ties: colours["ties"]}
    assert colours["individual"] == ui.MODEL_COLOURS["individual"]  # the bias page's Individual too


def _bar_colours(at) -> dict[str, str]:
    spec = json.loads(at.get("plotly_chart")[0].proto.spec)
    return {t["name"]: t["marker"]["color"] for t in spec["data"]}


def test_one_colour_per_method_on_overview_and_method_comparison(app_cache):  # noqa: F811
    home = _page("app_pages/home.py").run()
    comparison = _page("app_pages/method_comparison.py")
    comparison.session_state["cmp-methods"] = ["individual", "task_arithmetic", "pretrained"]
    comparison.run()
    assert not home.exception and not comparison.exception
    a, b = _bar_colours(home), _bar_colours(comparison)
    shared = set(a) & set(b)
    ind, pre, ta = (METHODS[m].title for m in ("individual", "pretrained", "task_arithmetic"))
    assert {ind, pre, ta} <= shared
    assert all(a[m] == b[m] for m in shared)
    assert list(b) == [pre, ta, ind]  # the references at the ends


def test_selected_images_split_by_what_surgery_did():
    labels = [0, 1, 2, 0, 1]
    preds = {"merged": {0: 0, 1: 2, 2: 1, 3: 1, 4: 1}, "merged + Surgery": {0: 0, 1: 1, 2: 0, 3: 0, 4: 0}}
    groups = ui.surgery_outcomes([0, 1, 2, 3, 4], labels, preds)
    assert groups == {"all": [0, 1, 2, 3, 4], "merged wrong": [1, 2, 3], "fixed by Surgery": [1, 3], "still wrong": [2]}
