"""The Tour page (issue #20) under AppTest on the micro suite: Back/Next walk the seven steps, the λ slider re-scores
every task with the what-if engine's numbers, steps 3-5 show the cached runs' numbers, and step 7's finding is
computed from the curves it is given."""

from __future__ import annotations

import json

import pytest
from test_app import _page, app_cache, bias_cache, monkeypatch_module  # noqa: F401  (fixtures)

from merging.runs import RunConfig, cached_result, run
from merging.whatif import WhatIf


def _spec(at, key: str) -> dict:
    return json.loads(next(c for c in at.get("plotly_chart") if c.proto.id and key in c.proto.id).proto.spec)


def _bar(spec: dict, name: str) -> list[float]:
    return next(t for t in spec["data"] if t.get("type") == "bar" and t.get("name") == name)["y"]


def _values(v):
    import base64

    import numpy as np

    if isinstance(v, dict):  # plotly's typed-array encoding
        return np.frombuffer(base64.b64decode(v["bdata"]), dtype=v["dtype"]).tolist()
    return list(v)


def test_tour_walks_seven_steps_and_the_slider_rescores(bias_cache, micro_suite):  # noqa: F811
    at = _page("app_pages/tour.py").run()
    assert not at.exception, at.exception
    assert at.subheader[0].value.startswith("Step 1 of 7")
    engine = WhatIf(micro_suite)
    # step 1: adding one task vector, scored on the subsample
    task = at.session_state["tour-task"]
    spec = _spec(at, "tour-fig-1")
    assert _values(_bar(spec, f"θ₀ + τ_{task}")) == pytest.approx([engine.score_added(task).accuracy[t] for t in micro_suite.tasks])
    at.button(key="tourbtn-next").click().run()
    assert at.subheader[0].value.startswith("Step 2 of 7")
    # one slider move: every task re-scored, the title says λ and the subsample average
    at.slider(key="tour-lambda").set_value(0.45).run()
    assert not at.exception, at.exception
    spec = _spec(at, "tour-fig-2")
    point = engine.score("task_arithmetic", 0.45)
    assert _values(_bar(spec, "merged")) == pytest.approx([point.accuracy[t] for t in micro_suite.tasks])
    assert "λ = 0.45" in spec["layout"]["title"]["text"] and f"{point.average:.1f} %" in spec["layout"]["title"]["text"]
    cached = cached_result(RunConfig("micro", "task_arithmetic", {"scaling": 0.45}), micro_suite, bias_cache, "cpu")  # another test may have run it
    if cached is None:
        assert any("No cached run at this setting" in c.value for c in at.caption)
    else:
        assert any(f"average **{cached['average']:.1f} %**" in c.value for c in at.caption)
    at.slider(key="tour-lambda").set_value(0.3).run()  # lands on the cached baseline run: its full-test number is shown
    ta = run(RunConfig("micro", "task_arithmetic"), micro_suite, cache_dir=bias_cache, device="cpu")
    assert any(f"average **{ta['average']:.1f} %**" in c.value for c in at.caption)
    at.button(key="tourbtn-next").click().run()
    # step 3: the merge against the individual models, full test sets
    spec = _spec(at, "tour-fig-3")
    assert _values(_bar(spec, "Task Arithmetic (λ = 0.3)")) == pytest.approx([ta["accuracy"][t] for t in micro_suite.tasks])
    for step in (4, 5, 6, 7):
        at.button(key="tourbtn-next").click().run()
        assert not at.exception, at.exception
        assert at.subheader[0].value.startswith(f"Step {step} of 7")
        if step in (4, 5):  # the bias view's cached runs and features: L1 bars and the projection
            spec = _spec(at, f"tour-fig-{step}")
            assert "mean L1" in spec["layout"]["title"]["text"]
        if step in (6, 7) and not at.get("plotly_chart"):
            assert at.button(key=f"tourrun-{'others' if step == 6 else 'fail'}")  # offered, not started
    assert at.button(key="tourbtn-next").disabled
    at.button(key="tourbtn-back").click().run()
    assert at.subheader[0].value.startswith("Step 6 of 7")
    at.toggle(key="tour-presenter").set_value(True).run()
    assert not at.exception
    assert any("stSidebar" in m.value for m in at.markdown)  # the presenter view's style hides the sidebar
    assert not at.title  # one figure per screen: no page title above the step
    at.button(key="tourbtn-back").click().run()  # the step indicator changed labels: the step is kept, and moves
    assert not at.exception, at.exception
    assert at.subheader[0].value.startswith("Step 5 of 7")


def test_step_seven_finding_is_computed_from_the_curves():
    from ui_tour import adaptation_curve, finding

    def result(method, objective, accuracy):
        traj = {"step": list(range(len(objective))), "objective": objective, "parts": {},
                "test_accuracy": {"a": accuracy, "b": accuracy}}
        return {"method": method, "title": method.upper(), "average": accuracy[-1], "tasks": ["a", "b"], "info": {"trajectory": traj}}

    curves = {"ada": adaptation_curve(result("ada", [9.0, 8.0, 7.5], [67.0, 69.0, 70.0])),
              "moe": adaptation_curve(result("moe", [9.0, 6.0, 3.0], [67.0, 69.5, 66.0]))}
    out = finding(curves)
    assert out["title"].startswith("MOE") and "3.5 points" in out["title"] and "6.00 → 3.00" in out["title"]
    assert "69.5 % at 50% of its schedule" in out["text"]
    legacy = adaptation_curve({"method": "x", "title": "X", "average": 60.0, "tasks": ["a"], "info": {"loss": [9.0, 5.0]}})
    assert legacy["accuracy"] is None and legacy["objective"] == [9.0, 5.0]
