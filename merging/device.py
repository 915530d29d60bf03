"""Device choice: CUDA when available, else CPU (DESIGN.md, "Device")."""

from __future__ import annotations

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_preset(device: str | None = None) -> str:
    """``paper`` on a GPU, ``fast`` on the CPU (the Surgery issue's preset rule)."""
    return "paper" if (device or default_device()).startswith("cuda") else "fast"


def autocast(device: str | torch.device, enabled: bool = True):
    """Mixed precision for feature extraction: bf16 on CUDA (fp16 where bf16 is unsupported), a no-op on CPU.

    For inference-only paths (features, representation bias); accuracy tables keep fp32 to match the papers.
    """
    import contextlib

    device = str(device)
    if not enabled or not device.startswith("cuda"):
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.OutOfMemoryError) or "out of memory" in str(error).lower()


def with_batch_size(fn, batch_size: int, min_batch_size: int = 1):
    """``fn(batch_size)``, halving the batch size and retrying on CUDA out-of-memory; returns (result, size used).

    A large model (ViT-L/14) or a busy GPU leaves less room than the default batch assumes; a clear
    error replaces the CUDA traceback when even ``min_batch_size`` does not fit.
    """
    from merging.errors import ConfigError

    size = int(batch_size)
    while True:
        try:
            return fn(size), size
        except (torch.OutOfMemoryError, RuntimeError) as e:
            if not is_oom(e):
                raise
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            if size <= min_batch_size:
                raise ConfigError(
                    f"out of GPU memory even at batch size {size}; free the GPU (other processes?) or run with --device cpu"
                ) from None
            size = max(min_batch_size, size // 2)
