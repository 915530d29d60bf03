"""Checkpoint files as people save them: wrapper prefixes and wrappers, head files of every wrong shape,
a quiet stderr, and the zero-shot heads cache (issue #17, points 7, 8 and 11).

Reuses test_clip_suites' tiny open_clip CLIP (a custom model config) and image folders; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import types
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from test_clip_suites import ARCH, TASKS, TINY, reference_head, tiny_clip, write_images

from merging.cli import main
from merging.errors import MergeLensError
from merging.suites.clip.heads import heads_key
from merging.suites.clip.hf_keys import open_clip_to_hf_clip, open_clip_vision_to_hf
from merging.suites.clip.suite import check, load_clip_suite
from merging.suites.config import load_config

ROOT = Path(__file__).resolve().parents[1]
StateDict = dict[str, torch.Tensor]


def _contiguous(state: StateDict) -> StateDict:
    return {k: v.detach().clone().contiguous() for k, v in state.items()}


def _prefixed(state: StateDict, prefix: str) -> StateDict:
    return {prefix + k: v for k, v in state.items()}


def _task_arithmetic(config: Path, cache: Path, capsys) -> dict[str, float]:
    assert main(["run", "--suite", str(config), "--method", "task_arithmetic", "--cache-dir", str(cache), "--json"]) == 0
    return json.loads(capsys.readouterr().out)["accuracy"]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A tiny whole CLIP, visual-only fine-tuned files, image folders, and the unprefixed suite's heads and accuracy."""
    root = tmp_path_factory.mktemp("ckpt")
    torch.manual_seed(0)
    model, cfg_path = tiny_clip(root)
    full = _contiguous(model.state_dict())
    visual0 = {k[len("visual.") :]: v for k, v in full.items() if k.startswith("visual.")}
    finetuned = {t: {k: v + (0.0 if k == "proj" else 0.05) * torch.randn_like(v) for k, v in visual0.items()} for t in TASKS}
    heads = {t: reference_head(model, c, t) for t, c in TASKS.items()}
    write_images(root / "data")
    save_file(full, root / "pretrained.safetensors")
    for t, s in finetuned.items():
        save_file(s, root / f"{t}.safetensors")
    base = {"model": ARCH, "model_config": str(cfg_path), "data_root": str(root / "data"), "tasks": list(TASKS), "layout": "open_clip",
            "pretrained": str(root / "pretrained.safetensors"), "finetuned": str(root / "{task}.safetensors")}

    def write_config(path: Path, **changes) -> Path:
        path.write_text(yaml.safe_dump({**base, **changes}))
        return path

    plain = write_config(root / "plain.yaml")
    suite = load_clip_suite(load_config(plain), root / "cache")
    for t in TASKS:
        assert torch.allclose(suite.heads[t]["weight"], heads[t], atol=1e-5)
    ns = types.SimpleNamespace(root=root, model=model, full=full, visual0=visual0, finetuned=finetuned, heads=heads, suite=suite,
                               base=base, write_config=write_config, plain=plain)
    return ns


@pytest.fixture(scope="module")
def plain_accuracy(files):
    import io
    from contextlib import redirect_stdout

    buf = io.StringIO()
    with redirect_stdout(buf):
        assert main(["run", "--suite", str(files.plain), "--method", "task_arithmetic", "--cache-dir", str(files.root / "cache"), "--json"]) == 0
    return json.loads(buf.getvalue())["accuracy"]


# ------------------------------------------------------------------------------------- 7. wrapper prefixes
def _safetensors(prefix: str) -> Callable[[StateDict, Path], Path]:
    def write(state: StateDict, path: Path) -> Path:
        path = path.with_suffix(".safetensors")
        save_file(_prefixed(state, prefix), path)
        return path

    return write


def _pt(wrap: Callable[[StateDict], object]) -> Callable[[StateDict, Path], Path]:
    def write(state: StateDict, path: Path) -> Path:
        path = path.with_suffix(".pt")
        torch.save(wrap(state), path)
        return path

    return write


WRAPPED = {
    "module.": _safetensors("module."),
    "model.": _safetensors("model."),
    "_orig_mod.": _safetensors("_orig_mod."),
    "module.model.": _safetensors("module.model."),
    "state_dict": _pt(lambda s: {"state_dict": s}),
    "state_dict+module.": _pt(lambda s: {"state_dict": _prefixed(s, "module.")}),
    "state_dict+model.": _pt(lambda s: {"state_dict": _prefixed(s, "model.")}),
    "model-dict": _pt(lambda s: {"model": s}),
}


def _assert_same_suite(suite, files) -> None:
    assert set(suite.pretrained) == set(files.visual0) and all(torch.equal(suite.pretrained[k], v) for k, v in files.visual0.items())
    for t in TASKS:
        assert all(torch.equal(suite.finetuned[t][k], v) for k, v in files.finetuned[t].items())
        assert torch.equal(suite.heads[t]["weight"], files.suite.heads[t]["weight"])
        assert torch.equal(suite.heads[t]["bias"], files.suite.heads[t]["bias"])


@pytest.mark.parametrize("wrapper", list(WRAPPED))
def test_a_whole_clip_under_a_wrapper_loads_like_the_plain_file(files, plain_accuracy, tmp_path, capsys, wrapper):
    """Pretrained and fine-tuned files are whole CLIPs saved under the wrapper: same weights, zero-shot heads and TA accuracy."""
    write = WRAPPED[wrapper]
    pretrained = write(files.full, tmp_path / "pretrained")
    finetuned = {}
    for t, s in files.finetuned.items():
        whole = {**files.full, **{f"visual.{k}": v for k, v in s.items()}}
        finetuned[t] = str(write(whole, tmp_path / t))
    config = files.write_config(tmp_path / "wrapped.yaml", pretrained=str(pretrained), finetuned=finetuned)
    assert all(ok for ok, _ in check(config)), check(config)
    _assert_same_suite(load_clip_suite(load_config(config), tmp_path / "cache"), files)
    assert _task_arithmetic(config, tmp_path / "cache", capsys) == plain_accuracy


def test_text_weights_under_a_wrapper_give_the_same_heads(files, tmp_path):
    """A visual-only pretrained file and a DDP-saved whole CLIP as ``text_weights``; the pretrained file itself under ``model.``."""
    pretrained = tmp_path / "visual.safetensors"
    save_file(_prefixed(files.visual0, "model."), pretrained)
    text = tmp_path / "text.safetensors"
    save_file(_prefixed(files.full, "module."), text)
    config = files.write_config(tmp_path / "text.yaml", pretrained=str(pretrained), text_weights=str(text))
    assert all(ok for ok, _ in check(config)), check(config)
    _assert_same_suite(load_clip_suite(load_config(config), tmp_path / "cache"), files)


def test_hf_whole_clip_and_experts_under_module_load(files, tmp_path):
    """The hf layout: a DDP-saved HF CLIPModel file and DDP-saved CLIPVisionModel experts."""
    pretrained = tmp_path / "clip.safetensors"
    save_file(_contiguous(_prefixed(open_clip_to_hf_clip(files.full), "module.")), pretrained)
    experts = {}
    for t, s in files.finetuned.items():
        state, _ = open_clip_vision_to_hf(s, prefix="vision_model.")
        experts[t] = str(tmp_path / f"expert_{t}.safetensors")
        save_file(_contiguous(_prefixed(state, "module.")), experts[t])
    config = files.write_config(tmp_path / "hf.yaml", layout="hf", pretrained=str(pretrained), finetuned=experts)
    assert all(ok for ok, _ in check(config)), check(config)
    suite = load_clip_suite(load_config(config), tmp_path / "cache")
    for t in TASKS:
        assert torch.allclose(suite.heads[t]["weight"], files.heads[t], atol=1e-5)
        assert all(torch.allclose(suite.finetuned[t][k], v) for k, v in files.finetuned[t].items())


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    return err


@pytest.mark.parametrize(
    "name,make,needles",
    [
        ("two-prefixes", lambda full: {**{f"module.{k}": v for k, v in full.items() if k.startswith("visual.")},
                                       **{f"model.{k}": v for k, v in full.items() if not k.startswith("visual.")}}, ["'model.' (", "'module.' ("]),
        ("loose-tensor", lambda full: {**_prefixed(full, "module."), "n_averaged": torch.tensor(3)}, ["'' (1 key(s), e.g. 'n_averaged')", "'module.' ("]),
        ("two-copies", lambda full: {**full, **_prefixed(_contiguous(full), "module.")}, ["'' (", "'module.' ("]),
    ],
    ids=["two-prefixes", "loose-tensor", "two-copies"],
)
def test_a_file_with_mixed_prefixes_is_refused_naming_them(files, tmp_path, capsys, name, make, needles):
    path = tmp_path / f"{name}.safetensors"
    save_file(make(files.full), path)
    config = files.write_config(tmp_path / f"{name}.yaml", pretrained=str(path))
    fails = [m for ok, m in check(config) if not ok]
    assert len(fails) == 1 and fails[0].startswith(f"{path}: keys under several prefixes: ") and "\n" not in fails[0], fails
    assert all(n in fails[0] for n in needles), fails[0]
    assert main(["run", "--suite", str(config), "--method", "task_arithmetic", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert fails[0] in _one_line_error(capsys)


def test_a_tower_under_an_unknown_prefix_is_named(files, tmp_path):
    path = tmp_path / "clip.safetensors"
    save_file(_prefixed(files.full, "clip."), path)
    config = files.write_config(tmp_path / "unknown.yaml", pretrained=str(path))
    fails = [m for ok, m in check(config) if not ok]
    assert fails == [f"{path}: the image tower is under 'clip.visual.', a prefix MergeLens does not strip "
                     "(it strips module., model., _orig_mod.); save the CLIP's own state_dict()"]


def test_a_prefixed_file_without_a_text_tower_says_so_naming_the_prefix(files, tmp_path):
    path = tmp_path / "visual.safetensors"
    save_file(_prefixed({f"visual.{k}": v for k, v in files.visual0.items()}, "module."), path)
    config = files.write_config(tmp_path / "notext.yaml", pretrained=str(path))
    fails = [m for ok, m in check(config) if not ok]
    assert len(fails) == 1 and f"the pretrained checkpoint {path} (keys under 'module.') has none" in fails[0], fails


def test_suite_check_refuses_a_text_tower_that_would_not_load(files, tmp_path):
    """``suite check`` reads the text tower with the loader's code: a wider one fails there, not at ``run``."""
    other, _ = tiny_clip(tmp_path, "mergelens-wide-text", {**TINY, "text_cfg": {**TINY["text_cfg"], "width": 48}})
    text = tmp_path / "wide.safetensors"
    save_file(_prefixed(_contiguous(other.state_dict()), "module."), text)
    pretrained = tmp_path / "visual.safetensors"
    save_file(files.visual0, pretrained)
    config = files.write_config(tmp_path / "wide.yaml", pretrained=str(pretrained), text_weights=str(text))
    fails = [m for ok, m in check(config) if not ok]
    assert len(fails) == 1 and fails[0].startswith(f"{text} (keys under 'module.'): tensor ") and f"the {ARCH} text tower has" in fails[0], fails
    with pytest.raises(MergeLensError, match="text tower"):
        load_clip_suite(load_config(config), tmp_path / "cache")


# ------------------------------------------------------------------------------------- 8. head files
def _heads_cases(dim: int = 16) -> list:
    w = torch.randn(3, dim)
    return [
        ("bias-length", {"weight": w, "bias": torch.zeros(4)}, "head 'bias' has shape (4,) but 'weight' has 3 rows; a head's bias is [classes]"),
        ("bias-2d", {"weight": w, "bias": torch.zeros(3, 1)}, "head 'bias' has shape (3, 1) but 'weight' has 3 rows; a head's bias is [classes]"),
        ("bias-int", {"weight": w, "bias": torch.zeros(3, dtype=torch.int64)}, "head 'bias' has dtype int64; a head's tensors must be floating point"),
        ("weight-1d", {"weight": torch.randn(dim)}, "head 'weight' has shape (16,); a head's weight is 2-d [classes, dim]"),
        ("weight-3d", {"weight": torch.randn(3, dim, 1)}, "head 'weight' has shape (3, 16, 1); a head's weight is 2-d [classes, dim]"),
        ("weight-int", {"weight": torch.ones(3, dim, dtype=torch.int32)}, "head 'weight' has dtype int32; a head's tensors must be floating point"),
        ("width", {"weight": torch.randn(3, 8)}, "head expects 8-d features but the encoder gives 16-d (a head of another architecture?)"),
        ("classes", {"weight": torch.randn(4, dim)}, "head has 4 classes but data folder {data} has 3"),
        ("extra", {"weight": w, "bias": torch.zeros(3), "logit_scale": torch.tensor(4.6)},
         "unexpected tensor(s) ['logit_scale'] in a head file; it may hold only 'weight' [classes, dim] and 'bias' [classes]"),
        ("no-weight", {"bias": torch.zeros(3)}, "a head file needs a 'weight' tensor [classes, dim]; found only ['bias']"),
        ("nan", {"weight": w.clone().index_fill_(0, torch.tensor([1]), float("nan"))}, "tensor 'weight' holds NaN or Inf values"),
    ]


@pytest.mark.parametrize("name,tensors,message", _heads_cases(), ids=[c[0] for c in _heads_cases()])
def test_every_wrong_head_shape_fails_suite_check_and_load_with_one_line(files, tmp_path, name, tensors, message):
    head = tmp_path / f"{name}.safetensors"
    save_file(tensors, head)
    config = files.write_config(tmp_path / "head.yaml", head_files={"shapes": str(head)})
    want = f"{head}: " + message.format(data=files.root / "data" / "shapes" / "test")
    fails = [m for ok, m in check(config) if not ok]
    assert fails == [want]
    with pytest.raises(MergeLensError) as e:
        load_clip_suite(load_config(config), tmp_path / "cache")
    assert str(e.value) == want


def test_a_head_with_a_wrong_bias_ends_run_in_one_line_not_a_traceback(files, tmp_path, capsys):
    head = tmp_path / "head.safetensors"
    save_file({"weight": torch.randn(3, 16), "bias": torch.zeros(4)}, head)
    config = files.write_config(tmp_path / "head.yaml", head_files={"shapes": str(head)})
    assert main(["suite", "check", str(config)]) == 2
    assert "1 problem(s)" in capsys.readouterr().out
    assert main(["run", "--suite", str(config), "--method", "task_arithmetic", "--cache-dir", str(tmp_path / "cache")]) == 2
    assert f"{head}: head 'bias' has shape (4,)" in _one_line_error(capsys)


def test_good_head_files_load_half_precision_prefixed_and_without_bias(files, tmp_path):
    w = files.heads["shapes"].detach()
    cases = {"half": {"weight": w.half(), "bias": torch.full((3,), 0.5).half()}, "ddp": {"module.weight": w, "module.bias": torch.zeros(3)}, "nobias": {"weight": w}}
    for name, tensors in cases.items():
        head = tmp_path / f"{name}.safetensors"
        save_file(_contiguous(tensors), head)
        config = files.write_config(tmp_path / f"{name}.yaml", head_files={"shapes": str(head)}, heads="files", tasks=["shapes"])
        assert all(ok for ok, _ in check(config)), check(config)
        got = load_clip_suite(load_config(config), tmp_path / "cache").heads["shapes"]
        assert got["weight"].dtype == torch.float32 and got["bias"].dtype == torch.float32 and got["bias"].shape == (3,)
        assert torch.allclose(got["weight"], w, atol=1e-2 if name == "half" else 0)


# ------------------------------------------------------------------------------------- 11. stderr is for problems
def test_real_checkpoint_commands_print_nothing_on_stderr(files, tmp_path):
    env = {**os.environ, "PYTHONWARNINGS": "default", "NUMBA_CACHE_DIR": str(ROOT / "cache" / "numba")}
    cache = str(tmp_path / "cache")
    suite = str(files.plain)
    commands = [
        ["suite", "check", suite],
        ["run", "--suite", suite, "--method", "task_arithmetic", "--cache-dir", cache],
        ["features", "--suite", suite, "--method", "task_arithmetic", "--n", "0", "--cache-dir", cache],
        ["table", "--suite", suite, "--methods", "pretrained,task_arithmetic", "--cache-dir", cache],
    ]
    for argv in commands:
        done = subprocess.run([sys.executable, "-m", "merging", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, (argv, done.stderr)
        assert done.stderr == "", (argv, done.stderr)


def test_creating_an_open_clip_model_drops_only_the_random_init_notice(files, caplog):
    from merging.model import build_encoder, create_open_clip

    root = logging.getLogger()
    handlers = list(root.handlers)
    with caplog.at_level(logging.INFO):
        create_open_clip(ARCH)
        build_encoder({"kind": "open_clip", "name": ARCH, "kwargs": {"quick_gelu": True}})
        logging.warning("a real problem")
    assert not [r for r in caplog.records if "pretrained weights" in r.getMessage()]
    assert any("Instantiating model architecture" in r.getMessage() for r in caplog.records)  # open_clip's other records pass
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == ["a real problem"]
    assert list(root.handlers) == handlers and not [f for f in root.filters if "RandomInit" in type(f).__name__]


# ------------------------------------------------------------------------------------- zero-shot heads cache
def test_a_text_tower_with_permuted_rows_gets_its_own_heads(files, tmp_path):
    """The old key hashed each tensor's sum, which a permutation keeps: the second suite got the first one's heads."""
    perm = files.full["text_projection"].flip(0).contiguous()
    assert torch.equal(perm.double().sum(), files.full["text_projection"].double().sum())
    permuted = {**files.full, "text_projection": perm}
    path = tmp_path / "permuted.safetensors"
    save_file(permuted, path)
    config = load_config(files.write_config(tmp_path / "permuted.yaml", pretrained=str(path)))
    cache = files.root / "cache"  # the plain suite's heads are already cached here
    suite = load_clip_suite(config, cache)
    model, _ = tiny_clip(tmp_path)
    model.load_state_dict(permuted)
    for t, c in TASKS.items():
        assert not torch.allclose(suite.heads[t]["weight"], files.heads[t], atol=1e-3)
        assert torch.allclose(suite.heads[t]["weight"], reference_head(model, c, t), atol=1e-5)
    blob = {"shapes": {"classnames": TASKS["shapes"], "templates": ["a {c}."]}}
    assert heads_key(config, files.full, True, blob) != heads_key(config, permuted, True, blob)
    assert heads_key(config, files.full, True, blob) != heads_key(config, files.full, False, blob)  # the activation changes the heads too


def test_a_truncated_heads_cache_is_recomputed_with_one_warning(files, tmp_path, caplog):
    config = load_config(files.plain)
    cache = tmp_path / "cache"
    fresh = load_clip_suite(config, cache).heads
    (cached,) = (cache / "suites" / "heads").glob("*.safetensors")
    data = cached.read_bytes()
    cached.write_bytes(data[: len(data) // 2])
    with caplog.at_level(logging.WARNING, logger="merging"):
        again = load_clip_suite(config, cache).heads
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and str(cached) in warnings[0] and "zero-shot heads cache" in warnings[0], warnings
    for t in TASKS:
        assert torch.equal(again[t]["weight"], fresh[t]["weight"]) and torch.equal(again[t]["bias"], fresh[t]["bias"])
    assert cached.read_bytes() == data  # rewritten whole
