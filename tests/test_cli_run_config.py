"""The CLI side of the architecture: ``run --config`` YAML, the nested base spelling, one-line refusals that
cache nothing, ``list-methods`` with each hyperparameter's words, and ``docs/methods.md`` kept current."""

from __future__ import annotations

from pathlib import Path

import pytest

from merging.cli import main
from merging.methods import METHODS, specs
from merging.methods_doc import methods_markdown

ROOT = Path(__file__).resolve().parents[1]


def test_docs_methods_md_is_current():
    assert (ROOT / "docs" / "methods.md").read_text(encoding="utf-8") == methods_markdown(), "stale: run python -m merging docs"


def test_list_methods_prints_every_hyperparameters_help(capsys):
    assert main(["list-methods"]) == 0
    out = capsys.readouterr().out
    for method in METHODS.values():
        for h in specs(method):
            assert h.help in out, (method.name, h.name)


def test_run_config_yaml_with_nested_base_params_equals_the_flags(micro_suite, micro_cache, tmp_path, capsys):
    config = tmp_path / "run.yaml"
    config.write_text("suite: micro\nmethod: surgery\npreset: fast\nseed: 1\n"
                      "params:\n  base: ties\n  base_params: {scaling: 0.4, density: 0.3}\n  iterations: 3\n")
    assert main(["run", "--config", str(config), "--cache-dir", str(micro_cache), "--json"]) == 0
    import json

    from_yaml = json.loads(capsys.readouterr().out)
    assert from_yaml["params"]["base_params"] == {"scaling": 0.4, "density": 0.3} and from_yaml["seed"] == 1
    flags = ["run", "--suite", "micro", "--method", "surgery", "--preset", "fast", "--seed", "1", "--set", "base=ties",
             "--set", "base.scaling=0.4", "--set", "base.density=0.3", "--set", "iterations=3", "--cache-dir", str(micro_cache), "--json"]
    assert main(flags) == 0
    from_flags = json.loads(capsys.readouterr().out)
    assert from_flags["key"] == from_yaml["key"] and from_flags["accuracy"] == from_yaml["accuracy"]
    # a flag on top of the YAML wins: another seed is another run
    assert main(["run", "--config", str(config), "--seed", "2", "--cache-dir", str(micro_cache), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["key"] != from_yaml["key"]


@pytest.mark.parametrize("sets, words", [
    (["--method", "task_arithmetic", "--set", "scaling=nan"], "hyperparameter 'scaling' = nan is not a finite number"),
    (["--method", "ties", "--set", "density=1.5"], "hyperparameter 'density' = 1.5 is out of range; allowed: 0 <= density <= 1"),
    (["--method", "surgery", "--set", "base=nope"], "hyperparameter 'base' = 'nope' is an unknown method"),
    (["--method", "surgery", "--set", "base_params=scaling=0.3"], "base.KEY=VALUE"),
])  # fmt: skip
def test_run_refuses_a_bad_value_in_one_line_and_caches_nothing(micro_suite, tmp_path, capsys, sets, words):
    cache = tmp_path / "cache"
    assert main(["run", "--suite", "micro", *sets, "--cache-dir", str(cache)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and words in err, err
    assert not (cache / "runs").exists()


def test_run_config_errors_name_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: ties\nlambda: 3\n")
    assert main(["run", "--config", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.yaml" in err and "lambda" in err and err.count("\n") == 1
