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
