"""The CLI merge contract on generated files: formulas, dtypes, untouched inputs, one-line errors, no output on error."""

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging import task_vectors as tv
from merging.cli import main

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def ckpts(tmp_path):
    g = torch.Generator().manual_seed(0)
    base = {"enc.w": torch.randn(8, 4, generator=g), "enc.b": torch.randn(8, generator=g).half(), "count": torch.tensor([5])}
    paths = {"pre": tmp_path / "pre.safetensors"}
    save_file(base, paths["pre"])
    fts = {}
    for name in ("cars", "dtd", "mnist"):
        ft = {k: v + (0.1 * torch.randn(v.shape, generator=g)).to(v.dtype) if v.is_floating_point() else v for k, v in base.items()}
        fts[name] = ft
        paths[name] = tmp_path / f"{name}.safetensors"
        save_file(ft, paths[name])
    return base, fts, paths


def _args(paths, method, *extra, out):
    ft = [f"{n}={paths[n]}" for n in ("cars", "dtd", "mnist")]
    return ["merge", "--method", method, "--pretrained", str(paths["pre"]), "--finetuned", *ft, *extra, "--out", str(out)]


def _digest(p):
    return hashlib.sha256(Path(p).read_bytes()).hexdigest()


@pytest.mark.parametrize(
    "method,sets,formula",
    [
        ("weight_averaging", [], lambda b, f: tv.weight_averaging(b, f)),
        ("task_arithmetic", ["--set", "scaling=0.4"], lambda b, f: tv.task_arithmetic(b, f, 0.4)),
        ("ties", ["--set", "scaling=0.3", "--set", "density=0.5"], lambda b, f: tv.ties(b, f, 0.3, 0.5)),
    ],
)
def test_cli_merge_equals_formula(ckpts, tmp_path, method, sets, formula):
    base, fts, paths = ckpts
    before = {k: _digest(p) for k, p in paths.items()}
    out = tmp_path / "merged.safetensors"
    assert main(_args(paths, method, *sets, out=out)) == 0
    merged = load_file(out)
    expected = formula(base, list(fts.values()))
    assert set(merged) == set(base)
    for k, v in base.items():
        assert merged[k].dtype == v.dtype
        assert torch.allclose(merged[k].float(), expected[k].float(), atol=1e-3 if v.dtype == torch.float16 else 1e-6)
    assert torch.equal(merged["count"], base["count"])
    assert before == {k: _digest(p) for k, p in paths.items()}


def test_cli_merge_accepts_weights_only_pt(ckpts, tmp_path):
    base, fts, paths = ckpts
    pt = tmp_path / "dtd.pt"
    torch.save(fts["dtd"], pt)
    paths = {**paths, "dtd": pt}
    out = tmp_path / "m.safetensors"
    assert main(_args(paths, "task_arithmetic", out=out)) == 0
    assert torch.allclose(load_file(out)["enc.w"], tv.task_arithmetic(base, list(fts.values()), 0.3)["enc.w"], atol=1e-6)


class Evil:
    pass


def _bad_cases(ckpts, tmp_path):
    base, fts, paths = ckpts
    cases = {}
    p = tmp_path / "keys.safetensors"
    save_file({**fts["dtd"], "extra": torch.zeros(2)}, p)
    cases["mismatched keys"] = (dict(paths, dtd=p), [], "unexpected key")
    p = tmp_path / "shape.safetensors"
    save_file({**fts["dtd"], "enc.w": torch.zeros(4, 8)}, p)
    cases["mismatched shapes"] = (dict(paths, dtd=p), [], "shape")
    p = tmp_path / "nan.safetensors"
    save_file({**fts["dtd"], "enc.w": torch.full((8, 4), float("nan"))}, p)
    cases["NaN"] = (dict(paths, dtd=p), [], "NaN")
    p = tmp_path / "inf.safetensors"
    save_file({**fts["dtd"], "enc.b": torch.full((8,), float("inf")).half()}, p)
    cases["Inf"] = (dict(paths, dtd=p), [], "Inf")
    p = tmp_path / "pickled.pt"
    torch.save({"enc.w": Evil()}, p)
    cases["pickled"] = (dict(paths, dtd=p), [], "pickled")
    p = tmp_path / "corrupt.safetensors"
    p.write_bytes(b"not a safetensors file at all")
    cases["corrupt"] = (dict(paths, dtd=p), [], "corrupt.safetensors")
    cases["unknown hyperparameter"] = (paths, ["--set", "lambda=0.3"], "unknown hyperparameter 'lambda'")
    cases["bad value"] = (paths, ["--set", "scaling=abc"], "scaling")
    return cases


@pytest.mark.parametrize("case", ["mismatched keys", "mismatched shapes", "NaN", "Inf", "pickled", "corrupt", "unknown hyperparameter", "bad value"])
def test_cli_merge_bad_input_one_line_error_no_output(ckpts, tmp_path, capsys, case):
    paths, extra, needle = _bad_cases(ckpts, tmp_path)[case]
    out = tmp_path / "never.safetensors"
    assert main(_args(paths, "task_arithmetic", *extra, out=out)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and needle in err
    assert not out.exists()
    assert not list(tmp_path.glob(".never*"))


def test_cli_merge_unknown_method_and_empty_finetuned(ckpts, tmp_path, capsys):
    _, _, paths = ckpts
    out = tmp_path / "o.safetensors"
    assert main(["merge", "--method", "slerp", "--pretrained", str(paths["pre"]), "--finetuned", f"a={paths['dtd']}", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'slerp'" in err and "ties" in err
    assert main(["merge", "--method", "ties", "--pretrained", str(paths["pre"]), "--finetuned", "--out", str(out)]) == 2
    assert "--finetuned is empty" in capsys.readouterr().err
    assert not out.exists()


def test_cli_runs_as_module(ckpts, tmp_path):
    _, _, paths = ckpts
    out = tmp_path / "m.safetensors"
    proc = subprocess.run([sys.executable, "-m", "merging", *_args(paths, "ties", out=out)], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert out.exists()
    proc = subprocess.run([sys.executable, "-m", "merging", *_args(paths, "nope", out=tmp_path / "x.safetensors")], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1
