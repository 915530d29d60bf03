"""Real-checkpoint suites from local files: the three layouts, the HF key map, zero-shot heads, lazy image folders.

Everything is generated here (a tiny open_clip CLIP with a text tower, tiny image folders); nothing is
downloaded. The three layouts are written from the *same* weights, so every baseline must score the same
on all three, and task arithmetic must match an independent computation with open_clip's own transform.
"""

from __future__ import annotations

import json
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image
from safetensors.torch import save_file

from merging.cli import main
from merging.runs import RunConfig, run
from merging.suites import get_suite, templates
from merging.suites.clip.hf_keys import hf_vision_to_open_clip, open_clip_to_hf_clip, open_clip_vision_to_hf
from merging.suites.clip.images import assign_labels

ARCH = "mergelens-tiny-clip"
TINY = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TASKS = {"MNIST": [str(i) for i in range(10)], "shapes": ["circle", "square", "triangle"]}
BASELINES = ["pretrained", "individual", "weight_averaging", "task_arithmetic", "ties"]


def tiny_clip(root: Path, name: str = ARCH, cfg: dict = TINY):
    import open_clip

    path = root / f"{name}.json"
    path.write_text(json.dumps(cfg))
    open_clip.add_model_config(path)
    return open_clip.create_model(name, pretrained=None).eval(), path


def hf_config(cfg: dict = TINY):
    from transformers import CLIPConfig

    v, t = cfg["vision_cfg"], cfg["text_cfg"]
    return CLIPConfig(
        text_config=dict(hidden_size=t["width"], intermediate_size=4 * t["width"], num_attention_heads=t["heads"], num_hidden_layers=t["layers"],
                         vocab_size=t["vocab_size"], max_position_embeddings=t["context_length"], eos_token_id=49407, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=v["width"], intermediate_size=4 * v["width"], num_attention_heads=v["width"] // v["head_width"],
                           num_hidden_layers=v["layers"], image_size=v["image_size"], patch_size=v["patch_size"], hidden_act="quick_gelu"),
        projection_dim=cfg["embed_dim"],
    )


@torch.no_grad()
def reference_head(model, classnames, task) -> torch.Tensor:
    """The task_vectors recipe written out independently: per-template normalize, mean, renormalize, x exp(logit_scale)."""
    import open_clip

    tok = open_clip.get_tokenizer(ARCH)
    rows = []
    for c in classnames:
        e = model.encode_text(tok([t.format(c=c) for t in templates.templates(task)]))
        e = e / e.norm(dim=-1, keepdim=True)
        e = e.mean(0)
        rows.append(e / e.norm())
    return torch.stack(rows) * model.logit_scale.exp()


def write_images(root: Path) -> dict[str, tuple[list[Path], list[int]]]:
    rng = np.random.default_rng(0)
    out = {}
    for task, classes in TASKS.items():
        files, labels = [], []
        for label, c in enumerate(classes):
            folder = root / task.lower() / "test" / c
            folder.mkdir(parents=True)
            for j in range(2 if task == "MNIST" else 4):
                h, w = (40, 48) if j % 2 else (50, 36)
                path = folder / f"{j}.{'png' if j % 2 else 'jpg'}"
                Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
                files.append(path)
                labels.append(label)
        out[task] = (files, labels)
    return out


class _Modeling(types.ModuleType):
    """Stands for task_vectors' ``src.modeling`` while pickling; removed before conversion, as on a user's machine."""


def _task_vectors_classes():
    mod = _Modeling("src.modeling")

    class ImageEncoder(torch.nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model
            delattr(self.model, "transformer")

        def forward(self, images):
            return self.model.encode_image(images)

    class ClassificationHead(torch.nn.Linear):
        def __init__(self, normalize, weights):
            super().__init__(weights.shape[1], weights.shape[0])
            self.normalize = normalize
            self.weight = torch.nn.Parameter(weights.clone())
            self.bias = torch.nn.Parameter(torch.zeros(weights.shape[0]))

    for cls in (ImageEncoder, ClassificationHead):
        cls.__module__, cls.__qualname__ = "src.modeling", cls.__name__
        setattr(mod, cls.__name__, cls)
    return mod


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """One set of weights and images, written in all three layouts."""
    import copy

    from transformers import CLIPModel, CLIPVisionModel

    root = tmp_path_factory.mktemp("clip")
    torch.manual_seed(0)
    model, cfg_path = tiny_clip(root)
    full = {k: v.clone() for k, v in model.state_dict().items()}
    visual0 = {k[7:]: v for k, v in full.items() if k.startswith("visual.")}
    finetuned = {t: {k: v + (0.0 if k == "proj" else 0.05) * torch.randn_like(v) for k, v in visual0.items()} for t in TASKS}
    heads = {t: reference_head(model, c, t) for t, c in TASKS.items()}
    data = write_images(root / "data")
    for task in TASKS:  # a train split beside each test split: FeatCal's unlabeled calibration images
        shutil.copytree(root / "data" / task.lower() / "test", root / "data" / task.lower() / "train")
    base = {"model": ARCH, "model_config": str(cfg_path), "data_root": str(root / "data"), "tasks": list(TASKS)}

    # open_clip layout: a whole pretrained CLIP and visual-only fine-tuned files
    oc = root / "open_clip"
    oc.mkdir()
    save_file(full, oc / "pretrained.safetensors")
    for t, s in finetuned.items():
        save_file(s, oc / f"{t}.safetensors")
    oc_cfg = {**base, "layout": "open_clip", "pretrained": "open_clip/pretrained.safetensors", "finetuned": "open_clip/{task}.safetensors"}

    # hf layout: a CLIPModel folder and CLIPVisionModel experts (one saved by transformers, one with the vision_model. prefix)
    hf = root / "hf"
    config = hf_config()
    clip_hf = CLIPModel(config)
    clip_hf.load_state_dict(open_clip_to_hf_clip(full))
    clip_hf.save_pretrained(hf / "pretrained")
    experts = {}
    for i, (t, s) in enumerate(finetuned.items()):
        state, _ = open_clip_vision_to_hf(s, prefix="vision_model." if i else "")
        if i:
            save_file({k: v.contiguous() for k, v in state.items()}, hf / f"expert_{t}.safetensors")
            experts[t] = f"hf/expert_{t}.safetensors"
        else:
            vm = CLIPVisionModel(config.vision_config)
            vm.load_state_dict(state)
            vm.save_pretrained(hf / f"expert_{t}")
            experts[t] = f"hf/expert_{t}"
    hf_cfg = {**base, "layout": "hf", "pretrained": "hf/pretrained", "finetuned": experts}

    # task_vectors layout: whole pickled modules; MNIST has a head file, shapes gets a zero-shot head from text_weights
    tv = root / "tv" / ARCH
    modeling = _task_vectors_classes()
    sys.modules["src"], sys.modules["src.modeling"] = types.ModuleType("src"), modeling
    try:
        (tv / "MNIST").mkdir(parents=True)
        torch.save(modeling.ImageEncoder(copy.deepcopy(model)), tv / "zeroshot.pt")
        for t, s in finetuned.items():
            m = copy.deepcopy(model)
            m.visual.load_state_dict(s)
            (tv / t).mkdir(exist_ok=True)
            torch.save(modeling.ImageEncoder(m), tv / t / "finetuned.pt")
        torch.save(modeling.ClassificationHead(True, heads["MNIST"]), tv / "head_MNIST.pt")
    finally:
        del sys.modules["src"], sys.modules["src.modeling"]
    tv_cfg = {**base, "layout": "task_vectors", "root": "converted", "text_weights": "open_clip/pretrained.safetensors"}

    configs = {}
    for name, cfg in (("open_clip", oc_cfg), ("hf", hf_cfg), ("task_vectors", tv_cfg)):
        configs[name] = root / f"{name}.yaml"
        configs[name].write_text(yaml.safe_dump(cfg))
    return types.SimpleNamespace(root=root, model=model, visual0=visual0, finetuned=finetuned, heads=heads, data=data, configs=configs, tv=tv.parent)


def _convert(world, capsys) -> None:
    if not (world.root / "converted" / "manifest.json").is_file():
        assert main(["convert", "--root", str(world.tv), "--model", ARCH, "--out", str(world.root / "converted"), "--trust"]) == 0
        assert "unpickling" in capsys.readouterr().out


def _table(config: Path, cache: Path, capsys) -> dict[str, dict[str, float]]:
    csv = cache / f"{config.stem}.csv"
    assert main(["table", "--suite", str(config), "--methods", ",".join(BASELINES), "--cache-dir", str(cache), "--csv", str(csv)]) == 0
    capsys.readouterr()
    import pandas as pd

    return pd.read_csv(csv, index_col=0).to_dict(orient="index")


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------------------------- HF key map
def test_hf_vision_map_matches_transformers_clipvisionmodel(tmp_path):
    from open_clip.transformer import QuickGELU, VisionTransformer
    from transformers import CLIPVisionModel

    torch.manual_seed(1)
    hf = CLIPVisionModel(hf_config().vision_config).eval()
    for p in hf.parameters():
        p.data.normal_(0, 0.2)
    proj = torch.randn(16, 32)
    oc = VisionTransformer(image_size=32, patch_size=8, width=32, layers=2, heads=2, mlp_ratio=4.0, output_dim=16, act_layer=QuickGELU).eval()
    oc.load_state_dict(hf_vision_to_open_clip(hf.state_dict(), proj))
    x = torch.randn(4, 3, 32, 32)
    with torch.no_grad():
        want = hf(pixel_values=x).pooler_output @ proj.T
        got = oc(x)
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
    back, back_proj = open_clip_vision_to_hf(oc.state_dict(), prefix="")
    ref = {k: v for k, v in hf.state_dict().items() if "position_ids" not in k}
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)
    assert torch.equal(back_proj, proj)
    prefixed = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
    mapped, ours = hf_vision_to_open_clip(prefixed, proj), oc.state_dict()
    assert set(mapped) == set(ours) and all(torch.equal(mapped[k], ours[k]) for k in ours)


def test_whole_clip_map_matches_transformers_text_and_image_features(tmp_path):
    import open_clip
    from transformers import CLIPModel

    from merging.suites.clip.hf_keys import hf_clip_to_open_clip

    torch.manual_seed(2)
    oc, _ = tiny_clip(tmp_path)
    hf = CLIPModel(hf_config()).eval()
    for p in hf.parameters():
        p.data.normal_(0, 0.2)
    oc.load_state_dict(hf_clip_to_open_clip(hf.state_dict()))
    tokens = open_clip.get_tokenizer(ARCH)(["a photo of a cat.", "satellite view of a river."])
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        text_hf, img_hf = hf.get_text_features(input_ids=tokens), hf.get_image_features(pixel_values=x)
        text_hf = text_hf if torch.is_tensor(text_hf) else text_hf.pooler_output
        img_hf = img_hf if torch.is_tensor(img_hf) else img_hf.pooler_output
        assert torch.allclose(oc.encode_text(tokens), text_hf, atol=1e-5)
        assert torch.allclose(oc.encode_image(x), img_hf, atol=1e-5)


# ------------------------------------------------------------------------------------- templates and data
def test_templates_and_classnames_match_table0():
    counts = {"SUN397": (397, 2), "Cars": (196, 8), "RESISC45": (45, 18), "EuroSAT": (10, 3), "SVHN": (10, 1), "GTSRB": (43, 3), "MNIST": (10, 1), "DTD": (47, 8)}
    for task, (classes, n_templates) in counts.items():
        assert len(templates.classnames(task)) == classes
        assert len(set(templates.classnames(task))) == classes
        assert len(templates.templates(task)) == n_templates
    assert templates.templates("dtd")[3] == "a photo of a {c} object."
    assert templates.templates("RESISC45")[:2] == ("satellite imagery of {c}.", "aerial imagery of {c}.")
    assert templates.classnames("stanford-cars")[0] == "AM General Hummer SUV 2000"


def test_assign_labels_by_index_name_and_alias():
    assert assign_labels("GTSRB", ["00000", "00042"], templates.classnames("GTSRB"), "x") == ([0, 42], templates.classnames("GTSRB"))
    labels, names = assign_labels("EuroSAT", ["Forest", "SeaLake"], templates.classnames("EuroSAT"), "x")
    assert labels == [1, 9] and names[9] == "lake or sea"
    assert assign_labels("Cars", ["Ram C-V Cargo Van Minivan 2012"], templates.classnames("Cars"), "x")[0] == [templates.classnames("Cars").index("Ram C/V Cargo Van Minivan 2012")]
    assert assign_labels("SUN397", ["a_abbey", "y_youth_hostel"], templates.classnames("SUN397"), "x")[0] == [0, 396]
    assert assign_labels("mine", ["b_thing", "a_thing"], None, "x") == ([0, 1], ["b thing", "a thing"])
    with pytest.raises(Exception, match="matches none of the 47 class names"):
        assign_labels("DTD", ["banded", "plaid"], templates.classnames("DTD"), "/data/dtd/test")


def test_lazy_images_equal_open_clip_val_preprocess(world, capsys):
    import open_clip

    suite = get_suite(str(world.configs["open_clip"]), cache_dir=world.root / "cache")
    data = suite.data["shapes"]
    files, labels = world.data["shapes"]
    assert len(data.test_images) == len(files) and data.test_labels.tolist() == labels
    tf = open_clip.image_transform(32, is_train=False)
    want = torch.stack([tf(Image.open(f).convert("RGB")) for f in files[:5]])
    got = data.preprocess(data.test_images[:5])
    assert got.shape == (5, 3, 32, 32)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.equal(data.test_images[torch.tensor([4, 0])], data.test_images[[4, 0]])
    assert data.test_images[3].shape == (32, 32, 3) and data.test_images.shape == (12, 32, 32, 3)


# ------------------------------------------------------------------------------------- the three layouts end to end
def test_convert_refuses_without_trust(world, capsys):
    out = world.root / "refused"
    assert main(["convert", "--root", str(world.tv), "--model", ARCH, "--out", str(out)]) == 2
    _one_line_error(capsys, "--trust", str(world.tv))
    assert not out.exists()


def test_three_layouts_give_identical_baselines(world, capsys):
    _convert(world, capsys)
    manifest = json.loads((world.root / "converted" / "manifest.json").read_text())
    assert manifest["quick_gelu"] is True and manifest["heads"] == ["MNIST"]
    tables = {name: _table(cfg, world.root / "cache", capsys) for name, cfg in world.configs.items()}
    for name in ("hf", "task_vectors"):
        for m in BASELINES:
            for t in TASKS:
                assert tables[name][m][t] == pytest.approx(tables["open_clip"][m][t], abs=1e-9), (name, m, t)

    suites = {name: get_suite(str(cfg), cache_dir=world.root / "cache") for name, cfg in world.configs.items()}
    for suite in suites.values():
        assert all(torch.equal(suite.pretrained[k], v) for k, v in world.visual0.items())
        for t in TASKS:
            assert all(torch.equal(suite.finetuned[t][k], v) for k, v in world.finetuned[t].items())
            assert torch.allclose(suite.heads[t]["weight"], world.heads[t], atol=1e-5)
    assert suites["task_vectors"].info["heads"] == {"MNIST": str(world.root / "converted/heads/MNIST.safetensors"), "shapes": "zero-shot"}


def test_cli_task_arithmetic_matches_direct_computation(world, capsys):
    import open_clip

    cache = world.root / "cache"
    assert main(["run", "--suite", str(world.configs["hf"]), "--method", "task_arithmetic", "--cache-dir", str(cache), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    model = world.model
    merged = {k: v + 0.3 * sum(world.finetuned[t][k] - v for t in TASKS) for k, v in world.visual0.items()}
    model.visual.load_state_dict(merged)
    tf = open_clip.image_transform(32, is_train=False)
    for t, (files, labels) in world.data.items():
        with torch.no_grad():
            z = model.encode_image(torch.stack([tf(Image.open(f).convert("RGB")) for f in files]))
        pred = (F.normalize(z, dim=-1) @ world.heads[t].T).argmax(-1)
        assert result["accuracy"][t] == pytest.approx(100.0 * (pred == torch.tensor(labels)).float().mean().item())
    model.visual.load_state_dict(world.visual0)


def test_suite_check_passes_then_names_each_problem(world, tmp_path, capsys):
    _convert(world, capsys)
    assert main(["suite", "check", str(world.configs["task_vectors"])]) == 0
    assert "OK" in capsys.readouterr().out

    root = world.configs["open_clip"].parent
    cfg = yaml.safe_load(world.configs["open_clip"].read_text())
    cfg.update(pretrained=str(root / cfg["pretrained"]), finetuned={t: str(root / f"open_clip/{t}.safetensors") for t in TASKS})
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"this is not a safetensors file")
    other, _ = tiny_clip(tmp_path, "mergelens-other-clip", {**TINY, "vision_cfg": {**TINY["vision_cfg"], "width": 48}})
    wrong = tmp_path / "wrong.safetensors"
    save_file({k[7:]: v.contiguous() for k, v in other.state_dict().items() if k.startswith("visual.")}, wrong)
    head = tmp_path / "head.safetensors"
    save_file({"weight": torch.randn(4, 16)}, head)

    def run_with(name: str, **changes) -> str:
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({**cfg, **changes}))
        assert main(["run", "--suite", str(path), "--method", "task_arithmetic", "--cache-dir", str(tmp_path / "cache")]) == 2
        return _one_line_error(capsys)

    corrupt = {"MNIST": str(bad), "shapes": cfg["finetuned"]["shapes"]}
    assert str(bad) in run_with("corrupt", finetuned=corrupt)
    err = run_with("arch", finetuned={"MNIST": str(wrong), "shapes": corrupt["shapes"]})
    assert str(wrong) in err and "shape" in err
    missing = tmp_path / "nodata"
    (missing / "mnist" / "test").mkdir(parents=True)
    (missing / "mnist" / "test" / "0").symlink_to(root / "data" / "mnist" / "test" / "0")
    assert "missing task folder for 'shapes'" in run_with("nodata", data_root=str(missing))
    err = run_with("head", head_files={"shapes": str(head)})
    assert str(head) in err and "head has 4 classes" in err and "has 3" in err

    path = tmp_path / "all.yaml"
    path.write_text(yaml.safe_dump({**cfg, "finetuned": {"MNIST": str(wrong), "shapes": str(bad)}, "head_files": {"shapes": str(head)}}))
    assert main(["suite", "check", str(path)]) == 2
    out = capsys.readouterr().out
    fails = [line for line in out.splitlines() if line.startswith("FAIL")]
    assert len(fails) == 3 and str(wrong) in fails[0] and str(bad) in fails[1] and str(head) in fails[2]
    assert "3 problem(s)" in out


def test_config_errors_name_the_setting(tmp_path):
    from merging.errors import ConfigError
    from merging.suites.config import load_config

    path = tmp_path / "s.yaml"
    path.write_text(yaml.safe_dump({"layout": "open_clip", "model": ARCH, "data_root": ".", "pretrained": "p", "finetuned": {"a": "a"}, "typo": 1}))
    with pytest.raises(ConfigError, match="unknown setting.*typo"):
        load_config(path)
    path.write_text(yaml.safe_dump({"layout": "hf", "model": ARCH, "data_root": "."}))
    with pytest.raises(ConfigError, match="needs 'pretrained'"):
        load_config(path)
    toml = tmp_path / "s.toml"
    toml.write_text('layout = "task_vectors"\nmodel = "ViT-B-32"\ndata_root = "d"\nroot = "c"\nlimit = 5\n')
    cfg = load_config(toml)
    assert cfg.root == tmp_path / "c" and cfg.limit == 5 and cfg.name == "s"


# ------------------------------------------------------------------------------------- device and memory
def test_per_task_model_keeps_states_on_cpu_and_moves_one_task(tiny_suite):
    from merging.model import PerTaskModel

    model = PerTaskModel(tiny_suite.build_encoder(), tiny_suite.finetuned, tiny_suite.make_heads())
    assert model.state_for("a", torch.device("cpu")) is model.states["a"]
    model.to("meta")  # stands in for a GPU: the encoder moves, the T fine-tuned states do not
    assert all(v.device.type == "cpu" for s in model.states.values() for v in s.values())
    on_device = model.state_for("a", torch.device("meta"))
    assert all(v.device.type == "meta" for v in on_device.values())
    assert model.state_for("a", torch.device("meta")) is on_device
    model.state_for("b", torch.device("meta"))
    assert model._resident[0] == "b"
    resident = PerTaskModel(tiny_suite.build_encoder(), tiny_suite.finetuned, tiny_suite.make_heads(), offload=False).to("meta")
    assert all(v.device.type == "meta" for s in resident.states.values() for v in s.values())


def test_batch_size_halves_on_out_of_memory_then_says_so():
    from merging.device import with_batch_size
    from merging.errors import ConfigError

    tried = []

    def fn(size: int) -> int:
        tried.append(size)
        if size > 40:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return size * 10

    assert with_batch_size(fn, 256) == (320, 32) and tried == [256, 128, 64, 32]
    with pytest.raises(ConfigError, match="out of GPU memory even at batch size 1"):
        with_batch_size(lambda s: fn(10**6), 4)
    with pytest.raises(ValueError):
        with_batch_size(lambda s: (_ for _ in ()).throw(ValueError("not memory")), 4)


# ------------------------------------------------------------------------------------- every method, and the app
TINY_OVERRIDES = {
    "adamerging": "adamerging:steps=2",
    "surgery": "surgery:iterations=2",
    "wemoe": "wemoe:steps=2",
    "tinting": "tinting:epochs=2",
    "featcal": "featcal:calibration_images=4",
}


@pytest.mark.parametrize("layout", ["open_clip", "hf", "task_vectors"])
def test_every_registered_method_runs_from_the_cli_on_each_layout(world, capsys, layout):
    from merging.methods import METHODS

    _convert(world, capsys)
    specs = [TINY_OVERRIDES.get(m, m) for m in METHODS]
    csv = world.root / f"every-{layout}.csv"
    argv = ["table", "--suite", str(world.configs[layout]), "--methods", ",".join(specs), "--preset", "fast", "--cache-dir", str(world.root / "cache"), "--csv", str(csv)]
    assert main(argv) == 0, capsys.readouterr().err
    import pandas as pd

    table = pd.read_csv(csv, index_col=0)
    assert len(table) == len(METHODS)
    acc = table[list(TASKS)]
    assert acc.notna().all().all() and ((acc >= 0) & (acc <= 100)).all().all()


def test_a_config_suite_opens_in_the_app(world, capsys, monkeypatch):
    from streamlit.testing.v1 import AppTest

    import ui

    _convert(world, capsys)
    config = str(world.configs["open_clip"])
    monkeypatch.setattr(ui, "CACHE_DIR", world.root / "cache")
    monkeypatch.setenv("MERGELENS_SUITES", config)
    at = AppTest.from_file(str(Path(__file__).resolve().parents[1] / "app_pages" / "home.py"), default_timeout=120)
    at.session_state["suite"] = config
    at.run()
    for _ in range(120):
        if at.dataframe or at.exception:
            break
        import time

        time.sleep(1)
        at.run()
    assert not at.exception, at.exception
    table = at.dataframe[0].value
    assert list(table.columns) == [*list(TASKS), "avg", "settings"] and "Task Arithmetic" in table.index
    assert table.loc["Task Arithmetic", "settings"] == "λ=0.3"


def test_storage_lane_and_featcal_run_on_a_real_checkpoint_suite(world, capsys):
    """TALL masks, EMR and FeatCal on the open_clip layout; FeatCal calibrates on the train folder beside the test folder."""
    config = world.configs["open_clip"]
    assert main(["suite", "check", str(config)]) == 0
    assert "train images beside it" in capsys.readouterr().out
    cache = world.root / "lane-cache"
    table = pd_read(main, config, cache, capsys, "tall_masks,emr,featcal:calibration_images=4,individual")
    suite = get_suite(str(config), cache_dir=cache)
    result = run(RunConfig(str(config), "featcal", {"calibration_images": 4}), suite, cache_dir=cache, device="cpu")
    assert table["featcal(calibration_images=4)"]["split"] == "train" and table["featcal(calibration_images=4)"]["images"] == 4 * len(TASKS)
    for task in TASKS:  # the CLI's table is the cached runs' numbers
        assert table["featcal(calibration_images=4)"][task] == pytest.approx(result["accuracy"][task], abs=0.01)
    assert result["data"] == {"split": "train", "images": 4 * len(TASKS)} and result["info"]["split"] == "train"
    assert result["storage"]["extra_mb"] == 0.0
    emr = run(RunConfig(str(config), "emr"), suite, cache_dir=cache, device="cpu")
    assert table["emr"]["extra_mb"] == pytest.approx(emr["storage"]["extra_mb"], abs=0.01)
    n_float = sum(v.numel() for v in suite.pretrained.values() if v.is_floating_point())
    assert emr["storage"]["extra_mb"] == pytest.approx((4 * n_float + len(TASKS) * n_float / 8 + 4 * len(TASKS)) / 1e6, rel=1e-6)


def pd_read(main, config: Path, cache: Path, capsys, methods: str) -> dict[str, dict[str, float]]:
    import pandas as pd

    csv = cache.parent / "lane.csv"
    assert main(["table", "--suite", str(config), "--methods", methods, "--cache-dir", str(cache), "--cost", "--csv", str(csv)]) == 0
    capsys.readouterr()
    return pd.read_csv(csv, index_col=0).to_dict(orient="index")
