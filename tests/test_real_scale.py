"""What the ViT-B/32-sized rehearsal (benchmarks/real_scale.py) forced: zero-shot heads through a text tower cut at the
longest prompt, and the rehearsal's generated task vectors have the size it says."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from merging.suites.clip.heads import encode_prompts, zero_shot_head

TINY = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}


@pytest.fixture(scope="module")
def tiny_clip(tmp_path_factory):
    import open_clip

    path = tmp_path_factory.mktemp("cfg") / "mergelens-tiny-heads.json"
    path.write_text(json.dumps(TINY))
    open_clip.add_model_config(path)
    torch.manual_seed(0)
    return open_clip.create_model("mergelens-tiny-heads", pretrained=None).eval(), open_clip.get_tokenizer("mergelens-tiny-heads")


def test_prompts_encoded_up_to_the_longest_equal_the_full_context(tiny_clip):
    model, tok = tiny_clip
    ids = tok(["a photo of a 3.", "a centered satellite photo of permanent crop land, seen from far above the clouds.", "dog"])
    assert int((ids != 0).sum(1).max()) < ids.shape[1]  # the cut is real
    with torch.no_grad():
        full = F.normalize(model.encode_text(ids), dim=-1)
        torch.testing.assert_close(encode_prompts(model, ids), full, rtol=0, atol=1e-6)


def test_a_text_tower_without_a_causal_mask_runs_at_full_length(tiny_clip):
    model, tok = copy.deepcopy(tiny_clip[0]), tiny_clip[1]
    ids = tok(["a photo of a 3.", "dog"])
    seen = []
    model.encode_text = lambda x: seen.append(x.shape[1]) or torch.ones(len(x), 16)
    model.attn_mask = None
    encode_prompts(model, ids)
    assert seen == [77]


def test_zero_shot_head_batched_over_classes_equals_the_per_class_recipe(tiny_clip):
    """algorithms.md §0, one class at a time: mean of normalized template embeddings, renormalized, times exp(logit_scale)."""
    model, tok = tiny_clip
    classes, templates = ["cat", "dog", "annual crop land"], ["a photo of a {c}.", "a {c}.", "a blurry photo of the {c} in the wild."]
    head = zero_shot_head(model, tok, classes, templates, batch_size=4)
    with torch.no_grad():
        rows = [F.normalize(F.normalize(model.encode_text(tok([t.format(c=c) for t in templates])), dim=-1).mean(0), dim=-1) for c in classes]
    torch.testing.assert_close(head["weight"], torch.stack(rows) * model.logit_scale.exp(), rtol=0, atol=1e-5)
    assert torch.equal(head["bias"], torch.zeros(3))


def test_rehearsal_task_vectors_have_the_stated_relative_size_and_structure():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import real_scale

    gen = torch.Generator().manual_seed(0)
    theta = torch.randn(64, 48, generator=gen)
    shared = torch.randn(64, 2, generator=gen) @ torch.randn(2, 48, generator=gen)
    tau = real_scale._task_vector(theta, shared / shared.norm(), 0.02, gen)
    assert tau.norm() / theta.norm() == pytest.approx(0.02, rel=1e-5)
    s = torch.linalg.svdvals(tau)
    assert (s[: real_scale.RANK] ** 2).sum() / (s**2).sum() > 0.6  # mostly low-rank, not i.i.d. noise


@pytest.mark.parametrize("method", ["task_arithmetic", "individual", "tall_masks"])
def test_features_with_every_block_take_one_encoder_pass(tiny_suite, method):
    """Extraction with ``layers`` ran the encoder twice (0.47x a raw forward at ViT-B/32 size); a model whose encoding is
    one plain encoder forward now gives features and block means from one pass."""
    from merging.representations import extract
    from merging.runs import RunConfig, build_model

    model = build_model(RunConfig("tiny", method), tiny_suite, device="cpu")[0].eval()
    calls = []
    hook = model.encoder.register_forward_hook(lambda *_: calls.append(1)) if hasattr(model, "encoder") else None
    extract(model, tiny_suite.data["a"], "a", layers=True, device="cpu", batch_size=100)
    hook.remove()
    assert len(calls) == 1
