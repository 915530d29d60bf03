"""`python -m merging merge` on what FusionBench users hold: HF CLIPModel/CLIPVisionModel folders and files (issue #22, part 2).

A tiny CLIP is generated here (nothing downloaded); the merged folder is loaded back with
``transformers.CLIPVisionModel.from_pretrained`` and compared with a merge computed directly on the HF tensors.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from merging.cli import main

SCALING = 0.3


def _config():
    from transformers import CLIPConfig

    return CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=1, vocab_size=100,
                         max_position_embeddings=16, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, image_size=32,
                           patch_size=8, hidden_act="quick_gelu"),
        projection_dim=16,
    )


@pytest.fixture(scope="module")
@torch.no_grad()
def experts(tmp_path_factory):
    """A CLIPModel folder, and three CLIPVisionModel experts: a folder, a file with and one without ``vision_model.``."""
    from transformers import CLIPModel, CLIPVisionModel

    root = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    config = _config()
    clip = CLIPModel(config).eval()
    clip.save_pretrained(root / "clip")
    base = {k: v.clone() for k, v in CLIPVisionModel(config.vision_config).state_dict().items()}
    base_from_clip = {k[len("vision_model.") :]: v for k, v in clip.state_dict().items() if k.startswith("vision_model.")}
    base = {k: base_from_clip[k.removeprefix("vision_model.")].clone() for k in base if "position_ids" not in k}
    tuned = {}
    for i, name in enumerate(("cars", "dtd", "svhn")):
        g = torch.Generator().manual_seed(10 + i)
        state = {k: v + 0.02 * torch.randn(v.shape, generator=g) for k, v in base.items()}
        tuned[name] = state
        if name == "cars":
            vm = CLIPVisionModel(config.vision_config)
            missing, unexpected = vm.load_state_dict(state, strict=False)
            assert not [k for k in missing if "position_ids" not in k] and not unexpected
            vm.save_pretrained(root / name)
        else:
            prefix = "vision_model." if name == "dtd" else ""
            save_file({prefix + k.removeprefix("vision_model."): v.contiguous() for k, v in state.items()}, root / f"{name}.safetensors")
    paths = {"cars": root / "cars", "dtd": root / "dtd.safetensors", "svhn": root / "svhn.safetensors"}
    expected = {k: v + SCALING * sum(tuned[t][k] - v for t in tuned) for k, v in base.items()}
    return root, paths, expected


def _merge(pretrained: Path, paths: dict[str, Path], out: Path) -> int:
    ft = [f"{t}={p}" for t, p in paths.items()]
    return main(["merge", "--method", "task_arithmetic", "--pretrained", str(pretrained), "--finetuned", *ft, "--set", f"scaling={SCALING}", "--out", str(out)])


def _bare(state: dict) -> dict:
    return {k.removeprefix("vision_model."): v for k, v in state.items() if "position_ids" not in k}


def test_merge_writes_a_folder_clipvisionmodel_loads(experts, tmp_path, capsys):
    from transformers import CLIPVisionModel

    root, paths, expected = experts
    out = tmp_path / "merged"
    assert _merge(root / "clip", paths, out) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folder left
    model, info = CLIPVisionModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    got, want = _bare(model.state_dict()), _bare(expected)
    assert set(got) == set(want)
    worst = max((got[k] - want[k]).abs().max().item() for k in want)
    assert worst < 1e-6, worst
    # the same merge from a CLIPVisionModel folder as the pretrained model, into a state-dict file with HF keys
    vm_dir = tmp_path / "base_vision"
    CLIPVisionModel(_config().vision_config).save_pretrained(vm_dir)
    base_vm = _bare(CLIPVisionModel.from_pretrained(root / "clip").state_dict())
    save_file({f"vision_model.{k}": v.contiguous() for k, v in base_vm.items()}, vm_dir / "model.safetensors")
    file_out = tmp_path / "merged.safetensors"
    assert _merge(vm_dir, paths, file_out) == 0
    flat = _bare(load_file(file_out))
    assert set(flat) == set(want) and max((flat[k] - want[k]).abs().max().item() for k in want) < 1e-6


def test_merge_refuses_mixed_inputs_and_overwriting_inputs(experts, tmp_path, capsys):
    root, paths, _ = experts
    plain = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, plain)
    assert _merge(root / "clip", {**paths, "plain": plain}, tmp_path / "m") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "plain state dict" in err and "one layout" in err, err
    assert _merge(root / "clip", paths, root / "cars") == 2
    err = capsys.readouterr().err.strip()
    assert "inputs are never modified" in err and "\n" not in err, err
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "notes.txt").write_text("mine")
    assert _merge(root / "clip", paths, busy) == 2
    assert "notes.txt" in capsys.readouterr().err and (busy / "notes.txt").read_text() == "mine"
    assert _merge(plain, {"a": plain}, tmp_path / "folder_out") == 2
    assert "use a .safetensors" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- a CLIPModel folder's own tokenizer
CONTEXT, VOCAB = 16, 600
TINY_ARCH = {
    "embed_dim": 16,
    "quick_gelu": True,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": CONTEXT, "vocab_size": VOCAB, "width": 32, "heads": 2, "layers": 1},
}
TEMPLATE = "a photo of a {c}."


def _byte_chars() -> list[str]:
    """GPT-2/CLIP's byte-to-unicode table (the alphabet of a byte-level BPE vocabulary)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tokenizer(order: int):
    """A tiny CLIP BPE tokenizer (518 tokens); ``order`` 1 reverses the byte alphabet, so every id changes."""
    from transformers import CLIPTokenizer

    chars = _byte_chars()[:: -1 if order else 1]
    vocab = [*chars, *(c + "</w>" for c in chars), "ph", "pho", "to</w>", "photo</w>", "<|startoftext|>", "<|endoftext|>"]
    merges = [("p", "h"), ("ph", "o"), ("t", "o</w>"), ("pho", "to</w>")]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(vocab)}, merges=merges)


@pytest.fixture(scope="module")
@torch.no_grad()
def tokenizer_world(tmp_path_factory):
    """A CLIPModel folder with its own tokenizer (vocabulary 600 < open_clip's 49408), one expert, an image folder."""
    import json

    import open_clip
    import yaml
    from PIL import Image
    from transformers import CLIPConfig, CLIPModel

    from merging.suites.clip.hf_keys import open_clip_to_hf_clip, open_clip_vision_to_hf

    root = tmp_path_factory.mktemp("tok")
    arch = root / "mergelens-tok-tiny.json"
    arch.write_text(json.dumps(TINY_ARCH))
    open_clip.add_model_config(arch)
    torch.manual_seed(3)
    model = open_clip.create_model("mergelens-tok-tiny", pretrained=None).eval()
    full = model.state_dict()
    config = CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=1, vocab_size=VOCAB,
                         max_position_embeddings=CONTEXT, eos_token_id=517, bos_token_id=516, pad_token_id=517, hidden_act="quick_gelu"),
        vision_config=dict(hidden_size=32, intermediate_size=128, num_attention_heads=2, num_hidden_layers=1, image_size=32, patch_size=8,
                           hidden_act="quick_gelu"),
        projection_dim=16,
    )
    clip = CLIPModel(config).eval()
    clip.load_state_dict(open_clip_to_hf_clip(full), strict=False)
    for order in (0, 1):
        clip.save_pretrained(root / f"clip{order}")
        _tokenizer(order).save_pretrained(root / f"clip{order}")
    visual = {k[len("visual.") :]: v for k, v in full.items() if k.startswith("visual.")}
    expert, _ = open_clip_vision_to_hf(visual)
    save_file({k: v.contiguous() for k, v in expert.items()}, root / "expert.safetensors")
    for i, name in enumerate(("circle", "square")):
        (root / "data" / "shapes" / "test" / name).mkdir(parents=True)
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(root / "data" / "shapes" / "test" / name / "a.png")
    configs = {}
    for order in (0, 1):
        cfg = {"layout": "hf", "model": "mergelens-tok-tiny", "model_config": str(arch), "pretrained": f"clip{order}",
               "finetuned": {"shapes": "expert.safetensors"}, "data_root": "data", "templates": {"shapes": [TEMPLATE]}}
        configs[order] = root / f"tok{order}.yaml"
        configs[order].write_text(yaml.safe_dump(cfg))
    return root, configs


@torch.no_grad()
def _reference_head(folder: Path, classes: list[str]) -> torch.Tensor:
    """transformers' own zero-shot head: text features of the folder's tokenizer's ids, normalized, times exp(logit_scale)."""
    import torch.nn.functional as F
    from transformers import CLIPModel, CLIPTokenizer

    model, tok = CLIPModel.from_pretrained(folder).eval(), CLIPTokenizer.from_pretrained(folder)
    enc = tok([TEMPLATE.format(c=c) for c in classes], padding="max_length", max_length=CONTEXT, return_tensors="pt")
    feats = model.get_text_features(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
    feats = getattr(feats, "pooler_output", feats)
    return F.normalize(feats, dim=-1) * model.logit_scale.exp()


def test_zero_shot_heads_use_the_folders_own_tokenizer_and_key_the_cache_by_it(tokenizer_world, tmp_path):
    from merging.suites.clip import load_clip_suite
    from merging.suites.config import load_config

    root, configs = tokenizer_world
    heads = {}
    for order in (0, 1):  # one cache: the second tokenizer must not reuse the first one's heads
        suite = load_clip_suite(load_config(configs[order]), cache_dir=tmp_path)
        heads[order] = suite.heads["shapes"]["weight"]
        want = _reference_head(root / f"clip{order}", ["circle", "square"])
        assert heads[order].shape == (2, 16)
        assert torch.allclose(heads[order], want, atol=1e-5), (heads[order] - want).abs().max()
    assert (heads[0] - heads[1]).abs().max() > 1e-3
    assert len(list((tmp_path / "suites" / "heads").glob("*.safetensors"))) == 2


def test_a_token_id_past_the_vocabulary_is_a_one_line_error_at_check_and_load(tokenizer_world, tmp_path):
    import shutil

    from merging.errors import ConfigError
    from merging.suites.clip import check, load_clip_suite
    from merging.suites.config import load_config

    root, configs = tokenizer_world
    ok = check(configs[0])
    assert all(good for good, _ in ok), ok
    assert any(f"tokenized by the tokenizer saved in {root / 'clip0'}" in m for _, m in ok), ok
    bare = root / "clip_bare"  # the same CLIPModel without its tokenizer: open_clip's (49408 tokens) is used
    if not bare.exists():
        shutil.copytree(root / "clip0", bare, ignore=shutil.ignore_patterns("tokenizer*"))
    cfg = root / "bare.yaml"
    cfg.write_text(configs[0].read_text().replace("pretrained: clip0", "pretrained: clip_bare"))
    bad = [m for good, m in check(cfg) if not good]
    assert len(bad) == 1 and "\n" not in bad[0] and "open_clip's default tokenizer gives token id 4940" in bad[0] and f"{VOCAB} tokens" in bad[0], bad
    with pytest.raises(ConfigError, match="the text tower has 600 tokens"):
        load_clip_suite(load_config(cfg), cache_dir=tmp_path)
