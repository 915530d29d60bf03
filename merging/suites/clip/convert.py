"""The trusted conversion of task_vectors' pickled checkpoints to safetensors: the only code in MergeLens that unpickles.

Kept alone in this module for security review. Unpickling runs whatever code a file names, so it
happens only in ``convert_task_vectors`` and only when called with ``trust`` (``python -m merging
convert --trust``); everything else reads the converted folder, or safetensors and ``weights_only``
state dicts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from merging.errors import CheckpointError
from merging.io import check_compatible, save_json, save_state_dict
from merging.suites.clip.weights import CONVERTED_FORMAT, StateDict, describe, to_float32, unwrap, visual_state


class _Stub(nn.Module):
    """Stands in for a pickled class this environment lacks (task_vectors' ``ImageEncoder``, ``ClassificationHead``)."""


def _stub(module: str, name: str) -> type:
    return type(name, (_Stub,), {"__module__": module, "__qualname__": name})


def _unpickle(path: Path) -> Any:
    """``torch.load(weights_only=False)`` with stand-ins for missing classes: runs the file's pickle code."""
    import pickle
    import types

    stubs: dict[tuple[str, str], type] = {}

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str):
            try:
                return super().find_class(module, name)
            except (ImportError, AttributeError):
                return stubs.setdefault((module, name), _stub(module, name))

    shim = types.ModuleType("merging_trusted_pickle")
    shim.__dict__.update({k: getattr(pickle, k) for k in ("load", "loads", "dump", "dumps", "HIGHEST_PROTOCOL", "UnpicklingError")})
    shim.Unpickler = Unpickler
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file")
    try:
        return torch.load(str(path), map_location="cpu", weights_only=False, pickle_module=shim)
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: could not be unpickled ({msg})") from None


def _module_tensors(obj: Any, prefix: str = "") -> StateDict:
    """Parameters and persistent buffers of an unpickled module tree, read from its ``__dict__``."""
    if isinstance(obj, Mapping):
        return {prefix + k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    d = getattr(obj, "__dict__", {})
    skip = d.get("_non_persistent_buffers_set", set())
    out = {prefix + k: v.detach() for k, v in d.get("_parameters", {}).items() if v is not None}
    out.update({prefix + k: v for k, v in d.get("_buffers", {}).items() if v is not None and k not in skip})
    for k, m in d.get("_modules", {}).items():
        if m is not None:
            out.update(_module_tensors(m, f"{prefix}{k}."))
    return out


def _module_classes(obj: Any) -> set[str]:
    names = {type(obj).__name__}
    for m in getattr(obj, "__dict__", {}).get("_modules", {}).values():
        if m is not None:
            names |= _module_classes(m)
    return names


def convert_task_vectors(
    root: str | Path,
    model: str,
    out: str | Path,
    trust: bool = False,
    tasks: Sequence[str] | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """task_vectors' pickled modules -> safetensors state dicts, head tensors and a manifest (written last).

    The only code path in MergeLens that unpickles, and only with ``trust``: unpickling runs whatever
    code the file names. Do it once, on files you trust; everything else reads the converted folder.
    """
    root = Path(root).expanduser()
    if not trust:
        raise CheckpointError(
            f"{root}: converting unpickles whole pickled modules, which can run arbitrary code; pass --trust if you trust these files"
        )
    src = root / model if (root / model).is_dir() else root
    zeroshot = src / "zeroshot.pt"
    if not zeroshot.is_file():
        raise CheckpointError(f"{zeroshot}: no such file (expected <root>/<model>/zeroshot.pt)")
    if tasks is None:
        tasks = sorted(d.name for d in src.iterdir() if (d / "finetuned.pt").is_file())
    if not tasks:
        raise CheckpointError(f"{src}: no <Task>/finetuned.pt folders")
    out = Path(out).expanduser()

    def encoder(path: Path) -> tuple[StateDict, str, set[str]]:
        """The module's tensors without the wrapper prefix (task_vectors' ``ImageEncoder`` keeps the CLIP as ``model.``)."""
        log(f"unpickling {path} (torch.load weights_only=False, trusted by --trust)")
        obj = _unpickle(path)
        state, prefix = unwrap(_module_tensors(obj), str(path))
        return state, describe(path, prefix), _module_classes(obj)

    state, where, classes = encoder(zeroshot)
    logit_scale = float(state["logit_scale"]) if "logit_scale" in state else None
    visual = to_float32(visual_state(state, where))
    if not visual or "conv1.weight" not in visual:
        raise CheckpointError(f"{zeroshot}: holds no open_clip image encoder (no visual.conv1.weight)")
    quick_gelu = "QuickGELU" in classes
    save_state_dict(visual, out / "zeroshot.safetensors")
    heads = []
    for t in tasks:
        path = src / t / "finetuned.pt"
        ft, ft_where, _ = encoder(path)
        ft_visual = to_float32(visual_state(ft, ft_where))
        check_compatible(visual, ft_visual, where, ft_where)
        save_state_dict(ft_visual, out / "finetuned" / f"{t}.safetensors")
        head = src / f"head_{t}.pt"
        if head.is_file():
            log(f"unpickling {head} (torch.load weights_only=False, trusted by --trust)")
            obj = _unpickle(head)
            if getattr(obj, "normalize", True) is False:
                raise CheckpointError(f"{head}: head does not normalize its input; MergeLens heads are W·normalize(z)+b")
            h = _module_tensors(obj)
            if "weight" not in h:
                raise CheckpointError(f"{head}: holds no 'weight' tensor")
            save_state_dict({k: v.float() for k, v in h.items() if k in ("weight", "bias")}, out / "heads" / f"{t}.safetensors")
            heads.append(t)
    manifest = {
        "format": CONVERTED_FORMAT,
        "layout": "task_vectors",
        "model": model,
        "quick_gelu": quick_gelu,
        "logit_scale": logit_scale,
        "tasks": list(tasks),
        "heads": heads,
        "source": str(src.resolve()),
    }
    save_json(manifest, out / "manifest.json")
    log(f"wrote {out}: {len(tasks)} fine-tuned encoders, {len(heads)} heads, QuickGELU={quick_gelu}")
    return out
