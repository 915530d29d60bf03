"""Progress a person can read (issue #23, point 7): counts, time left, CLI lines, a sweep's bar inside a point."""

from __future__ import annotations

import io

from conftest import random_suite

from merging.progress import line_progress, time_left, track


def test_track_reports_steps_done_of_total():
    seen = []
    list(track(range(4), desc="fine-tuning colors", progress=lambda f, m: seen.append((f, m))))
    assert seen == [(0.0, "fine-tuning colors 0/4"), (0.25, "fine-tuning colors 1/4"), (0.5, "fine-tuning colors 2/4"),
                    (0.75, "fine-tuning colors 3/4"), (1.0, "fine-tuning colors 4/4")]


def test_time_left_from_elapsed_and_fraction():
    assert time_left(60.0, 0.5) == "about 1 min left"
    assert time_left(30.0, 0.75) == "about 10 s left"
    assert time_left(600.0, 0.1) == "about 1.5 h left"
    assert time_left(1.0, 0.5) == "" and time_left(100.0, 0.01) == "" and time_left(100.0, 1.0) == ""  # nothing to go on, or done


def test_cli_progress_prints_a_line_per_step_not_per_call():
    out = io.StringIO()
    report = line_progress(out, every=3600)
    for i in range(50):
        report(i / 100, f"pretraining {i}/50")
    report(0.5, "fine-tuning colors 0/20")
    report(1.0, "fine-tuning colors 20/20")
    lines = out.getvalue().splitlines()
    assert [line.split("] ")[1].split(" (")[0] for line in lines] == ["pretraining 0/50", "fine-tuning colors 0/20", "fine-tuning colors 20/20"]
    assert lines[0].startswith("[  0.0%]") and lines[-1].startswith("[100.0%]")


def test_a_sweeps_bar_moves_inside_a_point(tmp_path):
    from merging.runs import RunConfig
    from merging.sweeps import Point, run_points

    suite = random_suite()
    points = [Point({"seed": s}, s, RunConfig("random", "adamerging", {"steps": 4, "batch_size": 4, "batches_per_task": 1}, "fast", seed=s))
              for s in (0, 1)]
    seen = []
    run_points(points, suite, tmp_path, "cpu", progress=lambda f, m: seen.append((round(f, 4), m)))
    inside = [(f, m) for f, m in seen if m.startswith("point 1/2: ")]
    assert len({f for f, _ in inside}) > 2 and all(0.0 <= f <= 0.5 for f, _ in inside)
    assert any(m.startswith("point 2/2: ") and 0.5 <= f <= 1.0 for f, m in seen)
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_pages_find_the_job_that_builds_their_suite(tmp_path, monkeypatch):
    import os

    import ui
    from merging import jobs

    folder = jobs.job_dir(tmp_path, "suite-abc")
    folder.mkdir(parents=True)
    jobs._write(folder, {"state": "running", "progress": 0.4, "message": "pretraining 12/30", "spec": {"kind": "suite", "suite": "mini8"},
                         "pid": os.getpid()})
    monkeypatch.setattr(ui, "CACHE_DIR", tmp_path)
    assert ui.building_job("mini8")["id"] == "suite-abc"
    assert ui.building_job("micro") is None
