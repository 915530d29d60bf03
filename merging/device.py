"""Device choice: CUDA when available, else CPU (DESIGN.md, "Device")."""

from __future__ import annotations

import torch


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_preset(device: str | None = None) -> str:
    """``paper`` on a GPU, ``fast`` on the CPU (the Surgery issue's preset rule)."""
    return "paper" if (device or default_device()).startswith("cuda") else "fast"
