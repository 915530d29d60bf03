"""``python -m merging why VIEW`` writes CSV and self-contained HTML; bad input is one line and exit code 2."""

import numpy as np
import pandas as pd

from merging.cli import main


def test_why_geometry_and_lambda_plane_write_csv_and_html(micro_suite, micro_cache, tmp_path, capsys):
    common = ["--suite", "micro", "--cache-dir", str(micro_cache), "--out", str(tmp_path), "--device", "cpu"]
    assert main(["why", "geometry", *common, "--merges", "task_arithmetic"]) == 0
    cosine = pd.read_csv(tmp_path / "micro_geometry_cosine.csv", index_col=0)
    assert list(cosine.index) == micro_suite.tasks and np.allclose(cosine.to_numpy().diagonal(), 1.0, atol=1e-12)
    html = (tmp_path / "micro_geometry.html").read_text()
    assert html.count("plotly.js") >= 1 and "Task-vector geometry of micro" in html
    a, b = micro_suite.tasks[:2]
    assert main(["why", "lambda-plane", *common, "--tasks", f"{a},{b}", "--points", "3", "--n", "20"]) == 0
    plane = pd.read_csv(tmp_path / f"micro_lambda_plane_{a}_{b}.csv")
    assert len(plane) == 9 and plane.loc[0, "disentanglement_error"] == 0.0
    assert (tmp_path / f"micro_lambda_plane_{a}_{b}.html").is_file()


def test_why_bad_input_is_one_line(micro_suite, micro_cache, tmp_path, capsys):
    common = ["--suite", "micro", "--cache-dir", str(micro_cache), "--out", str(tmp_path)]
    assert main(["why", "lambda-plane", *common, "--tasks", micro_suite.tasks[0]]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --tasks") and "exactly two tasks" in err and len(err.splitlines()) == 1
    assert main(["why", "trajectory", *common, "--method", "task_arithmetic"]) == 2
    err = capsys.readouterr().err.strip()
    assert "records no trajectory" in err and "adamerging" in err and len(err.splitlines()) == 1
